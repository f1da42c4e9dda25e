"""The generated sbatch script runs the real trainer on a throw-away two-node Slurm cluster.

``python -m launch.slurm --submit`` for 2 CPU nodes x 1 process: one srun task per node runs
torchrun, the two agents meet in a c10d rendezvous on the first node's NodeAddr, and
``pretrain.train`` trains a tiny decoder (FSDP2 over the 2 ranks, gloo) on the shards that the
preprocessing jobs made on the same cluster (``cluster_shards``). Then the same run is signalled
the way preemption arrives, and must checkpoint, requeue itself and resume to the same curve.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launch.slurm import main

if TYPE_CHECKING:  # the fixtures' types; conftest is not an importable module name
    from conftest import ClusterShards, SlurmCluster

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_decoder.yaml"
STEPS = 100
"""Long enough that the signal (sent once step 2 is logged) lands mid-run: ~65 ms a step here,
so >= 6 s of training is left, against ~1 s for the signal to travel; short enough for CI."""
SIGNAL_AFTER_STEP = 2
CHECKPOINT_EVERY = 40


def _overrides(cluster_shards, run_dir: Path) -> list[str]:
    """A tiny deterministic CPU run: fp32, fixed seed, the loss logged every step."""
    return [
        "train.device=cpu",
        f"train.run_dir={run_dir}",
        f"data.manifest={cluster_shards.shards}",
        "data.valid_manifest=",
        f"data.tokenizer={cluster_shards.shards / 'tokenizer'}",
        "model.vocab_size=2000",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        f"train.steps={STEPS}",
        "train.deterministic=true",
        "train.eval_every=0",
        "optim.warmup_steps=2",
        "logging.every=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        f"checkpoint.every={CHECKPOINT_EVERY}",
    ]


def _submit(cluster: SlurmCluster, cluster_shards: ClusterShards, *, run_dir: Path) -> str:
    """``python -m launch.slurm ... --submit`` for 2 CPU nodes x 1 process; returns the job id."""
    # In-process: the CLI's own process would cost an interpreter start for nothing.
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(
                ["--config", str(TINY), "--nodes", "2", "--gpus-per-node", "1", "--grace", "30"]
                + ["--workdir", str(REPO), "--submit", *_overrides(cluster_shards, run_dir)]
            )
    assert code == 0, err.getvalue()
    job_id = out.getvalue().strip()
    assert job_id.isdigit(), out.getvalue()
    return job_id


def _job_log(run_dir: Path, job_id: str) -> str:
    return (run_dir / "logs" / f"slurm-{job_id}.out").read_text()


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # A line being written may be incomplete while the job runs.
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (DCP writes ``.metadata`` last)."""
    root = run_dir / "checkpoints"
    return sorted(
        int(path.name.removeprefix("step_"))
        for path in root.glob("step_*")
        if (path / ".metadata").is_file()
    )


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, cluster_shards, tmp_path_factory):
    """The run on 2 nodes, start to end with no signal: (run_dir, job id, scontrol record)."""
    run_dir = tmp_path_factory.mktemp("slurm_train") / "run"
    job_id = _submit(slurm_cluster, cluster_shards, run_dir=run_dir)
    info = slurm_cluster.wait_done(job_id, timeout=180)
    return run_dir, job_id, info


def test_two_nodes_train_to_the_end_and_leave_a_checkpoint(uninterrupted):
    run_dir, job_id, info = uninterrupted
    log = _job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert info["NodeList"] == "n[1-2]"
    assert "[launch] c10d rendezvous at 127.0.0.1:" in log  # NodeAddr: n1 does not resolve
    # One torchrun per node, each starting 1 process: 2 ranks means both nodes trained.
    assert "[launch] node n1 (SLURM_NODEID 0): torchrun" in log
    assert "[launch] node n2 (SLURM_NODEID 1): torchrun" in log
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert "'dp_shard': 2" in rank_log, rank_log  # FSDP2 over both ranks
        assert f"step {STEPS}/{STEPS}" in rank_log
    assert f"step {STEPS}/{STEPS} | loss" in log  # rank 0's console line, in the job log
    assert "[launch] step exit 0" in log

    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] > math.log(2000) - 1.0  # starts near uniform over the vocabulary
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0  # and it learns
    assert set(records[-1]["tokens_per_lang"]) == {"en", "de", "ru", "ja"}
    assert _checkpoint_steps(run_dir) == [80, STEPS]  # every 40, keep 2, and at the end
    assert (run_dir / "config.yaml").is_file() and (run_dir / "slurm.sbatch").is_file()


def test_signal_checkpoints_requeues_and_resumes_to_the_same_curve(
    slurm_cluster, cluster_shards, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    job_id = _submit(slurm_cluster, cluster_shards, run_dir=run_dir)
    deadline = time.monotonic() + 120
    # Step 2 is logged: both ranks train with their signal handlers installed.
    while not any(r["step"] >= SIGNAL_AFTER_STEP for r in _metrics(run_dir)):
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    # What --signal=B:USR1@grace does ahead of a time limit: SIGUSR1 to the batch shell only;
    # its trap passes SIGTERM to the step (torchrun, then the trainer).
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])
    # The requeued job waits ~cred_expire (5 s) before it may start again.
    info = slurm_cluster.wait_done(job_id, timeout=180)
    log = _job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    # One log, appended by the second start; SLURM_RESTART_COUNT went from 0 to 1.
    assert re.findall(r"\[launch\] job \d+ start (\d+)", log) == ["0", "1"], log
    assert "[launch] got SIGUSR1" in log
    # The trainer exits 75; torchrun reports any failed worker as 1, so the script goes by the
    # signal, not the code.
    assert re.search(rf"stopped by SIGUSR1 \(step exit \d+\): requeueing job {job_id}", log)

    # Every rank stopped at the same step with a checkpoint and resumed from exactly it.
    stopped, resumed = set(), set()
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        stopped.update(re.findall(r"stop signal received: checkpointed step (\d+), exit", rank_log))
        resumed.update(re.findall(r"resumed from (\S+) at step (\d+)", rank_log))
    assert len(stopped) == 1, stopped
    step = int(stopped.pop())
    assert SIGNAL_AFTER_STEP <= step < STEPS
    assert resumed == {(str(run_dir / "checkpoints" / f"step_{step}"), str(step))}

    # metrics.jsonl continues after the stop: each step once, and the losses are exactly those
    # of the run that was never interrupted (model, optimizer, loader and RNG all restored).
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    reference = {r["step"]: r["loss"] for r in _metrics(uninterrupted[0])}
    assert {r["step"]: r["loss"] for r in records} == reference
    assert _checkpoint_steps(run_dir)[-1] == STEPS
