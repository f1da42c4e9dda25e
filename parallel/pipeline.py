"""Pipeline parallel with ``torch.distributed.pipelining``: stage layout and schedules.

Stages: ``num_stages = pp * stages_per_rank`` contiguous runs of layers (the first stage also
holds the embeddings, the last the final norm and output projection). Stage -> rank:

    single-stage schedules (1F1B, GPipe)            rank r: stage r
    looped (Interleaved1F1B, LoopedBFS,
            InterleavedZeroBubble)                  rank r: stages r, r + pp, r + 2 pp, ...
    V schedules (ZBVZeroBubble, DualPipeV)          rank r: stages r and 2 pp - 1 - r, so the
                                                    last stage (the loss) is on rank 0

Loss normalisation (``pipeline_step``). The schedule calls the loss on each microbatch and, with
``scale_grads`` (torch's default), divides every gradient by the microbatch count M. The loss of
microbatch i is therefore ``sum_i * M / N``: its summed per-token loss over N, the number of
targets (not ``ignore_index``) in this rank's whole batch. The gradient is then that of the batch's
per-token mean, as without pipelining, even when microbatches hold different numbers of targets
(MLM masks, padding), and the mean of the M returned losses is the batch's per-token mean loss.

MoE auxiliary losses need no plumbing across stages: each MoE layer attaches its weighted
aux/z loss to its output, and a stage's backward adds ``aux_loss_scale`` (1 under pipeline
parallel) times its gradient. After ``scale_grads`` the aux term of the gradient is the mean of
the M per-microbatch aux losses, the same as gradient accumulation over those M microbatches
with ``aux_loss_scale = 1 / M``. (A load-balancing loss is a product of per-batch statistics, so
a microbatch's value differs from the whole batch's; Megatron also takes it per microbatch.)

Per-token inputs (``pipeline_step``'s ``stage_kwargs``: document ids, position ids, language
ids). Stages pass only hidden states to each other, so these go to every stage from outside:
``schedule.step(..., **stage_kwargs)`` splits them along dim 0 like the token ids and calls each
stage's forward on microbatch i with microbatch i's slices (torch's pipelining hands ``step``
keyword arguments to every stage). Every stage then builds the same document mask and RoPE
positions as the unsplit model: document masking, position resets and TLM rows work under
pipeline parallel.

Tied embeddings cannot be split over stages (the embedding table and the output projection
would live on different ranks): ``model.tie_embeddings`` must be false with ``parallel.pp > 1``
(checked by ``pretrain.config.validate_config``).
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
    loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str = "cpu",
) -> tuple[Any, list[nn.Module], PipelineInfo]:
    """Build this rank's stages (each parallelized with ``parallelize_model``) and the schedule.

    Args:
        build_stage: ``(stage, num_stages) -> model`` on the meta device, pruned to the stage
            (``pretrain.models.prune_to_stage``).
        loss_sum_fn: ``(logits, targets) -> summed per-token loss`` of one microbatch (e.g.
            ``F.cross_entropy(..., reduction="sum")``); ``pipeline_step`` normalises it over the
            whole batch (module docstring). Under ``tp > 1`` the logits are a ``Shard(2)``
            DTensor over the vocabulary and ``schedule.step`` runs inside ``loss_parallel()``,
            so a plain ``F.cross_entropy`` works on them (the losses it returns are replicated
            DTensors; ``pipeline_loss`` reads them).

    Returns:
        ``(schedule, stage_models, info)``. Run a step with ``pipeline_step(schedule, info=info,
        ...)`` on this dp rank's batch; it is split into ``parallel.microbatches`` along dim 0.

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
    loss_fn = BatchTokenMeanLoss(loss_sum_fn, microbatches=microbatches)
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
        loss_fn=loss_fn,
        device=torch.device(device),
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
    loss_fn: BatchTokenMeanLoss
    """The schedule's loss (``pipeline_step`` sets its target count each step)."""
    device: torch.device = torch.device("cpu")
    """Where the stages run (and the step's loss is reduced over ``pp``)."""


class BatchTokenMeanLoss:
    """A schedule's per-microbatch loss ``loss_sum_fn(out, target) * microbatches /
    num_targets`` with ``num_targets`` the target count of the whole batch (module
    docstring); ``pipeline_step`` sets it before each step."""

    def __init__(
        self, loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, microbatches
    ) -> None:
        self.loss_sum_fn = loss_sum_fn
        self.microbatches = microbatches
        self.num_targets: torch.Tensor | float = 1.0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_sum_fn(outputs, targets) * (self.microbatches / self.num_targets)


def pipeline_step(
    schedule: Any,
    *,
    info: PipelineInfo,
    dims: ParallelDims,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    stage_kwargs: dict[str, torch.Tensor] | None = None,
    ignore_index: int = -100,
    backward: bool = True,
) -> torch.Tensor:
    """One schedule step (forward and backward of every microbatch) on this dp rank's batch;
    with ``backward=False`` forward only (``schedule.eval``, no gradients: validation).

    Args:
        inputs: ``tokens_BT`` (read on the rank holding the first stage).
        targets: ``targets_BT`` with ``ignore_index`` where nothing is predicted (read on the
            rank holding the last stage; every rank may pass them).
        stage_kwargs: keyword arguments of every stage's ``forward``, per-token ``[B, T]``
            tensors of the whole batch (``document_ids_BT``, ``position_ids_BT``,
            ``lang_ids_BT``): the schedule splits them along dim 0 like ``inputs`` and hands
            microbatch i's slices to every stage with microbatch i, so each stage builds the
            same document masks and positions as the unsplit model. Pass them on every pp
            rank (each holds the same batch).

    Returns:
        The batch's per-token mean loss, on every pp rank (``pipeline_loss``). Gradients are
        those of that mean plus each MoE layer's per-microbatch-mean aux loss.
    """
    losses: list[torch.Tensor] = []
    if info.has_last:
        info.loss_fn.num_targets = (targets != ignore_index).sum().clamp(min=1).float()
    args = (inputs,) if info.has_first else ()
    kwargs = dict(stage_kwargs or {})
    if info.has_last:
        kwargs.update(target=targets, losses=losses)
    if backward:
        schedule.step(*args, **kwargs)
    else:
        with torch.no_grad():
            schedule.eval(*args, **kwargs)
    return pipeline_loss(losses, info=info, dims=dims)


def pipeline_loss(losses: list[torch.Tensor], *, info: PipelineInfo, dims: ParallelDims):
    """The step's loss on every pp rank: mean of the last stage's microbatch losses (plain
    tensors, or replicated DTensors under ``loss_parallel``; each ``sum * M / N`` from
    ``pipeline_step``, so the mean is the batch's per-token mean), sent over ``pp`` (a plain
    fp32 scalar)."""
    import torch.distributed as dist

    from parallel.parallelize import local_value

    value = torch.zeros((), dtype=torch.float32, device=info.device)
    if info.has_last:
        value = torch.stack([local_value(loss.detach()).float() for loss in losses]).mean()
        value = value.to(info.device)
    if dims.pp > 1:
        dist.all_reduce(value, group=dims["pp"].get_group())
    return value
