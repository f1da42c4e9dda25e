"""launch/torchrun.sh: N local processes through torchrun, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "torchrun.sh"
JOBS = REPO / "tests" / "slurm" / "jobs"
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


def test_two_local_processes_all_reduce(tmp_path):
    # The stand-in module of the Slurm tests: a gloo all_reduce, one JSON file per rank.
    done = _run(
        "2", str(TINY), f"train.run_dir={tmp_path}", cwd=JOBS, ROSETTA_MODULE="slurm_job_allreduce"
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("*.json"))]
    assert [(r["rank"], r["world_size"], r["sum"]) for r in records] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert all(r["overrides"] == [f"train.run_dir={tmp_path}"] for r in records)
