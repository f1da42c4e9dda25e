"""Parallel layout configuration: the ``parallel`` section of a run config.

What to call: :class:`ParallelConfig` (one typed field per ``parallel.*`` key, each with its
docstring) is loaded as part of the run config (``pretrain.config.load_config``);
``validate_parallel(cfg.parallel, world_size=n)`` checks it before anything is built and
returns the resolved degrees ``{"pp", "dp_replicate", "dp_shard", "tp", "ep"}`` (``dp_shard``
-1 filled in with what the other degrees leave; without ``world_size`` it stays -1). Every
mistake raises one ``ValueError`` line naming the key, its value and the rule broken; nothing
is rewritten silently. ``MULTI_STAGE_SCHEDULES`` / ``V_SCHEDULES`` name the pipeline schedules
that need ``parallel.stages_per_rank`` >= 2 / == 2.

Mesh axes are ``pp``, ``dp_replicate``, ``dp_shard`` and ``tp``; their product is the world size.
``ep`` (expert parallel) is not a separate axis: it is drawn from the fully-sharded
data-parallel ranks, so it must divide ``dp_shard``; with ``ep_over_tp`` from the dp_shard and
tp ranks together, so it must be a multiple of ``tp`` and ``ep / tp`` must divide ``dp_shard``
(layout in ``parallel/mesh.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_pipeline.config import check_choices

PpSchedule = Literal[
    "1F1B",
    "GPipe",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]
# Schedules with several stages per rank: looped ones (stages r, r + pp, ...) need >= 2,
# V-shaped ones exactly 2 (stages r and 2 * pp - 1 - r).
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


@dataclass
class ParallelConfig:
    """Parallel degrees and how they are applied (``parallel.*``)."""

    dp_replicate: int = 1
    """Replicated data-parallel degree (DDP, or the outer axis of HSDP)."""
    dp_shard: int = -1
    """Fully-sharded data-parallel degree (FSDP2); -1 takes what the other degrees leave."""
    tp: int = 1
    """Tensor-parallel degree (with sequence parallel on the norms when sequence_parallel)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    ep: int = 1
    """Expert-parallel degree, drawn from the dp_shard ranks (must divide dp_shard)."""
    ep_over_tp: bool = False
    """Draw ep from the dp_shard and tp ranks together (ep a multiple of tp, ep / tp dividing
    dp_shard): tokens are split over tp inside the MoE and experts are not tp-sharded."""
    pp_schedule: PpSchedule = "1F1B"
    """torch.distributed.pipelining schedule: 1F1B, GPipe, Interleaved1F1B, LoopedBFS,
    InterleavedZeroBubble, ZBVZeroBubble, DualPipeV."""
    microbatches: int | None = None
    """Pipeline microbatches per step; None means pp."""
    stages_per_rank: int = 1
    """Virtual pipeline stages per rank (interleaved and V schedules need 2 or more)."""
    stage_layers: list[int] | None = None
    """Layers per pipeline stage (length pp * stages_per_rank); None splits evenly."""
    sequence_parallel: bool = True
    """Shard norms and dropout over the sequence inside TP regions."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """none | full (every block) | selective (every other block)."""
    compile: bool = False
    """torch.compile each block."""
    cpu_offload: bool = False
    """FSDP2 CPU offload (``CPUOffloadPolicy``): sharded parameters, gradients and optimizer
    state live on the host and the optimizer steps there (AdamW unfused); each FSDP unit's
    parameters are copied to the device for its compute. Needs parallel.dp_shard > 1. With
    engine=deepspeed: ZeRO-Offload (optimizer state on the host; stage 3 also parameters)."""
    engine: Literal["torch", "deepspeed"] = "torch"
    """Data-parallel engine: torch (FSDP2 / HSDP / DDP, with TP, PP and EP) | deepspeed (ZeRO,
    data parallel only; the extra rosetta[deepspeed])."""
    zero_stage: int = 2
    """engine=deepspeed: ZeRO stage 1 (optimizer state sharded), 2 (+ gradients), 3 (+
    parameters)."""


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"parallel.{key} ({value}) must be >= 1")


def validate_parallel(cfg: ParallelConfig, *, world_size: int | None = None) -> dict[str, int]:
    """Check the parallel section and resolve its degrees against ``world_size``.

    Returns:
        The resolved degrees ``{"pp", "dp_replicate", "dp_shard", "tp", "ep"}`` (``dp_shard``
        filled in when it was -1). Without ``world_size`` a -1 stays -1.

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    for key in ("dp_replicate", "tp", "pp", "ep", "stages_per_rank"):
        _positive(key, getattr(cfg, key))
    if cfg.dp_shard != -1 and cfg.dp_shard < 1:
        raise ValueError(f"parallel.dp_shard ({cfg.dp_shard}) must be >= 1, or -1 for the rest")
    check_choices(cfg, "parallel")
    multi_stage = cfg.pp_schedule in MULTI_STAGE_SCHEDULES
    v_schedule = cfg.pp_schedule in V_SCHEDULES
    if cfg.pp > 1 and v_schedule and cfg.stages_per_rank != 2:
        raise ValueError(
            f"parallel.stages_per_rank ({cfg.stages_per_rank}) must be 2 with "
            f"parallel.pp_schedule={cfg.pp_schedule}"
        )
    if cfg.pp > 1 and multi_stage and cfg.stages_per_rank < 2:
        raise ValueError(
            f"parallel.stages_per_rank ({cfg.stages_per_rank}) must be >= 2 with "
            f"parallel.pp_schedule={cfg.pp_schedule}"
        )
    if cfg.pp > 1 and not (multi_stage or v_schedule) and cfg.stages_per_rank != 1:
        raise ValueError(
            f"parallel.stages_per_rank ({cfg.stages_per_rank}) must be 1 with "
            f"parallel.pp_schedule={cfg.pp_schedule}"
        )
    if cfg.ep_over_tp and cfg.tp == 1:
        raise ValueError("parallel.ep_over_tp (True) needs parallel.tp (1) > 1")
    if cfg.ep_over_tp and cfg.ep % cfg.tp != 0:
        raise ValueError(
            f"parallel.ep ({cfg.ep}) must be a multiple of parallel.tp ({cfg.tp}) with "
            "parallel.ep_over_tp"
        )
    microbatches = cfg.microbatches if cfg.microbatches is not None else cfg.pp
    _positive("microbatches", microbatches)
    if cfg.pp > 1 and microbatches < cfg.pp:
        raise ValueError(
            f"parallel.microbatches ({microbatches}) must be >= parallel.pp ({cfg.pp})"
        )
    if cfg.stage_layers is not None:
        num_stages = cfg.pp * cfg.stages_per_rank
        if len(cfg.stage_layers) != num_stages:
            raise ValueError(
                f"parallel.stage_layers ({list(cfg.stage_layers)}) must list {num_stages} stages "
                f"(parallel.pp x parallel.stages_per_rank)"
            )
        if any(n < 0 for n in cfg.stage_layers):
            raise ValueError(
                f"parallel.stage_layers ({list(cfg.stage_layers)}) must not be negative"
            )

    dp_shard = cfg.dp_shard
    if world_size is not None:
        if world_size < 1:
            raise ValueError(f"world size ({world_size}) must be >= 1")
        fixed = cfg.dp_replicate * cfg.tp * cfg.pp
        if dp_shard == -1:
            if world_size % fixed != 0:
                raise ValueError(
                    f"parallel.dp_replicate ({cfg.dp_replicate}) x parallel.tp ({cfg.tp}) x "
                    f"parallel.pp ({cfg.pp}) = {fixed} must divide the world size ({world_size})"
                )
            dp_shard = world_size // fixed
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"parallel.dp_replicate ({cfg.dp_replicate}) x parallel.dp_shard ({dp_shard}) x "
                f"parallel.tp ({cfg.tp}) x parallel.pp ({cfg.pp}) = {fixed * dp_shard} must "
                f"equal the world size ({world_size})"
            )
        # ep is drawn from the dp_shard ranks, and the tp ranks with ep_over_tp
        # (parallel/mesh.py documents the layout).
        if cfg.ep_over_tp and dp_shard % (cfg.ep // cfg.tp) != 0:
            raise ValueError(
                f"parallel.ep ({cfg.ep}) / parallel.tp ({cfg.tp}) = {cfg.ep // cfg.tp} must "
                f"divide parallel.dp_shard ({dp_shard}) with parallel.ep_over_tp"
            )
        if not cfg.ep_over_tp and dp_shard % cfg.ep != 0:
            raise ValueError(f"parallel.ep ({cfg.ep}) must divide parallel.dp_shard ({dp_shard})")
    if cfg.engine == "deepspeed":
        _validate_deepspeed(cfg)
    elif cfg.cpu_offload and dp_shard == 1:
        # Offload moves FSDP2's shards to the host: without sharding there is no FSDP unit.
        raise ValueError(
            "parallel.cpu_offload (True) needs FSDP: parallel.dp_shard (1) must be > 1"
        )
    return {
        "pp": cfg.pp,
        "dp_replicate": cfg.dp_replicate,
        "dp_shard": dp_shard,
        "tp": cfg.tp,
        "ep": cfg.ep,
    }


def _validate_deepspeed(cfg: ParallelConfig) -> None:
    """What DeepSpeed's ZeRO engine cannot combine with: our TP/PP/EP meshes and HSDP."""
    if cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage ({cfg.zero_stage}) must be one of 1, 2, 3")
    for key in ("tp", "pp", "ep", "dp_replicate"):
        value = getattr(cfg, key)
        if value != 1:
            raise ValueError(
                f"parallel.{key} ({value}) must be 1 with parallel.engine=deepspeed: ZeRO is "
                "data parallel only (use engine=torch for TP/PP/EP/HSDP)"
            )
    if cfg.compile:
        raise ValueError("parallel.compile (True) must be false with parallel.engine=deepspeed")
