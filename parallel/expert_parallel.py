"""Expert parallel (and tensor parallel inside the experts) for ``pretrain.models.moe``.

The MoE layer sorts its token assignments by expert and calls ``experts(x_MD, offs_E=...,
row_experts_M=...)`` on a module holding stacked weights ``w1``/``w3`` ``[E, F, D]``, ``w2``
``[E, D, F]`` and optional ``b1`` ``[E, F]``/``b2`` ``[E, D]``. ``apply_experts_parallel``
finds those modules through the family's TP plan (style ``experts``; parallel/ imports no model
code) and gives each a subclass with ``ParallelExpertsMixin`` (same parameter names, so seeded
init is unchanged) whose forward is:

    x_MD (rows grouped by global expert; replicated over tp)
      -> [tp] identity forward, all-reduce of the gradient (the F-sharded experts each give a
         partial input gradient)
      -> [ep] all-to-all with variable splits: rows for expert e go to the ep rank owning e;
         the received rows are regrouped from (source rank, local expert) to (local expert,
         source rank)
      -> the module's own forward on the local experts (its ``expert_weights`` hook gives the
         local shards, F-sharded under tp; ``complete_output`` all-reduces the partial output
         over tp before ``b2``, the gradient passing unchanged)
      -> [ep] the reverse all-to-all, back to the source rows.

Because the expert output is complete before it leaves, everything outside the experts (router,
gates, aux losses) sees replicated values and gets replicated gradients over tp. Under sequence
parallel the MoE's output is cut back to this rank's sequence chunk.

Parameter placements (DTensors): over ``ep`` experts ``Shard(0)``; over ``tp`` ``w1``/``w3``
``[E, F, D]`` ``Shard(1)``, ``w2`` ``[E, D, F]`` ``Shard(2)``, ``b1`` ``Shard(1)``, ``b2``
``Replicate()``. With ``ep > 1`` data parallel shards the expert modules separately (as
torchtitan does): FSDP2 over the expert data-parallel axis ``dp_shard_mod_ep`` (HSDP with
``dp_replicate``), so each rank keeps ``1 / (ep * dp_shard_mod_ep)`` of the experts' elements
(``1 / tp`` more under tp); see ``parallel.parallelize``. FSDP averages expert gradients over
``edp`` and the forward scales them by 1/ep in backward (each ep rank's gradient sums the
contributions of the ep group's tokens), so together they give the mean over all dp ranks.

With ``parallel.ep_over_tp`` (the ep group spans the tp ranks; ``parallel/mesh.py``) the MoE
runs on this tp rank's chunk of the sequence instead (``TokenSplitMoEMixin``): under sequence
parallel its input is the residual stream's ``Shard(1)`` chunk as it stands (no gather), without
it the replicated input is sliced to the chunk and the output all-gathered. Experts are whole
(no tp sharding, ``Shard(0)`` over the flattened ep axis) and the experts' forward is the ep path
above with ``tp = 1``. What the MoE computes from all of a rank's tokens is summed over tp: the
router gate's gradient (each tp rank routes different tokens), and the load-balancing and z
losses, whose statistics (tokens per expert, probability and squared-logsumexp sums) are
all-reduced so they equal the unsplit layer's. With an expert capacity the queues are the
unsplit layer's too: the ranks' expert choices are all-gathered (a few integers per token) and
queued in the whole sequence's order, capacity taken from the whole sequence. The token mask
(padding) and language ids are cut to the chunk like the tokens. Expert gradients are scaled by
``tp / ep`` in backward: an ep group holds ``ep / tp`` data-parallel ranks' tokens.

Plain expert parallel keeps each rank's MoE call on its own tokens (its own batch slice), so
capacity is what the unsharded layer computes for that rank's tokens; the all-to-all moves the
``E * C`` capacity rows as they are.

Shape legend: M grouped rows, D model width, F expert FFN width, E experts, L local experts,
B batch, T sequence (t: this tp rank's chunk), N tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

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


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ParallelExpertsMixin:
    """Expert- and tensor-parallel forward for a grouped-experts module (see the module
    docstring). Mixed into the module's own class by ``apply_experts_parallel``."""

    ep_group: dist.ProcessGroup | None
    tp_group: dist.ProcessGroup | None
    ep: int
    tp: int
    grad_scale: float
    """``1 / (data-parallel ranks in an ep group)``: ``1 / ep``, or ``tp / ep`` with
    ``ep_over_tp``."""

    def expert_weights(self) -> tuple[torch.Tensor | None, ...]:
        """This rank's local shards of ``(w1, w2, w3, b1, b2)``, gradients scaled by
        ``grad_scale``."""
        return tuple(self._local(p) for p in (self.w1, self.w2, self.w3, self.b1, self.b2))

    def complete_output(self, y_MD: torch.Tensor) -> torch.Tensor:
        """Sum the F shards' partial products over tp."""
        return _ReduceFromGroup.apply(y_MD, self.tp_group) if self.tp > 1 else y_MD

    def _local(self, param: torch.Tensor | None) -> torch.Tensor | None:
        if param is None:
            return None
        local = param.to_local() if isinstance(param, DTensor) else param
        if self.grad_scale != 1.0:
            local = _ScaleGrad.apply(local, self.grad_scale)
        return local

    def forward(
        self,
        x_MD: torch.Tensor,
        *,
        offs_E: torch.Tensor,
        row_experts_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows of ``x_MD`` grouped by global expert (end offsets ``offs_E``) -> ``y_MD``."""
        if self.tp > 1:
            x_MD = _CopyToGroup.apply(x_MD, self.tp_group)
        if self.ep == 1:
            return super().forward(x_MD, offs_E=offs_E, row_experts_M=row_experts_M)

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
        y_local = super().forward(x_recv[order], offs_E=offs_L, row_experts_M=rows_L)
        y_recv = y_local[torch.argsort(order)]
        return all_to_all_single_autograd(y_recv, in_splits, out_splits, self.ep_group)


class TokenSplitMoEMixin:
    """``ep_over_tp``: the MoE layer on this tp rank's sequence chunk (module docstring). Mixed
    into the MoE layer's class (``pretrain.models.moe.MoE``: ``forward``, ``_routing_totals``,
    ``_queue_positions``) by ``apply_experts_parallel``."""

    tp_mesh: DeviceMesh
    sequence_parallel: bool

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        token_mask_BT: torch.Tensor | None = None,
        lang_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_BtD -> y_BtD`` under sequence parallel; else ``x_BTD -> y_BTD`` (replicated). The
        token mask and language ids (whole sequences on every rank) are cut to the chunk."""
        if not self.sequence_parallel:
            x_BTD = _redistribute(x_BTD, self.tp_mesh, Replicate(), Shard(1))
        if token_mask_BT is not None:
            token_mask_BT = _redistribute(token_mask_BT, self.tp_mesh, Replicate(), Shard(1))
        if lang_ids_BT is not None:
            lang_ids_BT = _redistribute(lang_ids_BT, self.tp_mesh, Replicate(), Shard(1))
        y_BTD = super().forward(x_BTD, token_mask_BT=token_mask_BT, lang_ids_BT=lang_ids_BT)
        if not self.sequence_parallel:
            y_BTD = _redistribute(y_BTD, self.tp_mesh, Shard(1), Replicate())
        return y_BTD

    def _routing_totals(self, counts_E, probs_E, z_sum, num_tokens: torch.Tensor):
        """The routing statistics over every tp rank's tokens, so that the aux and z losses
        equal the unsplit layer's. The float sums pass their gradient through unchanged: each
        rank backpropagates its own tokens' share once."""
        group = self.tp_mesh.get_group()
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=group)
        num_tokens = num_tokens.detach().clone()
        dist.all_reduce(num_tokens, group=group)
        return (
            counts_E,
            _ReduceFromGroup.apply(probs_E, group),
            _ReduceFromGroup.apply(z_sum, group),
            num_tokens,
        )

    def _queue_positions(self, experts_A: torch.Tensor, valid_A: torch.Tensor, *, batch: int):
        """Queue places as the unsplit layer gives them: every tp rank's assignments (expert
        ids, -1 where invalid; a few integers per token) are all-gathered and queued in the
        unsplit slot-major order (slot, batch row, position in the whole sequence); capacity
        from the whole sequence's tokens. Needs equal chunks (the sequence divisible by tp)."""
        group = self.tp_mesh.get_group()
        tp, rank = self.tp_mesh.size(), self.tp_mesh.get_local_rank()
        ids_A = torch.where(valid_A, experts_A, -1).contiguous()
        gathered = ids_A.new_empty(tp * ids_A.numel())
        dist.all_gather_into_tensor(gathered, ids_A, group=group)
        # [tp, K, B, t] -> [K, B, tp, t]: the unsplit layer's order of assignments.
        ids_KBRT = gathered.view(tp, self.top_k, batch, -1).permute(1, 2, 0, 3)
        all_A = ids_KBRT.reshape(-1)
        experts_E = torch.arange(self.num_experts, device=all_A.device)
        onehot_AE = (all_A[:, None] == experts_E).long()  # all zero where invalid (-1)
        place_A = (onehot_AE.cumsum(dim=0) - 1).gather(1, all_A.clamp(min=0)[:, None])
        mine_A = place_A.view(self.top_k, batch, tp, -1)[:, :, rank].reshape(-1)
        return mine_A, tp * experts_A.numel() // self.top_k


