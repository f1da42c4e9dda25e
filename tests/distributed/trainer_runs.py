"""The trainer tests' short runs: a small config over the sample shards, one rank's fit (with an
optional preemption signal), and the logged loss curve.

``trainer_config(preset, shards, run_dir, *overrides)`` is 8 steps of a 2-layer model on
4 x 32 tokens, checkpoints every 4 steps; ``fit_rank`` is the body of one harness process;
``logged_losses(run_dir)`` reads ``{step: loss}`` back from ``metrics.jsonl``.
"""

from __future__ import annotations

import signal
from pathlib import Path

from pretrain.config import load_config
from tests.sample_data import REPO


def trainer_config(preset: str, shards: dict[str, Path], run_dir: Path, *extra: str):
    """``configs/PRESET`` over ``shards`` (from ``build_sample_shards``) with the tests' small
    settings, then ``extra`` dot-path overrides."""
    return load_config(
        REPO / "configs" / preset,
        [
            f"data.manifest={shards['shards']}",
            f"data.valid_manifest={shards['shards']}",
            f"train.run_dir={run_dir}",
            "model.vocab_size=2000",
            "model.num_layers=2",
            "data.seq_len=32",
            "data.batch_size=4",
            "data.shuffle_buffer=8",
            "train.steps=8",
            "train.deterministic=true",
            "optim.warmup_steps=2",
            "logging.every=1",
            "logging.tensorboard=false",
            "checkpoint.every=4",
            "train.eval_every=4",
            "train.eval_batches=1",
            *extra,
        ],
    )


def fit_rank(rank: int, world_size: int, cfg, stop_after: int | None) -> int:
    """Build the trainer on this rank and fit; with ``stop_after``, rank 0 receives SIGUSR1 after
    that step. Returns the trainer's exit code."""
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    if stop_after is not None:
        step_fn = trainer.train_step
        calls = {"n": trainer.state.step}

        def step_then_signal(batches):
            out = step_fn(batches)
            calls["n"] += 1
            if calls["n"] == stop_after and rank == 0:
                # As SLURM would: a signal on one rank; every rank must stop at this step.
                trainer.preemption.request_stop(signal.SIGUSR1)
            return out

        trainer.train_step = step_then_signal
    return trainer.fit()


def logged_losses(run_dir: Path) -> dict[int, float]:
    """``{step: loss}`` from ``RUN_DIR/metrics.jsonl``."""
    from pretrain.plots import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
