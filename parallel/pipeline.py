"""Pipeline parallel with ``torch.distributed.pipelining``: stage layout and schedules.

Stages: ``num_stages = pp * stages_per_rank`` contiguous runs of layers (the first stage also
holds the embeddings, the last the final norm and output projection). Stage -> rank:

    single-stage schedules (1F1B, GPipe)            rank r: stage r
    looped (Interleaved1F1B, LoopedBFS,
            InterleavedZeroBubble)                  rank r: stages r, r + pp, r + 2 pp, ...
    V schedules (ZBVZeroBubble, DualPipeV)          rank r: stages r and 2 pp - 1 - r, so the
                                                    last stage (the loss) is on rank 0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def stage_ids_of_rank(pp_rank: int, *, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages held by ``pp_rank`` (see the module docstring).

    Raises:
        ValueError: a V schedule with ``stages_per_rank != 2``.
    """
    if schedule in V_SCHEDULES:
        if stages_per_rank != 2:
            raise ValueError(
                f"parallel.stages_per_rank ({stages_per_rank}) must be 2 with "
                f"parallel.pp_schedule={schedule}"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")


def build_pipeline(
    build_stage: Callable[[int, int], nn.Module],
    *,
    dims: ParallelDims,
    cfg: ParallelConfig,
    tp_plan: dict[str, str],
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
) -> tuple[Any, list[nn.Module], PipelineInfo]:
    """Build this rank's stages (each parallelized with ``parallelize_model``) and the schedule.

    Args:
        build_stage: ``(stage, num_stages) -> model`` on the meta device, pruned to the stage
            (``pretrain.models.prune_to_stage``).
        loss_fn: ``(logits, targets) -> mean loss`` of one microbatch; the schedule divides
            gradients by the microbatch count (``scale_grads``), so equal-size microbatches give
            the gradient of the mean over the whole batch. Under ``tp > 1`` the logits are a
            ``Shard(2)`` DTensor over the vocabulary and ``schedule.step`` runs inside
            ``loss_parallel()``, so a plain ``F.cross_entropy`` works on them (the losses it
            returns are replicated DTensors; ``pipeline_loss`` reads them).

    Returns:
        ``(schedule, stage_models, info)``. Call ``schedule.step(tokens if info.has_first,
        target=targets if info.has_last, losses=list if info.has_last)``; tokens/targets are
        this dp rank's batch, split into ``parallel.microbatches`` along dim 0.

    Raises:
        ValueError: an unknown schedule name.
    """
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    from parallel.parallelize import parallelize_model

    if not hasattr(pipelining, f"Schedule{cfg.pp_schedule}"):
        raise ValueError(f"parallel.pp_schedule ({cfg.pp_schedule!r}) is not in this torch")
    schedule_cls = getattr(pipelining, f"Schedule{cfg.pp_schedule}")
    num_stages = dims.pp * cfg.stages_per_rank
    stage_ids = stage_ids_of_rank(
        dims.pp_rank, pp=dims.pp, stages_per_rank=cfg.stages_per_rank, schedule=cfg.pp_schedule
    )
    models, stages = [], []
    for stage_id in stage_ids:
        model = build_stage(stage_id, num_stages)
        parallelize_model(model, dims=dims, cfg=cfg, tp_plan=tp_plan, seed=seed, device=device)
        models.append(model)
        stages.append(
            PipelineStage(
                model, stage_id, num_stages, torch.device(device), group=dims["pp"].get_group()
            )
        )
    microbatches = cfg.microbatches if cfg.microbatches is not None else dims.pp
    if dims.tp > 1:
        # The last stage's logits are vocabulary-sharded (Shard(2)): the loss and the backward
        # the schedule runs from it must both be inside loss_parallel (torchtitan enters it
        # around the whole step too).
        schedule_cls = _loss_parallel_class(schedule_cls)
    if cfg.pp_schedule in SINGLE_STAGE_SCHEDULES:
        schedule = schedule_cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn)
    else:
        schedule = schedule_cls(stages, n_microbatches=microbatches, loss_fn=loss_fn)
    info = PipelineInfo(
        stage_ids=stage_ids,
        has_first=0 in stage_ids,
        has_last=num_stages - 1 in stage_ids,
        microbatches=microbatches,
    )
    return schedule, models, info


_LOSS_PARALLEL_CLASSES: dict[type, type] = {}


def _loss_parallel_class(cls: type) -> type:
    """``cls`` whose ``step`` runs inside ``loss_parallel()`` (forward, loss and backward)."""
    if cls not in _LOSS_PARALLEL_CLASSES:

        def step(self, *args, **kwargs):
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                return cls.step(self, *args, **kwargs)

        _LOSS_PARALLEL_CLASSES[cls] = type(f"LossParallel{cls.__name__}", (cls,), {"step": step})
    return _LOSS_PARALLEL_CLASSES[cls]


@dataclass
class PipelineInfo:
    """What the training loop needs to know about this rank's stages."""

    stage_ids: list[int]
    has_first: bool
    """Feed the token ids to ``schedule.step``."""
    has_last: bool
    """Pass ``target=`` and ``losses=`` to ``schedule.step``."""
    microbatches: int


def pipeline_loss(losses: list[torch.Tensor], *, info: PipelineInfo, dims: ParallelDims):
    """The step's loss on every pp rank: mean of the last stage's microbatch losses (plain
    tensors, or replicated DTensors under ``loss_parallel``), sent over ``pp`` (a plain fp32
    scalar)."""
    import torch.distributed as dist

    from parallel.parallelize import local_value

    value = torch.zeros((), dtype=torch.float32)
    if info.has_last:
        value = torch.stack([local_value(loss.detach()).float() for loss in losses]).mean()
    if dims.pp > 1:
        dist.all_reduce(value, group=dims["pp"].get_group())
    return value
