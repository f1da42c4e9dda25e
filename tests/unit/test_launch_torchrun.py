"""launch/torchrun.sh: N local processes through torchrun, and its one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import zstandard

from data_pipeline.readers import MonoInput
from data_pipeline.shard import ShardSettings, run_shard_job
from data_pipeline.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "torchrun.sh"
SAMPLE = REPO / "data_pipeline" / "sample"
TINY = REPO / "configs" / "tiny_decoder.yaml"


def _run(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "error: usage: launch/torchrun.sh N CONFIG.yaml [section.key=value ...]\n"),
        (("0", str(TINY)), "error: N ('0') must be a positive integer\n"),
        (("two", str(TINY)), "error: N ('two') must be a positive integer\n"),
        (("2", "nope.yaml"), "error: config file 'nope.yaml' does not exist\n"),
        (
            ("2", str(TINY), "train.steps"),
            "error: override 'train.steps' must have the form section.key=value\n",
        ),
    ],
)
def test_mistakes_are_one_line_exit_2(args, message):
    done = _run(*args)
    assert (done.returncode, done.stderr) == (2, message)


def _tiny_shards(root: Path) -> Path:
    """2 languages x 200 lines of the bundled sample, a 1000-piece tokenizer, 512-token samples."""
    mono = []
    for lang in ("en", "de"):
        with open(SAMPLE / "mono" / f"{lang}.train.txt.zst", "rb") as handle:
            text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(handle), "utf-8")
            lines = "".join(line for _, line in zip(range(200), text))
        path = root / f"{lang}.txt"
        path.write_text(lines)
        mono.append(MonoInput(lang, (path,)))
    train_tokenizer(mono, vocab_size=1000, out=root / "tok", seed=0, num_threads=1)
    run_shard_job(
        mono,
        tokenizer=root / "tok",
        out=root / "shards",
        workers=1,
        settings=ShardSettings(sample_tokens=512),
    )
    return root / "shards"


def test_two_local_processes_train(tmp_path):
    shards = _tiny_shards(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [
        "train.device=cpu",
        f"train.run_dir={run_dir}",
        f"data.manifest={shards}",
        "data.valid_manifest=",
        "model.vocab_size=1000",
        "data.seq_len=32",
        "data.batch_size=4",
        "train.steps=4",
        "optim.warmup_steps=1",
        "train.eval_every=0",
        "logging.every=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        "checkpoint.every=4",
    ]
    done = _run("2", str(TINY), *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert "'dp_shard': 2" in rank_log, rank_log  # one FSDP2 group over both processes
        assert "step 4/4" in rank_log
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "step_4" / ".metadata").is_file()
