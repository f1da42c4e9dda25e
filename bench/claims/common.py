"""Shared parts of the claim scripts: the bundled sample's real corpus as shards (train and
held-out), and short training runs through the real trainer in a fresh process each.

``sample_corpus(root, langs)`` trains a tokenizer on the sample's train text of ``langs`` (its
natural sizes: a ~60x spread in characters between de and hi) and writes train shards and
held-out shards (the sample's ``*.valid`` files); ``train_run(cfg)`` runs ``Trainer.fit`` in one
forked gloo process and returns the run's ``metrics.jsonl`` records.
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.manifest import load_manifest
from data_pipeline.shard import ShardSettings, run_shard_job
from data_pipeline.text_inputs import MonoInput, PairInput
from data_pipeline.tokenizer import train_tokenizer
from parallel.testing import run_distributed
from pretrain.plots import read_metrics
from tests.sample_data import SAMPLE, first_lines

SAMPLE_LANGS = ("de", "el", "en", "es", "fr", "hi", "it", "ja", "ko", "pl", "ru", "zh")


SAMPLE_PAIRS = ("en-de", "en-es", "en-fr", "en-ja", "en-ru", "en-zh")


def sample_corpus(
    root: Path, langs=SAMPLE_LANGS, *, pairs=(), vocab_size: int = 8000
) -> dict[str, Path]:
    """``{"shards", "valid", "tok"}`` directories under ``root`` (built once; reused if there):
    the train text of ``langs`` and the train pairs of ``pairs`` (e.g. ``"en-de"``), held-out
    shards from the sample's ``*.valid`` mono files."""
    out = {"shards": root / "shards", "valid": root / "valid", "tok": root / "tok"}
    if (out["valid"] / "manifest.json").is_file():
        return out
    train = [MonoInput(lang, (SAMPLE / "mono" / f"{lang}.train.txt.zst",)) for lang in langs]
    valid = [MonoInput(lang, (SAMPLE / "mono" / f"{lang}.valid.txt.zst",)) for lang in langs]
    pair_inputs = [
        PairInput(*name.split("-"), (SAMPLE / "parallel" / f"{name}.train.tsv.zst",))
        for name in pairs
    ]
    train_tokenizer(
        train, pairs=pair_inputs, vocab_size=vocab_size, out=out["tok"], seed=0, num_threads=2
    )
    settings = ShardSettings(sample_tokens=512)
    run_shard_job(
        train, pairs=pair_inputs, tokenizer=out["tok"], out=out["shards"], workers=1,
        settings=settings,
    )  # fmt: skip
    run_shard_job(valid, tokenizer=out["tok"], out=out["valid"], workers=1, settings=settings)
    return out


def held_out_pairs(name: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` held-out pairs of the sample's pair set ``name`` (``en-de``)."""
    lines = first_lines(SAMPLE / "parallel" / f"{name}.valid.tsv.zst", count)
    return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]


def language_tokens(shards: Path) -> dict[str, int]:
    """Tokens per language of a shard directory (its manifest)."""
    return {k: v["tokens"] for k, v in load_manifest(shards)["languages"].items()}


def _fit(rank: int, world_size: int, cfg) -> int:
    from pretrain.trainer import Trainer

    return Trainer(cfg, rank=rank, world_size=world_size).fit()


def train_run(cfg) -> list[dict]:
    """Train ``cfg`` in one fresh process; the metrics records of its run directory."""
    codes = run_distributed(_fit, world_size=1, args=(cfg,), timeout_s=3600)
    if codes != [0]:
        raise RuntimeError(f"training {cfg.train.run_dir} exited {codes[0]}")
    return read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")
