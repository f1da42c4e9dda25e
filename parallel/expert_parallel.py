"""Expert parallel (and tensor parallel inside the experts) for ``pretrain.models.moe``.

What to call: ``apply_experts_parallel(model, plan, ep_mesh=..., tp_mesh=..., ep_tp_mesh=...,
sequence_parallel=..., ep_over_tp=...)`` after ``parallel.tensor_parallel.apply_tp`` (works on
meta). It applies two ``ParallelStyle``s with ``parallelize_module``, to the modules the family's
plan names: ``ExpertParallel`` on every grouped-experts module (plan style ``experts``) and, on
every MoE layer (plan style ``moe``), ``TokenSplitMoE`` with ``parallel.ep_over_tp`` or, under
sequence parallel without it, the gather of the sequence before the layer and the cut back to
this rank's chunk after it. Guarantees: no module changes class and no method is replaced; the
models compute what the unsharded model computes (the tests in ``tests/distributed`` compare
with a one-process reference), parameter names and seeded initial values are unchanged.

``ExpertParallel`` (``distribute_module``; torchtitan's ``ExpertParallel`` is the example):

    partition fn   the stacked weights ``w1``/``w3`` ``[E, F, D]``, ``w2`` ``[E, D, F]``, ``b1``
                   ``[E, F]``, ``b2`` ``[E, D]`` become DTensors: over ``ep`` ``Shard(0)``
                   (experts); over ``tp`` ``w1``/``w3``/``b1`` ``Shard(1)``, ``w2`` ``Shard(2)``,
                   ``b2`` ``Replicate()``; it sets the module's ``weight_grad_scale`` and, under
                   tp, ``partial_output_sum`` (see ``pretrain.models.moe.GroupedExperts``).
    input fn       token dispatch: rows ``x_MD`` grouped by global expert (replicated over tp;
                   identity forward, the gradient all-reduced over tp, since the F-sharded
                   experts each give a partial input gradient) go to the ep rank owning their
                   expert (all-to-all with variable splits) and are regrouped from (source rank,
                   local expert) to (local expert, source rank) order.
    module         its own forward on the local experts (``partial_output_sum`` all-reduces the
                   partial down projection over tp before ``b2``).
    output fn      combine: the reverse all-to-all, back to the source rows.

Because the expert output is complete before it leaves, everything outside the experts (router,
gates, aux losses) sees replicated values and gets replicated gradients over tp. With ``ep > 1``
data parallel shards the expert modules separately (torchtitan does the same): FSDP2 over the
expert data-parallel axis ``dp_shard_mod_ep`` (HSDP with ``dp_replicate``); see
``parallel.parallelize``. FSDP averages expert gradients over ``edp`` and ``weight_grad_scale``
(1/ep) scales them in backward (each ep rank's gradient sums the contributions of the ep group's
tokens), so together they give the mean over all dp ranks.

``TokenSplitMoE`` (``parallel.ep_over_tp``: the ep group spans the tp ranks) runs the MoE layer
on this tp rank's chunk of the sequence: under sequence parallel its input is the residual
stream's ``Shard(1)`` chunk as it stands (no gather); without it the replicated input is sliced
to the chunk and the output all-gathered. The token mask (padding) and language ids are cut to
the chunk like the tokens. It sets the layer's public seam ``MoE.token_split`` to a
``TpTokenSplit``: the router gate's gradient is summed over tp (each tp rank routes different
tokens), the routing statistics behind the load-balancing and z losses are all-reduced so that
they equal the unsplit layer's, and with an expert capacity the queues are the unsplit layer's
too (the ranks' expert choices are all-gathered, a few integers per token, and queued in the
whole sequence's order, capacity taken from the whole sequence). Experts are whole (no tp
sharding, ``Shard(0)`` over the flattened ep axis); their gradients are scaled by ``tp / ep``:
an ep group holds ``ep / tp`` data-parallel ranks' tokens.

Plain expert parallel keeps each rank's MoE call on its own tokens (its own batch slice), so
capacity is what the unsharded layer computes for that rank's tokens; the all-to-all moves the
``E * C`` capacity rows as they are.

Shape legend: M grouped rows, D model width, F expert FFN width, E experts, L local experts,
B batch, T sequence (t: this tp rank's chunk), N tokens, K top-k slots, A assignments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    parallelize_module,
)

from parallel.tensor_parallel import matching_modules


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; the gradient passes unchanged (it is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumOverGroup:
    """``y -> all-reduce(y)`` over ``group``, the gradient unchanged (``partial_output_sum``)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, y_MD: torch.Tensor) -> torch.Tensor:
        return _ReduceFromGroup.apply(y_MD, self.group)


