"""The trainer tests' short runs: a small config over the sample shards, one rank's fit (with an
optional preemption signal), and the logged loss curve.

``trainer_config(preset, shards, run_dir, *overrides)`` is 8 steps of a 2-layer model on
4 x 32 tokens, checkpoints every 4 steps; ``fit_rank`` is the body of one harness process;
``logged_losses(run_dir)`` reads ``{step: loss}`` back from ``metrics.jsonl``;
``global_batches`` + ``train_on`` train one process and a 2-rank layout on the same global
batches (the layout tests compare their losses and weights).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

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


def global_batches(cfg, steps: int) -> list[list[dict]]:
    """``steps`` global batches of two parts each, from one loader (the parts as the two dp
    ranks get them; one process takes both, concatenated)."""
    from pretrain.data import build_train_loader

    batches = iter(build_train_loader(cfg, dp_rank=0, dp_world_size=1))
    return [[next(batches), next(batches)] for _ in range(steps)]


def cat_parts(parts: list[dict]) -> dict:
    """One batch of the parts' rows (the global batch one process takes)."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def train_on(rank: int, world_size: int, cfg, steps: list[list[dict]]) -> dict:
    """Train on the given global batches; the step losses and the full final weights."""
    from torch.distributed.tensor import DTensor

    from pretrain.models.transformer import canonical_name
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    losses = []
    for parts in steps:
        # one data-parallel rank (one process, TP, PP) takes the whole global batch
        batch = cat_parts(parts) if trainer.dims.dp == 1 else parts[trainer.dims.dp_rank]
        out = trainer.train_step([batch])
        trainer.settle(out)
        losses.append(out["loss"])
    weights = {}  # every part this rank holds (pipeline stages: some of the model)
    for part in trainer.parts:
        for name, param in part.named_parameters():
            value = param.full_tensor() if isinstance(param, DTensor) else param
            weights[canonical_name(name)] = value.detach().clone()
    return {"losses": losses, "weights": weights}
