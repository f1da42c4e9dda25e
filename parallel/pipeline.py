"""Pipeline parallel with ``torch.distributed.pipelining``: stage layout and schedules.

What to call::

    schedule, stage_models, info = build_pipeline(
        build_stage, dims=dims, cfg=cfg.parallel, tp_plan=plan, seed=s,
        token_loss_fn=f,  # or loss_sum_fn=g: exactly one of the two
    )
    loss = pipeline_step(schedule, info=info, dims=dims, inputs=tokens_BT, targets=labels_BT,
                         stage_kwargs={...}, num_targets=N, grad_scale=dp,
                         groups_BT=groups_BT, num_groups=G)

Guarantees: ``pipeline_step`` is a collective of the pp group (every pp rank calls it on the
same dp rank's batch; ``backward=False`` runs forward only, for validation) and returns on
every pp rank the batch's summed per-token loss over N as a plain fp32 scalar; the gradients
are those of that value times ``grad_scale`` (plus each MoE layer's per-microbatch-mean aux
loss); with the step's global target count as N and ``grad_scale = dp`` that is one process on
the concatenated global batch (below).
``build_pipeline`` raises ``ValueError`` for an unknown schedule name or when not exactly one
of ``loss_sum_fn`` / ``token_loss_fn`` is given. ``stage_ids_of_rank(pp_rank, pp=...,
stages_per_rank=..., schedule=...)`` gives the stages a rank holds (the table below).

Stages: ``num_stages = pp * stages_per_rank`` contiguous runs of layers (the first stage also
holds the embeddings, the last the final norm and output projection). Stage -> rank:

    single-stage schedules (1F1B, GPipe)            rank r: stage r
    looped (Interleaved1F1B, LoopedBFS,
            InterleavedZeroBubble)                  rank r: stages r, r + pp, r + 2 pp, ...
    V schedules (ZBVZeroBubble, DualPipeV)          rank r: stages r and 2 pp - 1 - r, so the
                                                    last stage (the loss) is on rank 0

Loss normalisation (``pipeline_step``). The schedules are built with ``scale_grads=False``:
torch's default divides every gradient by the microbatch count M at the end of each
``schedule.step``, the gradients accumulated by earlier steps included, which would shrink all
but the last gradient-accumulation micro-batch of an optimizer step. The loss of microbatch i
is ``sum_i * grad_scale / N`` instead: its summed per-token loss over N, a target count the
caller gives (``num_targets``). The training loop passes the global count of the optimizer step
(every gradient-accumulation micro-batch, every dp rank) and ``grad_scale = dp`` (the
data-parallel engines average gradients over dp): the gradient is then that of one process on
the concatenated global batch, even when pipeline microbatches, accumulation micro-batches and
dp ranks hold different numbers of targets (MLM masks, padding). Without ``num_targets`` N is
this rank's batch count (its per-token mean). ``pipeline_step`` returns ``sum / N`` over the
batch on every pp rank.

Per-group sums (``pipeline_step``'s ``groups_BT``): the schedule splits only what it is handed,
so the group of every target (the trainer's objective index * languages + language index)
travels in the target tensor itself, ``[B, T, 2]`` = (label, group), and the last stage's loss
adds each microbatch's per-token losses and target counts into ``num_groups`` bins; the sums then
reach every pp rank (zeros from the other stages, summed over pp).

MoE auxiliary losses need no plumbing across stages: each MoE layer attaches its weighted
aux/z loss to its output, and a stage's backward adds ``aux_loss_scale`` times its gradient.
``build_pipeline`` sets ``aux_loss_scale = 1 / M`` on every stage (the trainer sets ``1 / (M *
grad_accum)``), so the aux term of the gradient is the mean of the M per-microbatch aux losses,
the same as gradient accumulation over those M microbatches. (A load-balancing loss is a
product of per-batch statistics, so a microbatch's value differs from the whole batch's;
Megatron also takes it per microbatch.)

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

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from parallel.config import V_SCHEDULES, ParallelConfig
from parallel.mesh import ParallelDims


def stage_ids_of_rank(pp_rank: int, *, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages held by ``pp_rank`` (see the module docstring); ``stages_per_rank``
    follows ``parallel.config.validate_parallel``'s rules (2 for a V schedule)."""
    if schedule in V_SCHEDULES and pp > 1:
        assert stages_per_rank == 2, "validate_parallel: a V schedule has 2 stages per rank"
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
    loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    token_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Any, list[nn.Module], PipelineInfo]:
    """Build this rank's stages (each parallelized with ``parallelize_model``) and the schedule.

    Args:
        build_stage: ``(stage, num_stages) -> model`` on the meta device, pruned to the stage
            (``pretrain.models.prune_to_stage``).
        loss_sum_fn: ``(logits, targets) -> summed per-token loss`` of one microbatch (e.g.
            ``F.cross_entropy(..., reduction="sum")``); ``pipeline_step`` divides it by a target
            count (module docstring). Under ``tp > 1`` the logits are a ``Shard(2)``
            DTensor over the vocabulary and ``schedule.step`` runs inside ``loss_parallel()``,
            so a plain ``F.cross_entropy`` works on them (the losses it returns are replicated
            DTensors; ``pipeline_loss`` reads them).
        token_loss_fn: instead of ``loss_sum_fn``, ``(logits, targets) -> per-token losses``
            ``[B * T]`` (0 at ``ignore_index``; e.g. ``reduction="none"``): the loss is their sum,
            and ``pipeline_step`` can also sum them per group (``groups_BT``).

    Returns:
        ``(schedule, stage_models, info)``. Run a step with ``pipeline_step(schedule, info=info,
        ...)`` on this dp rank's batch; it is split into ``parallel.microbatches`` along dim 0.

    Raises:
        ValueError: an unknown schedule name; not exactly one of ``loss_sum_fn`` and
            ``token_loss_fn``.
    """
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    from parallel.parallelize import parallelize_model

    if (loss_sum_fn is None) == (token_loss_fn is None):
        raise ValueError("build_pipeline needs exactly one of loss_sum_fn and token_loss_fn")
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
            _stage_class(PipelineStage)(
                model, stage_id, num_stages, torch.device(device), group=dims["pp"].get_group()
            )
        )
    microbatches = cfg.microbatches if cfg.microbatches is not None else dims.pp
    loss_fn = BatchTokenMeanLoss(
        loss_sum_fn, token_loss_fn=token_loss_fn, microbatches=microbatches, device=device
    )
    for model in models:
        if hasattr(model, "set_moe_aux_loss_scale"):
            model.set_moe_aux_loss_scale(1.0 / microbatches)
    if dims.tp > 1:
        # The last stage's logits are vocabulary-sharded (Shard(2)): the loss and the backward
        # the schedule runs from it must both be inside loss_parallel (torchtitan enters it
        # around the whole step too).
        schedule_cls = _loss_parallel_class(schedule_cls)
    if cfg.pp_schedule in SINGLE_STAGE_SCHEDULES:
        stages_arg = stages[0]
    else:
        stages_arg = stages
    # scale_grads=False: the loss is normalised by the caller's count (module docstring).
    schedule = schedule_cls(
        stages_arg, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False
    )
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


