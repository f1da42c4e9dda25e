"""Small real training data from the bundled sample, shared by the trainer, Slurm and bench code.

``build_sample_shards(root)`` trains a 2,000-piece tokenizer and writes shards from four
languages' mono text (300 lines each) and 200 en-de pairs; ``first_lines`` reads the first lines
of one of the sample's ``.zst`` files. The ``shards`` fixture over them is in tests/conftest.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import zstandard

from data_pipeline.shard import ShardSettings, run_shard_job
from data_pipeline.text_inputs import MonoInput, PairInput
from data_pipeline.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_pipeline" / "sample"
LANGS = ("en", "de", "ru", "ja")


def first_lines(path: Path, count: int) -> list[str]:
    """The first ``count`` lines of the zstd-compressed text file ``path``, without newlines."""
    with open(path, "rb") as handle:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(handle), "utf-8")
        return [line.rstrip("\n") for _, line in zip(range(count), text)]


def build_sample_shards(root: Path) -> dict[str, Path]:
    """Train a tokenizer and write shards under ``root`` from the sample: four languages' mono
    text and en-de pairs. Returns ``{"shards": DIR, "tok": DIR}``."""
    mono, pairs = [], []
    for lang in LANGS:
        path = root / f"{lang}.txt"
        path.write_text(
            "\n".join(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 300)) + "\n"
        )
        mono.append(MonoInput(lang, (path,)))
    tsv = root / "en-de.tsv"
    tsv.write_text("\n".join(first_lines(SAMPLE / "parallel" / "en-de.train.tsv.zst", 200)) + "\n")
    pairs.append(PairInput("en", "de", (tsv,)))
    train_tokenizer(mono, vocab_size=2000, out=root / "tok", seed=0, num_threads=1)
    settings = ShardSettings(sample_tokens=512)
    run_shard_job(
        mono, pairs=pairs, tokenizer=root / "tok", out=root / "shards", workers=1, settings=settings
    )
    return {"shards": root / "shards", "tok": root / "tok"}
