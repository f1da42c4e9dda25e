"""The dry-run planner through ``python -m pretrain.train``: large layouts planned in one process
(fake process group, meta models), offload placement, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_1024_rank_moe_layout_plans_in_one_process():
    # pp 4 x dp 32 (2 replicas x 16 shards) x tp 8 = 1024 ranks; ep 8 drawn from dp_shard.
    result = _cli(
        "--config", "configs/moe_8x_top2.yaml", "--dry-run", "--world-size", "1024", "--json",
        "parallel.pp=4", "parallel.tp=8", "parallel.dp_replicate=2", "parallel.ep=8",
        "model.num_kv_heads=8",  # the preset's document masking stays on under pp
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 1024
    assert plan["mesh"] == {"pp": 4, "dp_replicate": 2, "dp_shard": 16, "tp": 8}
    assert plan["ep"] == 8
    # 22 layers of (attention 10.5M + 8 experts x 3 x 2816 x 2048 + router + norms),
    # embeddings and output 2 x 32000 x 2048.
    assert plan["params_total"] == 3_407_276_032
    # Experts count top_k / num_experts = 2/8 of their size.
    experts = 22 * 8 * 3 * 2816 * 2048
    assert plan["params_active"] == plan["params_total"] - experts * 6 // 8
    assert [row["stages"] for row in plan["per_rank"]] == [[0], [1], [2], [3]]
    # Stage 1 holds layers 5..10 (6 layers): experts sharded by ep 8 x tp 8 x dp_shard_mod_ep 2
    # (FSDP2 over the expert data-parallel axis; dp_replicate replicates them); the rest by
    # tp 8 x dp_shard 16.
    expert_local = 6 * 3 * 8 * 2816 * 2048 // (8 * 8 * 2)
    assert plan["per_rank"][1]["params_local_experts"] == expert_local
    dense_local = plan["per_rank"][1]["params_local"] - expert_local
    assert 0 < dense_local < 6 * 11_000_000 // (8 * 16)
    mem = plan["memory_per_rank_bytes"]
    assert mem["params"] == mem["grads"] == 4 * plan["params_per_rank_max"]
    assert mem["optimizer"] == 8 * plan["params_per_rank_max"]
    assert mem["total"] == 16 * plan["params_per_rank_max"]


def test_dense_plan_text_output_and_fsdp_tp_sharding():
    result = _cli(
        "--config", "configs/tiny_decoder.yaml", "--dry-run", "--world-size", "8",
        "parallel.tp=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "world size 8: pp 1 x dp_replicate 1 x dp_shard 4 x tp 2 (ep 1)" in result.stdout
    assert "params_total" in result.stdout and "params_active" in result.stdout
    assert "optimizer" in result.stdout


def test_bad_layout_is_one_line_and_exit_2():
    result = _cli(
        "--config", "configs/moe_8x_top2.yaml", "--dry-run", "--world-size", "1024",
        "parallel.pp=4", "parallel.tp=4", "parallel.ep=3",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "error: parallel.ep (3) must divide parallel.dp_shard (64)"
    assert "Traceback" not in result.stderr


def test_ep_over_tp_layout_plans_in_one_process():
    # pp 4 x dp 64 (2 replicas x 32 shards) x tp 4; ep 8 = 2 dp_shard ranks x tp 4.
    result = _cli(
        "--config", "configs/moe_8x_top2.yaml", "--dry-run", "--world-size", "1024", "--json",
        "parallel.pp=4", "parallel.tp=4", "parallel.dp_replicate=2", "parallel.ep=8",
        "parallel.ep_over_tp=true", "model.num_kv_heads=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["mesh"] == {"pp": 4, "dp_replicate": 2, "dp_shard": 32, "tp": 4}
    assert plan["ep"] == 8 and plan["ep_over_tp"] is True
    # Stage 1's 6 layers of whole experts: Shard(0) over ep 8, FSDP2 over dp_shard_mod_ep 16.
    expert_local = 6 * 3 * 8 * 2816 * 2048 // (8 * 16)
    assert plan["per_rank"][1]["params_local_experts"] == expert_local


def test_cpu_offload_plan_moves_params_grads_and_optimizer_to_the_host():
    base = ("--config", "configs/tiny_decoder.yaml", "--dry-run", "--world-size", "4", "--json")
    plain = _cli(*base, "parallel.tp=2")
    offload = _cli(*base, "parallel.tp=2", "parallel.cpu_offload=true")
    assert plain.returncode == 0, plain.stderr
    assert offload.returncode == 0, offload.stderr
    plain, offload = json.loads(plain.stdout), json.loads(offload.stdout)
    params = offload["params_per_rank_max"]
    assert params == plain["params_per_rank_max"] > 0
    # fp32 parameters (4 bytes) + fp32 gradients (4) + AdamW's two fp32 moments (8) per element
    mem, mem_plain = offload["memory_per_rank_bytes"], plain["memory_per_rank_bytes"]
    assert mem["host"] == (4 + 4 + 8) * params and mem["device"] == 0
    assert mem_plain["host"] == 0 and mem_plain["device"] == (4 + 4 + 8) * params
    assert mem_plain["device"] - mem["device"] == mem["host"]
    for row in offload["per_rank"]:
        assert row["memory_bytes"]["host"] == 16 * row["params_local"]


def test_cpu_offload_without_fsdp_is_one_line_and_exit_2():
    result = _cli(
        "--config", "configs/tiny_decoder.yaml", "--dry-run", "--world-size", "2",
        "parallel.tp=2", "parallel.cpu_offload=true",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: parallel.cpu_offload (True) needs FSDP: parallel.dp_shard (1) must be > 1"
    )
