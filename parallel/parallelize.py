"""Apply parallelism to a plain model built on the meta device, in the order of DESIGN.md:

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
averages gradients over ``dp``, so the loss each rank backpropagates is the mean over its own
tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallel.config import ParallelConfig
from parallel.expert_parallel import apply_experts_parallel
from parallel.mesh import ParallelDims
from parallel.tensor_parallel import apply_tp


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
        plan = tp_plan
        if dims.ep_over_tp:
            # The MoE runs on this rank's sequence chunk: its input is not gathered.
            moe_layers = {p.rpartition(".")[0] for p, s in tp_plan.items() if s == "experts"}
            plan = {p: s for p, s in tp_plan.items() if p not in moe_layers}
        apply_tp(model, plan, tp_mesh=dims["tp"], sequence_parallel=cfg.sequence_parallel)
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
    apply_activation_checkpointing(model, mode=cfg.activation_checkpointing)
    if cfg.compile:
        for block in model.layers.values():
            block.compile()
    _apply_data_parallel(
        model,
        dims=dims,
        expert_modules=expert_modules,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )


def apply_activation_checkpointing(model: nn.Module, *, mode: str) -> None:
    """Wrap blocks in non-reentrant activation checkpointing: ``full`` every block,
    ``selective`` every other block (0, 2, ...), ``none`` nothing.

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
    for index, key in enumerate(list(model.layers.keys())):
        if mode == "full" or index % 2 == 0:
            model.layers[key] = checkpoint_wrapper(model.layers[key], preserve_rng_state=True)


def _apply_data_parallel(
    model: nn.Module,
    *,
    dims: ParallelDims,
    expert_modules: list[nn.Module],
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mode = dims.data_parallel_mode
    if mode == "none":
        return
    if mode == "ddp":
        from torch.distributed._composable.replicate import replicate

        replicate(model, process_group=dims["dp"].get_group())
        return
    dp_mesh = dims["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else dims["dp_shard"]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    experts = {id(module) for module in expert_modules}
    for block in model.layers.values():
        for module in block.modules():
            if id(module) in experts:
                # The inner FSDP unit first: the block's fully_shard then skips its parameters.
                _shard_experts(module, dims=dims, mp_policy=mp)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    # The root keeps its parameters (embeddings, output) unsharded after forward: backward
    # needs them next.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


def _shard_experts(module: nn.Module, *, dims: ParallelDims, mp_policy) -> None:
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

    fully_shard(module, mesh=edp_mesh, mp_policy=mp_policy, shard_placement_fn=placement)


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

    Each DTensor gradient's norm is taken over its own mesh (FSDP shards, TP shards, ``Partial``
    sums of sequence-parallel norms, EP expert shards), so a value replicated on an axis is
    counted once; plain gradients are replicas. Stage norms are then summed over ``pp``.

    Raises:
        ValueError: ``norm_type`` other than 2 or inf.
    """
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"norm_type ({norm_type}) must be 2 or inf")
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    params = _unique_params(parts)
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param in params:
        grad = param.grad
        norm = torch.linalg.vector_norm(grad, norm_type)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norm = norm.float().to(device)
        total = torch.maximum(total, norm) if norm_type == float("inf") else total + norm**2
    if dims is not None and dims.pp > 1:
        op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=dims["pp"].get_group())
    total_norm = total if norm_type == float("inf") else total.sqrt()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for param in params:
        grad = param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(coef.to(device=local.device, dtype=local.dtype))
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

    Reduced in fp32, except a float64 or int64 tensor, which keeps its dtype (counts such as
    tokens per language summed over many ranks stay exact past fp32's 2**24).

    Raises:
        ValueError: an unknown ``op``.
    """
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float64, torch.int64):
        tensor = value.detach().clone()
    else:
        tensor = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"metric reduction ({op!r}) must be mean, sum or max")
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
    return tensor / mesh.size() if op == "mean" else tensor
