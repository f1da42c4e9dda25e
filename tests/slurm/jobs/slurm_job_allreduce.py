"""A stand-in for the trainer in the Slurm tests: one gloo all_reduce across all ranks.

Run by torchrun like ``pretrain.train`` (``--config FILE [overrides]``); each rank writes
``<run_dir>/ranks/rank_<R>.json`` with what it saw, so the test can tell that every node took part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from launch.env import read_env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    train = yaml.safe_load(Path(args.config).read_text())["train"]
    for item in args.overrides:  # only train.* matters here; pretrain.config does the real thing
        key, _, value = item.partition("=")
        if key.startswith("train."):
            train[key.removeprefix("train.")] = yaml.safe_load(value)
    env = read_env()
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    out = Path(train["run_dir"]) / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "sum": value.item(),
        "node_name": env.node_name,
        "node_rank": env.node_rank,
        "num_nodes": env.num_nodes,
        "job_id": env.job_id,
        "restart_count": env.restart_count,
        "overrides": args.overrides,
    }
    (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
