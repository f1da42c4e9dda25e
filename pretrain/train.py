"""The main job: ``torchrun --nproc-per-node N -m pretrain.train --config X [key=value ...]``.

What to call: the command above (or ``main(argv)``, which returns the exit code instead of
exiting); ``--dry-run --world-size N [--json]`` validates the config and the parallel layout for
N ranks in one process without building anything on a device (``plan(cfg, world_size=N)``, which
raises ``ValueError`` for a config or layout invalid for N ranks).

Exit codes: 0 done, 2 bad config or input (one line on stderr, no traceback), 3 stopped on
NaN/Inf (too many non-finite losses in a row, or non-finite weights at a save: nothing
non-finite is ever saved), 75 stopped by SIGTERM/SIGUSR1 after checkpointing.

Order: parse and validate the config (before anything is built) -> print and save the resolved
config -> mesh -> model -> parallelize -> loader -> optimizer -> loop.

Before anything is built or written, the config is validated and what the run reads is checked
(``pretrain.config.check_run_inputs``: manifests, tokenizer, vocabulary, ``train.resume``, the
run directory); the run directory is written only once the run is built.

DCP checkpoints (``train.resume``) are trusted input: their metadata is a pickle.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from parallel.dist import destroy_distributed, init_distributed
from pretrain.config import RunConfig, check_run_inputs, load_config, validate_config

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pretrain.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pre-train a Rosetta model. Launch with torchrun for several processes.",
        epilog="Overrides are section.key=value pairs, before or after the options, e.g. "
        "model.num_layers=2 parallel.tp=2 train.steps=100. A fresh start (train.resume=none) "
        "into a run directory holding checkpoints or metrics is refused unless "
        "train.overwrite=true (which moves them aside). DCP checkpoints (train.resume) are "
        "trusted input: their metadata is a pickle, so resume only from checkpoints you trust. "
        "Exit codes: 0 done, 2 bad config or input, 3 stopped on NaN/Inf (nothing non-finite "
        "saved), 75 stopped by SIGTERM/SIGUSR1 after checkpointing.",
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate config and parallel layout for --world-size ranks, build nothing",
    )
    parser.add_argument(
        "--world-size", type=int, default=None, help="ranks to plan for (with --dry-run)"
    )
    parser.add_argument("--json", action="store_true", help="print the dry-run plan as JSON")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser


def plan(cfg: RunConfig, *, world_size: int) -> dict:
    """The layout of a run on ``world_size`` ranks, for ``--dry-run``: validated degrees, the
    mesh built on a fake process group, meta models of each pipeline stage parallelized as a
    real run would, ``params_total`` / ``params_active`` and per-rank memory estimates
    (``parallel.planner``). Builds nothing on a device and computes nothing.

    Raises:
        ValueError: the config or the layout is invalid for ``world_size``.
    """

    from parallel.planner import plan_layout
    from pretrain.models import param_counts, tp_plan
    from pretrain.stages import build_stage_model

    degrees = validate_config(cfg, world_size=world_size)

    def build_stage(stage: int, num_stages: int):
        return build_stage_model(cfg, stage, num_stages)

    layout = plan_layout(
        build_stage, cfg=cfg.parallel, tp_plan=tp_plan(cfg.model), world_size=world_size
    )
    return {
        "world_size": world_size,
        "mesh": {axis: degrees[axis] for axis in ("pp", "dp_replicate", "dp_shard", "tp")},
        "ep": degrees["ep"],
        "ep_over_tp": cfg.parallel.ep_over_tp,
        "family": cfg.model.family,
        "objective": dict(cfg.objective.weights),
        "seq_len": cfg.data.seq_len,
        "global_batch_sequences": cfg.data.batch_size
        * degrees["dp_replicate"]
        * degrees["dp_shard"]
        * cfg.train.grad_accum,
        **param_counts(build_stage(0, 1)),
        "data_parallel": _data_parallel_engine(cfg, layout["data_parallel"]),
        "pp_schedule": cfg.parallel.pp_schedule if degrees["pp"] > 1 else None,
        "per_rank": layout["per_pp_rank"],
        "params_per_rank_max": layout["params_local_max"],
        "memory_per_rank_bytes": layout["memory_bytes_max"],
    }


def _data_parallel_engine(cfg: RunConfig, torch_mode: str) -> str:
    par = cfg.parallel
    if par.engine != "deepspeed":
        return torch_mode
    offload = " with CPU offload" if par.cpu_offload else ""
    return (
        f"deepspeed ZeRO-{par.zero_stage}{offload} (memory below is the FSDP2 estimate; "
        f"ZeRO-1/2 keep whole parameters on every rank)"
    )


def _print_plan(result: dict, *, as_json: bool) -> None:
    from parallel.planner import format_bytes

    if as_json:
        print(json.dumps(result, indent=2))
        return
    mesh = " x ".join(f"{axis} {size}" for axis, size in result["mesh"].items())
    ep = f"ep {result['ep']}" + (", drawn from dp_shard x tp" if result["ep_over_tp"] else "")
    print(f"world size {result['world_size']}: {mesh} ({ep})")
    print(f"data parallel: {result['data_parallel']}; pipeline schedule: {result['pp_schedule']}")
    print(f"family {result['family']}, objective {result['objective']}")
    print(
        f"global batch {result['global_batch_sequences']} sequences of {result['seq_len']} tokens"
    )
    print(f"params_total {result['params_total']:,}  params_active {result['params_active']:,}")
    for row in result["per_rank"]:
        mem = row["memory_bytes"]
        print(
            f"pp rank {row['pp_rank']} (stages {row['stages']}): {row['params_local']:,} params"
            f"/rank; params {format_bytes(mem['params'])}, grads {format_bytes(mem['grads'])}, "
            f"optimizer {format_bytes(mem['optimizer'])}, total {format_bytes(mem['total'])}"
            + (
                f"; on the host {format_bytes(mem['host'])} (parallel.cpu_offload), on the "
                f"device {format_bytes(mem['device'])}"
                if mem.get("host")
                else ""
            )
        )


def _check_inputs_on_every_rank(cfg: RunConfig) -> None:
    """:func:`check_run_inputs` on every rank, agreed by all (a collective): a rank whose own
    check passed stops too when another's failed (ranks on nodes that do not share a file
    system may disagree), instead of waiting for it in the first collective. Only rank 0 reads
    the checkpoints' rank files (they are shared by every rank; reading them everywhere would
    be world x world file reads)."""
    import torch
    import torch.distributed as dist

    error = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        check_run_inputs(cfg, read_checkpoints=rank == 0)
    except ValueError as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if error is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and flag.item() > 0:
            raise ValueError("another rank refused the start (its error names the input)")
    if error is not None:
        raise error


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    # Intermixed: overrides may come before, between or after the options.
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.world_size is not None and not args.dry_run:
            raise ValueError("--world-size is only used with --dry-run (torchrun sets it)")
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world-size ({args.world_size}) must be >= 1")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            _print_plan(plan(cfg, world_size=args.world_size or 1), as_json=args.json)
            return 0
        from pretrain.trainer import device_type, train

        # On CUDA the process group adds NCCL beside gloo.
        rank, world_size = init_distributed(device_type=device_type(cfg.train.device))
        try:
            validate_config(cfg, world_size=world_size)
            _check_inputs_on_every_rank(cfg)
            # Builds the run, then writes the run directory (config.yaml first).
            code = train(cfg, rank=rank, world_size=world_size)
        finally:
            destroy_distributed()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code


if __name__ == "__main__":
    sys.exit(main())
