"""Apply parallelism to a plain model built on the meta device.

What to call: ``parallelize_model(model, dims=, cfg=, tp_plan=, seed=)`` on a meta model (it
materialises and initialises it: every layout gives the unsharded model's values);
``apply_parallelism`` for the same without materialising (the dry-run planner);
``loss_context(dims)`` around a loss of vocabulary-sharded logits; ``clip_grad_norm_`` /
``grad_norm_stat`` for the norm over every axis; ``reduce_metric`` for per-axis metrics. The model
is reached only through the plan's submodule paths (``pretrain.models.parallel_plan``): its
``block`` entries are the units of checkpointing, compile and FSDP2.

Order, as in DESIGN.md:

    (pipeline split, by ``parallel.pipeline``) -> TP/SP -> EP -> activation checkpointing ->
    torch.compile -> FSDP2 / HSDP / DDP -> ``to_empty`` -> ``init_weights(seed)``

and the training-step helpers that must know the layout: the loss context for vocabulary-sharded
logits, gradient clipping over every axis and per-axis metric reduction.

Data parallel: ``dp_shard > 1`` -> FSDP2 ``fully_shard`` per block then the root (HSDP over
``(dp_replicate, dp_shard)`` when ``dp_replicate > 1``); only ``dp_replicate > 1`` -> DDP
(composable ``replicate``), or HSDP with one-rank shards when tp gives DTensor parameters (DDP
does not take DTensors). Expert-parallel modules (ep > 1) get their own inner FSDP2 unit over
the expert data-parallel axis ``dp_shard_mod_ep`` (HSDP with ``dp_replicate``), as torchtitan
does, so expert memory per rank drops by ``ep x dp_shard_mod_ep``. Every data-parallel engine
averages gradients over ``dp`` (experts: over ``dp_shard_mod_ep``, with the 1/ep backward scale
of ``parallel.expert_parallel``, which together give the same mean): a caller that wants the
gradient of a global token sum over N multiplies each rank's summed loss by ``dp / N``
(``pretrain.trainer``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from parallel.config import ParallelConfig
from parallel.expert_parallel import apply_experts_parallel
from parallel.mesh import ParallelDims
from parallel.tensor_parallel import apply_tp, matching_modules


def parallelize_model(
    model: nn.Module,
    *,
    dims: ParallelDims,
    cfg: ParallelConfig,
    tp_plan: dict[str, str],
    seed: int,
    device: torch.device | str = "cpu",
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Parallelize ``model`` (a ``pretrain.models.Transformer`` or a pipeline stage of one, on
    the meta device) in place, materialise it on ``device`` and initialise it from ``seed``.

    Args:
        dims: the layout, with its mesh built (``dims.build_mesh()``).
        cfg: the ``parallel`` section (sequence_parallel, activation_checkpointing, compile).
        tp_plan: the family's plan (``pretrain.models.tp_plan(cfg)``: pattern -> style);
            also names the grouped-experts modules (style ``experts``).
        seed: ``init_weights`` seed; every layout gives the unsharded model's values.
        param_dtype, reduce_dtype: FSDP2 mixed precision (None: the parameters' dtype).

    With ``cfg.cpu_offload`` (FSDP2's ``CPUOffloadPolicy``) the sharded parameters, their
    gradients and so the optimizer state live on the host: the model is materialised on the CPU
    and only its buffers move to ``device``; FSDP2 copies each unit's parameters to the device
    for its forward and backward.

    Returns:
        ``model`` itself (FSDP2 and ``replicate`` keep module identity and parameter names).

    Raises:
        ValueError: a plan style the model asks for that is not supported.
    """
    apply_parallelism(
        model,
        dims=dims,
        cfg=cfg,
        tp_plan=tp_plan,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )
    if cfg.cpu_offload:
        model.to_empty(device="cpu")
        model.init_weights(seed)
        # Buffers (rotary tables, ...) are not FSDP-managed: they stay on the compute device.
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def apply_parallelism(
    model: nn.Module,
    *,
    dims: ParallelDims,
    cfg: ParallelConfig,
    tp_plan: dict[str, str],
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> None:
    """TP/SP -> EP -> activation checkpointing -> compile -> FSDP2/HSDP/DDP on a meta model,
    without materialising it (the dry-run planner reads the local shapes it leaves). Arguments
    as in ``parallelize_model``."""
    if dims.tp > 1:
        apply_tp(model, tp_plan, tp_mesh=dims["tp"], sequence_parallel=cfg.sequence_parallel)
    expert_modules: list[nn.Module] = []
    if "experts" in tp_plan.values():
        expert_modules = apply_experts_parallel(
            model,
            tp_plan,
            ep_mesh=dims["ep"] if dims.ep > 1 else None,
            tp_mesh=dims["tp"] if dims.tp > 1 else None,
            ep_tp_mesh=(
                dims["ep", "tp"] if dims.ep > 1 and dims.tp > 1 and not dims.ep_over_tp else None
            ),
            sequence_parallel=cfg.sequence_parallel,
            ep_over_tp=dims.ep_over_tp,
        )
    apply_activation_checkpointing(model, mode=cfg.activation_checkpointing, tp_plan=tp_plan)
    blocks = [model.get_submodule(path) for path in block_paths(model, tp_plan)]
    if cfg.compile:
        for block in blocks:
            block.compile()
    _apply_data_parallel(
        model,
        blocks=blocks,
        dims=dims,
        expert_modules=expert_modules,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        cpu_offload=cfg.cpu_offload,
    )


def block_paths(model: nn.Module, tp_plan: dict[str, str]) -> list[str]:
    """Paths of the model's blocks: the submodules its plan names with style ``block`` (the
    units of activation checkpointing, compile and per-block FSDP2), in module order."""
    return matching_modules(model, [p for p, style in tp_plan.items() if style == "block"])


def apply_activation_checkpointing(model: nn.Module, *, mode: str, tp_plan: dict[str, str]) -> None:
    """Wrap the plan's blocks (``block_paths``) in non-reentrant activation checkpointing:
    ``full`` every block, ``selective`` every other block (0, 2, ...), ``none`` nothing.

    Raises:
        ValueError: an unknown mode.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(
            f"parallel.activation_checkpointing ({mode!r}) must be none|full|selective"
        )
    for index, path in enumerate(block_paths(model, tp_plan)):
        if mode == "full" or index % 2 == 0:
            parent_path, _, key = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, key, checkpoint_wrapper(getattr(parent, key), preserve_rng_state=True))


def _apply_data_parallel(
    model: nn.Module,
    *,
    blocks: list[nn.Module],
    dims: ParallelDims,
    expert_modules: list[nn.Module],
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    cpu_offload: bool = False,
) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mode = dims.data_parallel_mode
    if cpu_offload and mode != "fsdp":
        # validate_parallel refuses this first; an internal caller that skipped it lands here.
        raise ValueError(
            f"parallel.cpu_offload (True) needs FSDP: parallel.dp_shard ({dims.dp_shard}) > 1"
        )
    if mode == "none":
        return
    if mode == "ddp":
        from torch.distributed._composable.replicate import replicate

        replicate(model, process_group=dims["dp"].get_group())
        return
    dp_mesh = dims["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else dims["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    policy: dict = {}
    if cpu_offload:
        # Pinned host memory needs an accelerator; a CPU-only torch cannot pin.
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    experts = {id(module) for module in expert_modules}
    for block in blocks:
        for module in block.modules():
            if id(module) in experts:
                # The inner FSDP unit first: the block's fully_shard then skips its parameters.
                _shard_experts(module, dims=dims, mp_policy=mp, policy=policy)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, **policy)
    # The root keeps its parameters (embeddings, output) unsharded after forward: backward
    # needs them next.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, **policy)


def _shard_experts(
    module: nn.Module, *, dims: ParallelDims, mp_policy, policy: dict | None = None
) -> None:
    """FSDP2 on an expert-parallel module over the expert data-parallel axis (torchtitan's
    ``dp_mod_ep`` mesh): ``dp_shard_mod_ep`` shards, ``dp_replicate`` replicates (HSDP).

    Each weight's ep-local ``[L, ...]`` tensor is sharded on dim 0 (local experts) when there
    are at least as many local experts as shards, else on dim 1 (no rank holds an empty shard;
    FSDP2 needs dim 1 to divide evenly, else dim 0 is kept).
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if dims.dp_replicate > 1:
        edp_mesh = dims["dp_replicate", "dp_shard_mod_ep"]
    else:
        edp_mesh = dims["dp_shard_mod_ep"]
    shards = dims.dp_shard_mod_ep

    def placement(param: nn.Parameter) -> Shard:
        shape = param.to_local().shape if isinstance(param, DTensor) else param.shape
        if shape[0] < shards and len(shape) > 1 and shape[1] % shards == 0:
            return Shard(1)
        return Shard(0)

    fully_shard(
        module,
        mesh=edp_mesh,
        mp_policy=mp_policy,
        shard_placement_fn=placement,
        **(policy or {}),
    )


# ---------------------------------------------------------------------------------------------
# training-step helpers


def loss_context(dims: ParallelDims | None) -> contextlib.AbstractContextManager:
    """Enter around the loss **and** ``backward()``: ``loss_parallel()`` when ``tp > 1`` (the
    logits are a ``Shard(2)`` DTensor and cross-entropy runs on the vocabulary shards), else a
    no-op. Under it the loss is a replicated DTensor: read it with ``.full_tensor()``."""
    if dims is not None and dims.tp > 1:
        return loss_parallel()
    return contextlib.nullcontext()


def local_value(loss: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``loss`` (a DTensor from ``loss_parallel`` or a tensor)."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def _unique_params(parts: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for part in parts:
        for param in part.parameters():
            if id(param) not in seen and param.grad is not None:
                seen.add(id(param))
                params.append(param)
    return params


def _is_shard(placement: Placement) -> bool:
    # _StridedShard (FSDP2 over tensor parallel) is not a Shard subclass.
    return isinstance(placement, (Shard, _StridedShard))


def _group_over_mesh(mesh: DeviceMesh, dims: ParallelDims | None) -> dist.ProcessGroup | None:
    """A process group over exactly the ranks of ``mesh`` (an N-D DTensor mesh): the world, or
    one of the flattened views of ``dims``; None when there is none."""
    ranks = sorted(mesh.mesh.flatten().tolist())
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    if dims is not None and dims.mesh is not None:
        for axis in ("dp", "dp_shard", "edp", "ep"):
            view = dims[axis]
            if sorted(view.mesh.flatten().tolist()) == ranks:
                return view.get_group()
    return None


def _local_stat(tensors: list[torch.Tensor], *, inf: bool, device: torch.device) -> torch.Tensor:
    """Sum of squares (max of absolute values when ``inf``) of ``tensors`` in fp32."""
    stat = torch.zeros((), dtype=torch.float32, device=device)
    for tensor in tensors:
        if tensor.numel() == 0:
            continue
        if inf:
            stat = torch.maximum(stat, tensor.detach().abs().max().float().to(device))
        else:
            norm = torch.linalg.vector_norm(tensor.detach(), 2.0, dtype=torch.float32)
            stat = stat + norm.to(device) ** 2
    return stat


def grad_norm_stat(
    params: Iterable[nn.Parameter],
    *,
    dims: ParallelDims | None,
    norm_type: float = 2.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The squared 2-norm (the max-norm when ``norm_type`` is inf) of the gradients of
    ``params`` over every axis but ``pp``: a plain fp32 scalar on ``device``, equal on the
    ranks of one pipeline stage.

    Gradients are grouped by ``(device mesh, placements)``, as torchtitan's
    ``clip_grad_norm_`` groups them: each group's local sum of squares is one number, summed over
    its ``Shard`` axes and counted once on its ``Replicate`` axes; a group with ``Partial``
    axes (sequence-parallel norms without FSDP) first sums its gradients, concatenated, with one
    all-reduce per partial axis. Groups that reduce over the same process group share one
    all-reduce, so there is at most one collective per group (plus one per partial axis).
    Plain gradients are replicas: no collective.
    """
    inf = norm_type == float("inf")
    groups: dict[tuple, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            key = (grad.device_mesh, tuple(grad.placements))
            groups.setdefault(key, []).append(grad.to_local())
        else:
            plain.append(grad)
        if device is None:
            device = (grad.to_local() if isinstance(grad, DTensor) else grad).device
    device = torch.device("cpu") if device is None else device
    total = _local_stat(plain, inf=inf, device=device)
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    # process group -> this rank's part of the groups reduced over it
    pending: dict[dist.ProcessGroup, torch.Tensor] = {}
    for (mesh, placements), locals_ in groups.items():
        partial_axes = [i for i, p in enumerate(placements) if p.is_partial()]
        if partial_axes:
            flat = torch.cat([t.detach().reshape(-1).float() for t in locals_])
            for axis in partial_axes:
                reduce_op = placements[axis].reduce_op
                assert reduce_op in ("sum", "avg"), f"partial gradient reduced by {reduce_op}"
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(axis))
                if reduce_op == "avg":
                    flat /= mesh.size(axis)
            locals_ = [flat]
        stat = _local_stat(locals_, inf=inf, device=device)
        shard_axes = [i for i, p in enumerate(placements) if _is_shard(p)]
        if not shard_axes:
            group, copies = None, 1
        elif len(shard_axes) == 1:
            group, copies = mesh.get_group(shard_axes[0]), 1
        else:
            group = _group_over_mesh(mesh, dims)
            # Summed over the whole mesh: a shard is held once per coordinate of the other axes.
            copies = mesh.size() // math.prod(mesh.size(i) for i in shard_axes)
            if group is None:  # no group spans the mesh: reduce axis by axis
                for axis in shard_axes:
                    dist.all_reduce(stat, op=op, group=mesh.get_group(axis))
                group, copies = None, 1
        if group is None:
            total = torch.maximum(total, stat) if inf else total + stat
            continue
        if copies > 1 and not inf:
            stat = stat / copies
        if group in pending:
            previous = pending[group]
            pending[group] = torch.maximum(previous, stat) if inf else previous + stat
        else:
            pending[group] = stat
    for group, stat in pending.items():
        dist.all_reduce(stat, op=op, group=group)
        total = torch.maximum(total, stat) if inf else total + stat
    return total


@torch.no_grad()
def clip_grad_norm_(
    parts: nn.Module | Iterable[nn.Module],
    *,
    max_norm: float,
    dims: ParallelDims | None,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Clip the gradients of ``parts`` (a model, or this rank's pipeline stages) to a global
    ``max_norm`` and return the total norm before clipping (a plain fp32 scalar on the
    gradients' device, equal on every rank). No host sync: the norm stays on the device.

    The norm is taken over every mesh axis with one all-reduce per group of gradients sharing
    a device mesh and placements (:func:`grad_norm_stat`: FSDP shards, TP shards, ``Partial``
    sums of sequence-parallel norms, EP expert shards; a value replicated on an axis is counted
    once; plain gradients are replicas), then one over ``pp`` for the stages.

    Raises:
        ValueError: ``norm_type`` other than 2 or inf.
    """
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"norm_type ({norm_type}) must be 2 or inf")
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    params = _unique_params(parts)
    inf = norm_type == float("inf")
    total = grad_norm_stat(params, dims=dims, norm_type=norm_type)
    if dims is not None and dims.pp > 1:
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=dims["pp"].get_group())
    total_norm = total if inf else total.sqrt()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for param in params:
        grad = param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        by_kind.setdefault((local.device, local.dtype), []).append(local)
    for (device, dtype), tensors in by_kind.items():
        torch._foreach_mul_(tensors, coef.to(device=device, dtype=dtype))
    return total_norm


def reduce_metric(
    value: torch.Tensor | float,
    *,
    dims: ParallelDims | None,
    axis: str = "dp",
    op: str = "mean",
) -> torch.Tensor:
    """Reduce a per-rank metric over ``axis`` (``dp``, ``pp``, ``tp``, ``ep``, ...):
    ``mean``, ``sum`` or ``max``. Without a layout the value is returned as a tensor.

    Dtypes: a Python int or float, and an integer tensor other than int64, are reduced in
    float64 (exact counts up to 2**53); an int64 tensor keeps int64 for ``sum`` / ``max``
    (its ``mean`` is float64); a float64 tensor stays float64; other floating tensors are
    reduced in fp32.

    Raises:
        ValueError: an unknown ``op``.
    """
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"metric reduction ({op!r}) must be mean, sum or max")
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.float64, torch.int64):
            tensor = value.detach().clone()
        elif not value.dtype.is_floating_point:
            tensor = value.detach().to(torch.float64)
        else:
            tensor = value.detach().to(torch.float32, copy=True)
    else:
        tensor = torch.tensor(value, dtype=torch.float64)
    if dims is None:
        return tensor
    mesh = dims[axis]
    if mesh.size() == 1:
        return tensor
    dist.all_reduce(
        tensor,
        op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
        group=mesh.get_group(),
    )
    if op != "mean":
        return tensor
    if not tensor.dtype.is_floating_point:
        tensor = tensor.to(torch.float64)
    return tensor / mesh.size()
