"""Shared parts of the claim scripts: the bundled sample's real corpus as shards (train and
held-out), and short training runs through the real trainer in a fresh process each.

``sample_corpus(root, langs)`` trains a tokenizer on the sample's train text of ``langs`` (its
natural sizes: a ~60x spread in characters between de and hi) and writes train shards and
held-out shards (the sample's ``*.valid`` files); ``run_config(preset, data, run_dir, ...)`` is a
claim run's config; ``train_run(cfg)`` runs ``Trainer.fit`` in one forked gloo process and
returns the run's ``metrics.jsonl`` records; ``export_final(run_dir, steps)`` exports its last
checkpoint with ``checkpoints_tools export-hf``; ``save_result(result, out, name, plot)`` writes a
script's ``NAME.png`` and ``NAME.json``.
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


def run_config(
    preset: str,
    data: dict[str, Path],
    run_dir: Path,
    *,
    steps: int,
    seed: int,
    extra: tuple[str, ...] | list[str] = (),
    log_every: int = 50,
):
    """``configs/PRESET`` on ``data["shards"]`` (the vocabulary its manifest records), sequence
    128, batch 16, fp32, ``steps`` steps of ``seed``, no validation, a checkpoint at the end
    only; then ``extra`` overrides."""
    from pretrain.config import load_config
    from tests.sample_data import REPO

    vocab = load_manifest(data["shards"])["tokenizer"]["vocab_size"]
    return load_config(
        REPO / "configs" / preset,
        [
            f"data.manifest={data['shards']}",
            f"train.run_dir={run_dir}",
            "train.overwrite=true",
            f"model.vocab_size={vocab}",
            "data.seq_len=128",
            "data.batch_size=16",
            f"train.steps={steps}",
            f"train.seed={seed}",
            "train.precision=fp32",
            "train.eval_every=0",
            f"logging.every={log_every}",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            *extra,
        ],
    )


def export_final(run_dir: Path, steps: int) -> Path:
    """``RUN_DIR/hf``: the run's checkpoint of step ``steps`` exported (``export-hf``)."""
    from checkpoints_tools.cli import main as checkpoints_main

    hf_dir = run_dir / "hf"
    code = checkpoints_main(
        ["export-hf", str(run_dir / "checkpoints" / f"step_{steps}"), "--out", str(hf_dir)]
    )
    if code != 0:
        raise RuntimeError(f"export-hf of {run_dir} exited {code}")
    return hf_dir


def retrieval_parser(doc: str, *, langs, out: str):
    """The arguments of the retrieval claims (tlm, electra): ``--data``, ``--steps`` (400),
    ``--seeds`` (0 1), ``--pairs`` (200), ``--langs``, ``--out``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data", help="where the sample corpus is built / reused")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--langs", nargs="+", default=list(langs))
    parser.add_argument("--out", default=out)
    return parser


def parse_out(parser, argv) -> tuple:
    """``(args, out)``: the parsed arguments and their ``--out`` directory, made."""
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def spread(values) -> str:
    """``mean ± population standard deviation`` of ``values`` (3 decimals)."""
    import statistics

    values = list(values)
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def print_table(header: list[str], rows: list[list]) -> None:
    """A Markdown table on stdout."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def save_result(result: dict, out: Path, name: str, plot) -> dict:
    """``OUT/NAME.png`` (a figure of ``plot(result)``, saved and closed; a plot that saves
    itself returns None) and ``OUT/NAME.json``; the result."""
    import json

    fig = plot(result, out / f"{name}.png")
    if fig is not None:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _fit(rank: int, world_size: int, cfg) -> int:
    from pretrain.trainer import Trainer

    return Trainer(cfg, rank=rank, world_size=world_size).fit()


def train_run(cfg) -> list[dict]:
    """Train ``cfg`` in one fresh process; the metrics records of its run directory."""
    codes = run_distributed(_fit, world_size=1, args=(cfg,), timeout_s=3600)
    if codes != [0]:
        raise RuntimeError(f"training {cfg.train.run_dir} exited {codes[0]}")
    return read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")
