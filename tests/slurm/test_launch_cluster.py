"""The generated sbatch script on a real (throw-away) two-node Slurm cluster.

Until the trainer exists, small stand-in modules (``tests/slurm/jobs/``) run where
``pretrain.train`` will, through exactly the same srun + torchrun + c10d machinery.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launch.slurm import EXIT_PREEMPTED, main

REPO = Path(__file__).resolve().parents[2]
JOBS = Path(__file__).resolve().parent / "jobs"
TINY = REPO / "configs" / "tiny_decoder.yaml"


def _submit(cluster, monkeypatch, capsys, *, run_dir: Path, module: str) -> str:
    """``python -m launch.slurm ... --submit`` for 2 CPU nodes x 1 process; returns the job id."""
    # In-process: the CLI's own process costs a torch import (seconds on 2 cores).
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    capsys.readouterr()
    code = main(
        ["--config", str(TINY), "--nodes", "2", "--gpus-per-node", "1"]
        + ["--module", module, "--workdir", str(JOBS), "--grace", "30", "--submit"]
        + ["train.device=cpu", f"train.run_dir={run_dir}"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    job_id = captured.out.strip()
    assert job_id.isdigit(), captured.out
    return job_id


def _log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"slurm-{job_id}.out").read_text()


def test_two_nodes_rendezvous_and_all_reduce(slurm_cluster, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    job_id = _submit(
        slurm_cluster, monkeypatch, capsys, run_dir=run_dir, module="slurm_job_allreduce"
    )
    info = slurm_cluster.wait_done(job_id, timeout=120)
    log = _log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0"
    assert info["NodeList"] == "n[1-2]"
    assert "[launch] c10d rendezvous at 127.0.0.1:" in log  # NodeAddr, not the node name
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert {r["node_name"] for r in records} == {"n1", "n2"}
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 for r in records)
    assert all(r["sum"] == 3.0 for r in records)  # 1 + 2: both ranks joined one all_reduce
    assert all(r["job_id"] == job_id and r["restart_count"] == 0 for r in records)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "slurm.sbatch").is_file()


def test_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, monkeypatch, capsys):
    from slurm_job_preempt import EXIT_PREEMPTED as stand_in_code

    assert stand_in_code == EXIT_PREEMPTED
    run_dir = tmp_path / "run"
    job_id = _submit(
        slurm_cluster, monkeypatch, capsys, run_dir=run_dir, module="slurm_job_preempt"
    )
    deadline = time.monotonic() + 90
    # Both ranks have installed their handlers once they wrote their start marker.
    while len(list(run_dir.glob("started_0_*"))) < 2:
        assert time.monotonic() < deadline, slurm_cluster.job(job_id)
        time.sleep(0.1)
    # What --signal=B:USR1@grace does ahead of a time limit: SIGUSR1 to the batch shell only.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    info = slurm_cluster.wait_done(job_id, timeout=120)
    log = _log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1"
    assert "[launch] got SIGUSR1" in log
    assert "requeueing job" in log
    assert log.count("[launch] job ") == 2  # one log, appended by the second start
    for rank in (0, 1):
        saved = json.loads((run_dir / f"checkpoint_{rank}").read_text())
        assert saved["restart_count"] == 0 and saved["signal"] == "SIGTERM"
        resumed = json.loads((run_dir / f"resumed_{rank}").read_text())
        assert resumed["restart_count"] == 1 and resumed["resume"] == "auto"
    nodes = {json.loads((run_dir / f"resumed_{r}").read_text())["node"] for r in (0, 1)}
    assert nodes == {"n1", "n2"}


@pytest.fixture(autouse=True)
def _jobs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(JOBS))
