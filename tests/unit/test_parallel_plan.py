"""ParallelDims validation, stage ids of a rank and the planner's offload memory formula, in this
process; the planner run as a command is in tests/cli/test_parallel_plan_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.pipeline import stage_ids_of_rank

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kwargs", "world_size", "message"),
    [
        ({"tp": 3}, 8, "parallel.dp_replicate (1) x parallel.tp (3) x parallel.pp (1) = 3 must "
         "divide the world size (8)"),
        ({"ep": 4, "tp": 2}, 4, "parallel.ep (4) must divide parallel.dp_shard (2)"),
        ({"ep": 4, "tp": 2, "ep_over_tp": True}, 2, "parallel.ep (4) / parallel.tp (2) = 2 "
         "must divide parallel.dp_shard (1) with parallel.ep_over_tp"),
    ],
)  # fmt: skip
def test_parallel_dims_rejects_bad_degrees(kwargs, world_size, message):
    with pytest.raises(ValueError) as err:
        ParallelDims.from_config(ParallelConfig(**kwargs), world_size=world_size)
    assert str(err.value) == message


def test_parallel_dims_degrees():
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, tp=2, pp=2, ep=2), world_size=32)
    assert (dims.dp_shard, dims.dp, dims.dp_shard_mod_ep, dims.edp) == (4, 8, 2, 4)
    assert dims.data_parallel_mode == "fsdp"


def test_parallel_dims_ep_over_tp_degrees():
    # ep 4 = dp_shard_in_ep 2 x tp 2; dp_shard 4 = dp_shard_mod_ep 2 x dp_shard_in_ep 2.
    cfg = ParallelConfig(tp=2, ep=4, ep_over_tp=True)
    dims = ParallelDims.from_config(cfg, world_size=8)
    assert (dims.dp_shard, dims.dp_shard_in_ep, dims.dp_shard_mod_ep, dims.edp) == (4, 2, 2, 2)
    default = ParallelDims.from_config(ParallelConfig(tp=2, ep=4), world_size=8)
    assert (default.dp_shard_in_ep, default.dp_shard_mod_ep) == (4, 1)


def test_stage_ids_of_rank():
    assert stage_ids_of_rank(1, pp=4, stages_per_rank=1, schedule="1F1B") == [1]
    assert stage_ids_of_rank(1, pp=4, stages_per_rank=2, schedule="Interleaved1F1B") == [1, 5]
    assert stage_ids_of_rank(0, pp=2, stages_per_rank=2, schedule="ZBVZeroBubble") == [0, 3]


def test_memory_estimate_offload_formula():
    from parallel.planner import memory_estimate

    assert memory_estimate(10, cpu_offload=True) == {
        "params": 40, "grads": 40, "optimizer": 80, "total": 160, "host": 160, "device": 0,
    }  # fmt: skip
    assert memory_estimate(10, param_bytes=2, grad_bytes=2) == {
        "params": 20, "grads": 20, "optimizer": 80, "total": 120, "host": 0, "device": 120,
    }  # fmt: skip