_TP_DIM = {"w1": 1, "w3": 1, "w2": 2, "b1": 1, "b2": None}


class ExpertParallel(ParallelStyle):
    """Grouped experts over ``ep`` (and their FFN width over ``tp``): see the module docstring.

    Apply with ``parallelize_module(experts, mesh, ExpertParallel(...))``, one instance per
    module (the dispatch keeps the splits for the combine), where ``mesh`` is the mesh of the
    weights: ``ep_mesh``, ``tp_mesh`` or the 2-D ``("ep", "tp")`` mesh when both are > 1.

    Args:
        ep_mesh, tp_mesh: the axes (None or size 1: not parallel on that axis).
        weight_grad_scale: the experts' ``weight_grad_scale`` (1 / data-parallel ranks whose
            tokens an ep group holds).

    Raises (from ``parallelize_module``):
        ValueError: an expert parameter without a layout here.
    """

    def __init__(
        self,
        *,
        ep_mesh: DeviceMesh | None,
        tp_mesh: DeviceMesh | None,
        weight_grad_scale: float,
    ) -> None:
        super().__init__()
        self.ep = ep_mesh.size() if ep_mesh is not None else 1
        self.tp = tp_mesh.size() if tp_mesh is not None else 1
        self.ep_group = ep_mesh.get_group() if self.ep > 1 else None
        self.tp_group = tp_mesh.get_group() if self.tp > 1 else None
        self.weight_grad_scale = weight_grad_scale
        self._order: torch.Tensor | None = None
        self._splits: tuple[list[int], list[int]] | None = None

    def _placements(self, name: str) -> list:
        placements = [Shard(0)] if self.ep > 1 else []
        if self.tp > 1:
            tp_dim = _TP_DIM[name]
            placements.append(Shard(tp_dim) if tp_dim is not None else Replicate())
        return placements

    def _partition_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        if name:  # the experts module's own parameters only
            return
        for key, param in list(module.named_parameters(recurse=False)):
            if key not in _TP_DIM:
                raise ValueError(f"expert parameter {key} has no expert-parallel layout")
            placements = self._placements(key)
            assert len(placements) == device_mesh.ndim, (placements, device_mesh)
            dparam = nn.Parameter(distribute_tensor(param.data, device_mesh, placements))
            module.register_parameter(key, dparam)
        module.weight_grad_scale = self.weight_grad_scale
        module.partial_output_sum = _SumOverGroup(self.tp_group) if self.tp > 1 else None

    def _token_dispatch(self, module: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
        x_MD, offs_E, *rest = inputs
        row_experts_M = rest[0] if rest else None
        if self.tp > 1:
            x_MD = _CopyToGroup.apply(x_MD, self.tp_group)
        if self.ep == 1:
            return x_MD, offs_E, row_experts_M
        num_local = offs_E.numel() // self.ep
        counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1, dtype=torch.int64))
        # recv_counts[src * L + e]: rows rank src sends for my local expert e.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.ep_group)
        in_splits = counts_E.view(self.ep, num_local).sum(1).tolist()
        out_splits = recv_counts.view(self.ep, num_local).sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_MD, out_splits, in_splits, self.ep_group)

        # Regroup received rows from (source, local expert) to (local expert, source) order.
        segment = torch.repeat_interleave(
            torch.arange(self.ep * num_local, device=x_MD.device), recv_counts
        )
        key = (segment % num_local) * self.ep + segment // num_local
        order = torch.argsort(key, stable=True)
        local_counts_L = recv_counts.view(self.ep, num_local).sum(0)
        offs_L = local_counts_L.cumsum(0).to(torch.int32)
        rows_L = torch.repeat_interleave(
            torch.arange(num_local, device=x_MD.device), local_counts_L
        )
        self._order, self._splits = order, (in_splits, out_splits)
        return x_recv[order], offs_L, rows_L

    def _token_combine(
        self, module: nn.Module, y_local: torch.Tensor, device_mesh: DeviceMesh
    ) -> torch.Tensor:
        if self.ep == 1:
            return y_local
        order, (in_splits, out_splits) = self._order, self._splits
        self._order = self._splits = None
        y_recv = y_local[torch.argsort(order)]
        return all_to_all_single_autograd(y_recv, in_splits, out_splits, self.ep_group)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partition_fn=self._partition_fn,
            input_fn=self._token_dispatch,
            output_fn=self._token_combine,
        )