def _stage_class(cls: type) -> type:
    """``PipelineStage`` whose first-step metadata inference (torch runs one extra forward of
    each stage, on the first microbatch, to learn the shapes it sends) runs in eval mode: that
    forward is not a training forward, so it must not count in what layers accumulate over
    training forwards (MoE routing statistics) nor draw training randomness (dropout)."""
    if not hasattr(cls, "_forward_metadata_inference"):
        return cls

    class EvalMetadataStage(cls):
        def _forward_metadata_inference(self, *args, **kwargs):
            training = self.submod.training
            self.submod.train(False)
            try:
                return super()._forward_metadata_inference(*args, **kwargs)
            finally:
                self.submod.train(training)

    return EvalMetadataStage


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
    """A schedule's per-microbatch loss ``sum * grad_scale / num_targets``, with
    ``sum`` the microbatch's summed per-token loss and ``num_targets`` / ``grad_scale`` set by
    ``pipeline_step`` before each step (module docstring).

    Targets are ``[b, T]`` labels, or ``[b, T, 2]`` (label, group) when ``pipeline_step`` got
    ``groups_BT``; then (``token_loss_fn`` only) each call's per-token losses and target counts
    are binned per group, and :meth:`collect_groups` adds those of the calls whose losses the
    schedule returned into ``group_sums_G`` / ``group_counts_G`` (``[num_groups]`` fp32). (The
    schedule also calls the loss while it infers the stages' metadata, on its first step, on
    tensors that are no microbatch: those calls must not count.)
    """

    def __init__(
        self,
        loss_sum_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        *,
        token_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        microbatches: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.loss_sum_fn = loss_sum_fn
        self.token_loss_fn = token_loss_fn
        self.microbatches = microbatches
        self.device = torch.device(device)
        self.num_targets: torch.Tensor | float = 1.0
        self.grad_scale: float = 1.0
        self.ignore_index = -100
        self.group_sums_G = torch.zeros(0, device=self.device)
        self.group_counts_G = torch.zeros(0, device=self.device)
        self._calls: list[tuple[weakref.ref, torch.Tensor, torch.Tensor]] = []

    def reset_groups(self, num_groups: int) -> None:
        """Zero the per-group sums (``num_groups`` bins; 0: no group accounting)."""
        self.group_sums_G = torch.zeros(num_groups, dtype=torch.float32, device=self.device)
        self.group_counts_G = torch.zeros(num_groups, dtype=torch.float32, device=self.device)
        self._calls.clear()

    def collect_groups(self, losses: list[torch.Tensor]) -> None:
        """Add the per-group sums of the calls that returned one of ``losses`` (the schedule's
        microbatch losses) into ``group_sums_G`` / ``group_counts_G``; forget every call."""
        for ref, sums_G, counts_G in self._calls:
            loss = ref()
            if loss is not None and any(loss is returned for returned in losses):
                self.group_sums_G += sums_G
                self.group_counts_G += counts_G
        self._calls.clear()

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        groups = None
        if targets.dim() == 3:
            targets, groups = targets[..., 0], targets[..., 1]
        if self.token_loss_fn is None:
            total = self.loss_sum_fn(outputs, targets)
        else:
            from parallel.parallelize import local_value

            loss_N = self.token_loss_fn(outputs, targets)
            total = loss_N.sum()
        loss = total * (self.grad_scale / self.num_targets)
        if groups is not None and self.token_loss_fn is not None and self.group_sums_G.numel():
            group_N = groups.flatten().to(self.group_sums_G.device)
            valid_N = (targets.flatten() != self.ignore_index).float().to(group_N.device)
            per_token = local_value(loss_N.detach()).float().to(group_N.device)
            zeros_G = torch.zeros_like(self.group_sums_G)
            self._calls.append(
                (
                    weakref.ref(loss),
                    zeros_G.index_add(0, group_N, per_token),
                    zeros_G.index_add(0, group_N, valid_N),
                )
            )
        return loss


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
    num_targets: torch.Tensor | float | None = None,
    grad_scale: float = 1.0,
    groups_BT: torch.Tensor | None = None,
    num_groups: int = 0,
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
        num_targets: N, the count each microbatch's summed loss is divided by (a scalar, a
            tensor on the stages' device): the training loop's global count of the optimizer
            step. None: this batch's own target count (a per-token mean over this rank's batch).
        grad_scale: multiplies each microbatch's loss (not the returned value): the dp degree
            the data-parallel engines average gradients over, when ``num_targets`` is global.
        groups_BT: ``[B, T]`` int64 group index of every target, in ``[0, num_groups)``
            (``build_pipeline`` with ``token_loss_fn``): the step's per-group loss sums and
            target counts are then ``info.loss_fn.group_sums_G`` / ``group_counts_G``, on every
            pp rank.

    Returns:
        The batch's summed per-token loss over N (with N None: the batch's per-token mean), a
        plain fp32 scalar on every pp rank (``pipeline_loss``). Gradients are those of that
        value times ``grad_scale``, plus each MoE layer's per-microbatch-mean aux loss.
    """
    losses: list[torch.Tensor] = []
    loss_fn = info.loss_fn
    loss_fn.ignore_index = ignore_index
    loss_fn.grad_scale = grad_scale
    loss_fn.reset_groups(num_groups if groups_BT is not None else 0)
    if num_targets is None:
        num_targets = (targets != ignore_index).sum().clamp(min=1).float()
    loss_fn.num_targets = num_targets
    args = (inputs,) if info.has_first else ()
    kwargs = dict(stage_kwargs or {})
    if info.has_last:
        if groups_BT is not None:
            targets = torch.stack([targets, groups_BT.to(targets.device, targets.dtype)], dim=-1)
        kwargs.update(target=targets, losses=losses)
    if backward:
        schedule.step(*args, **kwargs)
    else:
        with torch.no_grad():
            schedule.eval(*args, **kwargs)
    loss_fn.collect_groups(losses)
    return pipeline_loss(losses, info=info, dims=dims, with_groups=groups_BT is not None)


def pipeline_loss(
    losses: list[torch.Tensor], *, info: PipelineInfo, dims: ParallelDims, with_groups=False
) -> torch.Tensor:
    """The step's loss on every pp rank: the last stage's microbatch losses (plain tensors, or
    replicated DTensors under ``loss_parallel``; each ``sum * grad_scale / N`` from
    ``pipeline_step``) summed and divided by ``grad_scale``, i.e. the batch's summed loss
    over N, sent over ``pp`` (a plain fp32 scalar). ``with_groups``: the loss function's
    per-group sums and counts travel in the same all-reduce and land on every pp rank."""
    import torch.distributed as dist

    from parallel.parallelize import local_value

    loss_fn = info.loss_fn
    value = torch.zeros((), dtype=torch.float32, device=info.device)
    if info.has_last:
        value = torch.stack([local_value(loss.detach()).float() for loss in losses]).sum()
        value = value.to(info.device) / loss_fn.grad_scale
    if dims.pp > 1:
        if with_groups:
            packed = torch.cat([value.reshape(1), loss_fn.group_sums_G, loss_fn.group_counts_G])
            dist.all_reduce(packed, group=dims["pp"].get_group())
            num_groups = loss_fn.group_sums_G.numel()
            value = packed[0]
            loss_fn.group_sums_G = packed[1 : 1 + num_groups]
            loss_fn.group_counts_G = packed[1 + num_groups :]
        else:
            dist.all_reduce(value, group=dims["pp"].get_group())
    return value
