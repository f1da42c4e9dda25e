"""The dry-run planner: validate a layout for N ranks in one process and estimate memory.

What to call: ``plan_layout(build_stage, cfg=cfg.parallel, tp_plan=plan, world_size=n)`` (what
``pretrain.train --dry-run`` runs) -> ``{"degrees", "mesh", "dp", "edp", "data_parallel",
"cpu_offload", "per_pp_rank": [...], "params_local_max", "memory_bytes_max"}``; it raises
``ValueError`` (one line) for a layout invalid for ``n`` ranks and ``RuntimeError`` when the
process already has a process group (it starts the fake one itself and destroys it before
returning, or raising). ``memory_estimate(num_params, cpu_offload=...)`` -> bytes by kind;
``local_param_count(model)`` / ``local_expert_count(model, tp_plan)`` count the elements this
rank holds; ``format_bytes(num)`` prints GiB (MiB below 1 GiB).

A fake process group (``torch.testing._internal.distributed.fake_pg``: collectives are no-ops)
of ``world_size`` ranks lets ``ParallelDims`` build the real mesh and ``apply_parallelism`` run
TP/SP, EP and FSDP2 on meta models of each pipeline stage, exactly as a real run would; the local
DTensor shapes of rank 0's coordinates on the other axes then give the per-rank parameter count.
Nothing is materialised and nothing is computed.

Memory estimate per rank (bytes): parameters and gradients in the parameter dtype (fp32 master
weights under FSDP2 mixed precision), AdamW's two fp32 states. Activations are not estimated.
Grouped experts count what FSDP2 leaves after sharding them over ``ep`` x ``dp_shard_mod_ep``
(x ``tp``, except with ``parallel.ep_over_tp``, where ep already spans tp and experts are whole);
the other parameters over ``dp_shard`` (x ``tp``). With ``parallel.cpu_offload`` (FSDP2 CPU
offload) the sharded parameters, their gradients and the optimizer state are all on the host:
``host`` counts them and ``device`` (what stays on the accelerator of that state) drops by as
much; the unsharded parameters of the FSDP unit being computed, like activations, are not
estimated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import apply_parallelism
from parallel.pipeline import stage_ids_of_rank
from parallel.tensor_parallel import matching_modules

GIB = 1024**3


def local_param_count(model: nn.Module) -> int:
    """Parameter elements this rank holds (DTensor local shards; works on meta)."""
    total = 0
    for param in model.parameters():
        total += param.to_local().numel() if isinstance(param, DTensor) else param.numel()
    return total


def local_expert_count(model: nn.Module, tp_plan: dict[str, str]) -> int:
    """Elements of the grouped-expert parameters (plan style ``experts``) this rank holds."""
    patterns = [pattern for pattern, style in tp_plan.items() if style == "experts"]
    return sum(
        local_param_count(model.get_submodule(path)) for path in matching_modules(model, patterns)
    )


def memory_estimate(
    num_params: int,
    *,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    optim_bytes: int = 8,
    cpu_offload: bool = False,
) -> dict[str, int]:
    """``{"params", "grads", "optimizer", "total", "host", "device"}`` in bytes for
    ``num_params`` local elements (defaults: fp32 parameters and gradients, AdamW's two fp32
    states). ``total`` is the sum of the three; ``host`` the part of it kept in host memory
    (all of it with ``cpu_offload``, else 0) and ``device`` the rest, so that with offload the
    device saves ``host`` bytes."""
    out = {
        "params": num_params * param_bytes,
        "grads": num_params * grad_bytes,
        "optimizer": num_params * optim_bytes,
    }
    out["total"] = sum(out.values())
    out["host"] = out["total"] if cpu_offload else 0
    out["device"] = out["total"] - out["host"]
    return out


def plan_layout(
    build_stage: Callable[[int, int], nn.Module],
    *,
    cfg: ParallelConfig,
    tp_plan: dict[str, str],
    world_size: int,
) -> dict:
    """Validate ``cfg`` for ``world_size`` ranks and estimate each pipeline rank's memory.

    Args:
        build_stage: ``(stage, num_stages) -> model`` on the meta device (the whole model when
            ``num_stages == 1``); called once per stage.
        tp_plan: the family's TP plan.

    Returns:
        ``{"degrees", "mesh", "dp", "edp", "data_parallel", "cpu_offload", "per_pp_rank":
        [{"pp_rank", "stages", "params_local", "params_local_experts", "memory_bytes"}],
        "params_local_max", "memory_bytes_max"}`` (``params_local_experts`` is the part of
        ``params_local`` in grouped experts; ``memory_bytes`` as :func:`memory_estimate`).

    Raises:
        ValueError: the layout is invalid for ``world_size`` (one line).
        RuntimeError: a process group is already initialised in this process.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = ParallelDims.from_config(cfg, world_size=world_size)
    if dist.is_initialized():
        raise RuntimeError("the dry-run planner needs a process without a process group")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        dims.build_mesh(device_type="cpu")
        num_stages = dims.pp * cfg.stages_per_rank
        stage_params, stage_experts = [], []
        for stage in range(num_stages):
            model = build_stage(stage, num_stages)
            apply_parallelism(model, dims=dims, cfg=cfg, tp_plan=tp_plan)
            stage_params.append(local_param_count(model))
            stage_experts.append(local_expert_count(model, tp_plan))
    finally:
        dist.destroy_process_group()
    per_rank = []
    for pp_rank in range(dims.pp):
        stages = stage_ids_of_rank(
            pp_rank, pp=dims.pp, stages_per_rank=cfg.stages_per_rank, schedule=cfg.pp_schedule
        )
        params_local = sum(stage_params[s] for s in stages)
        per_rank.append(
            {
                "pp_rank": pp_rank,
                "stages": stages,
                "params_local": params_local,
                "params_local_experts": sum(stage_experts[s] for s in stages),
                "memory_bytes": memory_estimate(params_local, cpu_offload=cfg.cpu_offload),
            }
        )
    worst = max(per_rank, key=lambda r: r["params_local"])
    return {
        "degrees": dims.degrees(),
        "mesh": {
            "pp": dims.pp,
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "tp": dims.tp,
        },
        "dp": dims.dp,
        "edp": dims.edp,
        "data_parallel": dims.data_parallel_mode,
        "cpu_offload": cfg.cpu_offload,
        "per_pp_rank": per_rank,
        "params_local_max": worst["params_local"],
        "memory_bytes_max": worst["memory_bytes"],
    }


def format_bytes(num: int) -> str:
    """``num`` bytes as GiB with two decimals (MiB below 1 GiB)."""
    return f"{num / GIB:.2f} GiB" if num >= GIB else f"{num / 1024**2:.1f} MiB"