class TpTokenSplit:
    """A ``pretrain.models.moe.TokenSplit`` (a protocol: parallel/ imports no model code) over
    the tp ranks, each routing its chunk of the sequence (equal chunks: T divisible by tp)."""

    def __init__(self, tp_mesh: DeviceMesh) -> None:
        self.tp_mesh = tp_mesh
        self.group = tp_mesh.get_group()

    def sum_gradient(self, weight: torch.Tensor) -> torch.Tensor:
        return _CopyToGroup.apply(weight, self.group)

    def routing_totals(self, counts_E, probs_E, z_sum, num_tokens):
        """The statistics over every tp rank's tokens. The float sums pass their gradient
        through unchanged: each rank backpropagates its own tokens' share once."""
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=self.group)
        num_tokens = num_tokens.detach().clone()
        dist.all_reduce(num_tokens, group=self.group)
        return (
            counts_E,
            _ReduceFromGroup.apply(probs_E, self.group),
            _ReduceFromGroup.apply(z_sum, self.group),
            num_tokens,
        )

    def queue_positions(self, experts_A, valid_A, *, batch: int, top_k: int, num_experts: int):
        """Every tp rank's assignments (expert ids, -1 where invalid) are all-gathered and
        queued in the unsplit slot-major order (slot, batch row, position in the whole
        sequence); capacity from the whole sequence's tokens."""
        tp, rank = self.tp_mesh.size(), self.tp_mesh.get_local_rank()
        ids_A = torch.where(valid_A, experts_A, -1).contiguous()
        gathered = ids_A.new_empty(tp * ids_A.numel())
        dist.all_gather_into_tensor(gathered, ids_A, group=self.group)
        # [tp, K, B, t] -> [K, B, tp, t]: the unsplit layer's order of assignments.
        ids_KBRT = gathered.view(tp, top_k, batch, -1).permute(1, 2, 0, 3)
        all_A = ids_KBRT.reshape(-1)
        experts_E = torch.arange(num_experts, device=all_A.device)
        onehot_AE = (all_A[:, None] == experts_E).long()  # all zero where invalid (-1)
        place_A = (onehot_AE.cumsum(dim=0) - 1).gather(1, all_A.clamp(min=0)[:, None])
        mine_A = place_A.view(top_k, batch, tp, -1)[:, :, rank].reshape(-1)
        return mine_A, tp * experts_A.numel() // top_k


