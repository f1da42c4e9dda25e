"""The main job: ``torchrun --nproc-per-node N -m pretrain.train --config X [key=value ...]``.

Order: parse and validate the config (before anything is built) -> print and save the resolved
config -> mesh -> model -> parallelize -> loader -> optimizer -> loop.

``--dry-run --world-size N [--json]`` validates the config and the parallel layout for N ranks in
one process without building anything on a device.

Exit codes: 0 done, 2 bad config or input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from parallel.dist import destroy_distributed, init_distributed
from pretrain.config import RunConfig, config_to_yaml, load_config, save_config, validate_config

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m pretrain.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="Pre-train a Rosetta model. Launch with torchrun for several processes.",
        epilog="Overrides are section.key=value pairs after the options, e.g. "
        "model.num_layers=2 parallel.tp=2 train.steps=100.",
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
    """The layout of a run on ``world_size`` ranks, for ``--dry-run``.

    Raises:
        ValueError: the config or the layout is invalid for ``world_size``.
    """
    degrees = validate_config(cfg, world_size=world_size)
    return {
        "world_size": world_size,
        "mesh": {axis: degrees[axis] for axis in ("pp", "dp_replicate", "dp_shard", "tp")},
        "ep": degrees["ep"],
        "family": cfg.model.family,
        "objective": dict(cfg.objective.weights) or {cfg.objective.name: 1.0},
        "seq_len": cfg.data.seq_len,
        "global_batch_sequences": cfg.data.batch_size
        * degrees["dp_replicate"]
        * degrees["dp_shard"]
        * cfg.train.grad_accum,
    }


def _print_plan(result: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    mesh = " x ".join(f"{axis} {size}" for axis, size in result["mesh"].items())
    print(f"world size {result['world_size']}: {mesh} (ep {result['ep']})")
    print(f"family {result['family']}, objective {result['objective']}")
    print(
        f"global batch {result['global_batch_sequences']} sequences of {result['seq_len']} tokens"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.world_size is not None and not args.dry_run:
            raise ValueError("--world-size is only used with --dry-run (torchrun sets it)")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            _print_plan(plan(cfg, world_size=args.world_size or 1), as_json=args.json)
            return 0
        rank, world_size = init_distributed(device_type="cpu")
        try:
            validate_config(cfg, world_size=world_size)
            if rank == 0:
                print(config_to_yaml(cfg), end="")
                save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
                print(f"resolved config saved to {Path(cfg.train.run_dir) / 'config.yaml'}")
            from pretrain.trainer import train

            train(cfg, rank=rank, world_size=world_size)
        finally:
            destroy_distributed()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
