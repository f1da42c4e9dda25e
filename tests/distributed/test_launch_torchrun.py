"""launch/torchrun.sh: N local processes through torchrun, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "torchrun.sh"
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


def test_two_local_processes_train(shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "train.device=cpu",
        f"train.run_dir={run_dir}",
        f"data.manifest={shards['shards']}",
        "data.valid_manifest=",
        "model.vocab_size=2000",
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