class TpSummedGateMixin:
    """``ep_over_tp``: the router gate's weight with its gradient summed over tp (each tp rank
    routes different tokens). Mixed into ``pretrain.models.moe.TopKRouter`` (``gate_weight``)."""

    tp_group: dist.ProcessGroup

    def gate_weight(self) -> torch.Tensor:
        return _CopyToGroup.apply(super().gate_weight(), self.tp_group)


def _redistribute(x: torch.Tensor, mesh: DeviceMesh, src, dst) -> torch.Tensor:
    # Replicate -> Shard(1) is a local slice forward, an all-gather backward; the reverse the
    # reverse.
    return DTensor.from_local(x, mesh, [src], run_check=False).redistribute(mesh, [dst]).to_local()


_TP_DIM = {"w1": 1, "w3": 1, "w2": 2, "b1": 1, "b2": None}


_PARALLEL_CLASSES: dict[tuple[type, type], type] = {}


def _parallel_class(cls: type, mixin: type = ParallelExpertsMixin) -> type:
    if issubclass(cls, mixin):
        return cls
    if (cls, mixin) not in _PARALLEL_CLASSES:
        name = f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}"
        _PARALLEL_CLASSES[cls, mixin] = type(name, (mixin, cls), {})
    return _PARALLEL_CLASSES[cls, mixin]


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
    ``tp``). Works on meta.

    Args:
        plan: the family's TP plan (pattern -> style); ``experts`` entries name the modules,
            and their parents are the MoE layers (with a ``router``).
        ep_mesh, tp_mesh: the axes (None or size 1: not parallel on that axis).
        ep_tp_mesh: the 2-D ``("ep", "tp")`` mesh, used when both are > 1 (not with
            ``ep_over_tp``).
        sequence_parallel: the residual stream is sequence-sharded over tp (the MoE output is
            cut back to the chunk; with ``ep_over_tp`` the MoE takes the chunk as it is).
        ep_over_tp: ``ep_mesh`` spans the tp ranks: tokens split over tp inside the MoE,
            experts not tp-sharded (module docstring). The caller leaves the MoE's input
            un-gathered (no ``sequence_to_replicate_input`` on it).

    Returns:
        The expert-parallel modules (ep > 1; empty when ep == 1): data parallel shards them
        over the expert data-parallel axis, not over ``dp_shard``.
    """
    ep = ep_mesh.size() if ep_mesh is not None else 1
    tp = tp_mesh.size() if tp_mesh is not None else 1
    if ep_over_tp:
        return _apply_ep_over_tp(
            model, plan, ep_mesh=ep_mesh, tp_mesh=tp_mesh, sequence_parallel=sequence_parallel
        )
    if ep == 1 and tp == 1:
        return []
    if ep > 1 and tp > 1:
        mesh, lead = ep_tp_mesh, [Shard(0)]
    elif ep > 1:
        mesh, lead = ep_mesh, [Shard(0)]
    else:
        mesh, lead = tp_mesh, []
    sharded: list[nn.Module] = []
    patterns = [pattern for pattern, style in plan.items() if style == "experts"]
    for path in matching_modules(model, patterns):
        module = model.get_submodule(path)
        if tp > 1 and sequence_parallel:
            moe_path = path.rpartition(".")[0]
            model.get_submodule(moe_path).register_forward_hook(_to_sequence_chunk(tp_mesh))
        for name, param in list(module.named_parameters(recurse=False)):
            if name not in _TP_DIM:
                raise ValueError(f"expert parameter {path}.{name} has no expert-parallel layout")
            tp_dim = _TP_DIM[name]
            placements = list(lead)
            if tp > 1:
                placements.append(Shard(tp_dim) if tp_dim is not None else Replicate())
            dparam = nn.Parameter(distribute_tensor(param.data, mesh, placements))
            setattr(module, name, dparam)
        module.__class__ = _parallel_class(type(module))
        module.ep_group = ep_mesh.get_group() if ep > 1 else None
        module.tp_group = tp_mesh.get_group() if tp > 1 else None
        module.ep, module.tp = ep, tp
        module.grad_scale = 1.0 / ep
        if ep > 1:
            sharded.append(module)
    return sharded


def _apply_ep_over_tp(
    model: nn.Module,
    plan: dict[str, str],
    *,
    ep_mesh: DeviceMesh,
    tp_mesh: DeviceMesh,
    sequence_parallel: bool,
) -> list[nn.Module]:
    ep, tp = ep_mesh.size(), tp_mesh.size()
    assert ep % tp == 0 and tp > 1, (ep, tp)  # parallel.config validated the degrees
    sharded: list[nn.Module] = []
    patterns = [pattern for pattern, style in plan.items() if style == "experts"]
    for path in matching_modules(model, patterns):
        module = model.get_submodule(path)
        moe = model.get_submodule(path.rpartition(".")[0])
        moe.__class__ = _parallel_class(type(moe), TokenSplitMoEMixin)
        moe.tp_mesh, moe.sequence_parallel = tp_mesh, sequence_parallel
        moe.router.__class__ = _parallel_class(type(moe.router), TpSummedGateMixin)
        moe.router.tp_group = tp_mesh.get_group()
        for name, param in list(module.named_parameters(recurse=False)):
            if name not in _TP_DIM:
                raise ValueError(f"expert parameter {path}.{name} has no expert-parallel layout")
            dparam = nn.Parameter(distribute_tensor(param.data, ep_mesh, [Shard(0)]))
            setattr(module, name, dparam)
        module.__class__ = _parallel_class(type(module))
        module.ep_group, module.tp_group = ep_mesh.get_group(), None
        module.ep, module.tp = ep, 1
        module.grad_scale = tp / ep
        sharded.append(module)
    return sharded


def _to_sequence_chunk(tp_mesh: DeviceMesh):
    def hook(module: nn.Module, args, out_BTD: torch.Tensor) -> torch.Tensor:
        # Replicate -> Shard(1) is a local slice forward and an all-gather backward.
        full = DTensor.from_local(out_BTD, tp_mesh, [Replicate()], run_check=False)
        return full.redistribute(tp_mesh, [Shard(1)]).to_local()

    return hook