class TokenSplitMoE(ParallelStyle):
    """``parallel.ep_over_tp``: the MoE layer on this tp rank's sequence chunk (module
    docstring). Apply with ``parallelize_module(moe, tp_mesh, TokenSplitMoE(...))``: sets
    ``moe.token_split`` and registers the input slicing (tokens, ``token_mask_BT``,
    ``lang_ids_BT``) and, without sequence parallel, the all-gather of the output.

    Args:
        sequence_parallel: the residual stream is already this rank's chunk.
    """

    def __init__(self, *, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.token_split = TpTokenSplit(device_mesh)
        sequence_parallel = self.sequence_parallel

        def split_inputs(mod: nn.Module, args: tuple, kwargs: dict):
            x_BTD, *rest = args
            if not sequence_parallel:
                x_BTD = _redistribute(x_BTD, device_mesh, Replicate(), Shard(1))
            kwargs = dict(kwargs)
            for key in ("token_mask_BT", "lang_ids_BT"):
                if kwargs.get(key) is not None:
                    kwargs[key] = _redistribute(kwargs[key], device_mesh, Replicate(), Shard(1))
            return (x_BTD, *rest), kwargs

        module.register_forward_pre_hook(split_inputs, with_kwargs=True)
        if not sequence_parallel:
            module.register_forward_hook(
                lambda mod, args, y_BtD: _redistribute(y_BtD, device_mesh, Shard(1), Replicate())
            )
        return module


def _redistribute(x: torch.Tensor, mesh: DeviceMesh, src, dst) -> torch.Tensor:
    # Replicate -> Shard(1) is a local slice forward, an all-gather backward; the reverse the
    # reverse.
    return DTensor.from_local(x, mesh, [src], run_check=False).redistribute(mesh, [dst]).to_local()


def apply_experts_parallel(
    model: nn.Module,
    plan: dict[str, str],
    *,
    ep_mesh: DeviceMesh | None,
    tp_mesh: DeviceMesh | None,
    ep_tp_mesh: DeviceMesh | None,
    sequence_parallel: bool,
    ep_over_tp: bool = False,
) -> list[nn.Module]:
    """Shard the grouped experts of ``model`` (plan style ``experts``) over ``ep`` (and
    ``tp``) and prepare its MoE layers (plan style ``moe``). Works on meta.

    Args:
        plan: the family's TP plan (pattern -> style).
        ep_mesh, tp_mesh: the axes (None or size 1: not parallel on that axis).
        ep_tp_mesh: the 2-D ``("ep", "tp")`` mesh, used when both are > 1 (not with
            ``ep_over_tp``).
        sequence_parallel: the residual stream is sequence-sharded over tp (the MoE layer
            gathers its input and cuts its output back to the chunk; with ``ep_over_tp`` it
            takes the chunk as it is).
        ep_over_tp: ``ep_mesh`` spans the tp ranks: tokens split over tp inside the MoE,
            experts not tp-sharded (module docstring).

    Returns:
        The expert-parallel modules (ep > 1; empty when ep == 1): data parallel shards them
        over the expert data-parallel axis, not over ``dp_shard``.

    Raises:
        ValueError: an expert parameter without an expert-parallel layout.
    """
    ep = ep_mesh.size() if ep_mesh is not None else 1
    tp = tp_mesh.size() if tp_mesh is not None else 1
    moe_paths = matching_modules(model, [p for p, style in plan.items() if style == "moe"])
    expert_paths = matching_modules(model, [p for p, style in plan.items() if style == "experts"])
    if ep_over_tp:
        assert ep % tp == 0 and tp > 1, (ep, tp)  # parallel.config validated the degrees
        for path in moe_paths:
            parallelize_module(
                model.get_submodule(path),
                tp_mesh,
                TokenSplitMoE(sequence_parallel=sequence_parallel),
            )
        for path in expert_paths:
            style = ExpertParallel(ep_mesh=ep_mesh, tp_mesh=None, weight_grad_scale=tp / ep)
            parallelize_module(model.get_submodule(path), ep_mesh, style)
        return [model.get_submodule(path) for path in expert_paths]
    if tp > 1 and sequence_parallel:
        # The layer's input is gathered to the whole sequence, its (replicated) output cut back.
        gather = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
        cut = PrepareModuleOutput(
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True
        )
        for path in moe_paths:
            parallelize_module(model.get_submodule(path), tp_mesh, gather)
            parallelize_module(model.get_submodule(path), tp_mesh, cut)
    if ep == 1 and tp == 1:
        return []
    if ep > 1 and tp > 1:
        mesh = ep_tp_mesh
    elif ep > 1:
        mesh = ep_mesh
    else:
        mesh = tp_mesh
    for path in expert_paths:
        style = ExpertParallel(
            ep_mesh=ep_mesh if ep > 1 else None,
            tp_mesh=tp_mesh if tp > 1 else None,
            weight_grad_scale=1.0 / ep,
        )
        parallelize_module(model.get_submodule(path), mesh, style)
    return [model.get_submodule(path) for path in expert_paths] if ep > 1 else []
