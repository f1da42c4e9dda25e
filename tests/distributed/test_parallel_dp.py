"""FSDP2, DDP and HSDP against the unsharded reference (5 SGD steps, clipped, fp32, 1e-5)."""

from __future__ import annotations

from test_parallel_common import check_cases, tiny_config


def test_fsdp2_ddp_world_2_match_the_reference():
    check_cases(
        2,
        {
            "FSDP2 x2 decoder": (tiny_config("decoder"), {}),
            "FSDP2 x2 encoder, full activation checkpointing": (
                tiny_config("encoder"),
                {"activation_checkpointing": "full"},
            ),
            "DDP x2 decoder": (tiny_config("decoder"), {"dp_replicate": 2, "dp_shard": 1}),
            "DDP x2 encoder": (tiny_config("encoder"), {"dp_replicate": 2, "dp_shard": 1}),
        },
    )


def test_hsdp_and_fsdp_over_tp_world_4_match_the_reference():
    check_cases(
        4,
        {
            "HSDP 2x2 decoder": (tiny_config("decoder"), {"dp_replicate": 2, "dp_shard": 2}),
            "FSDP2 x2 x TP2 decoder": (tiny_config("decoder"), {"dp_shard": 2, "tp": 2}),
            "DDP-like HSDP x2 x TP2 encoder": (
                tiny_config("encoder"),
                {"dp_replicate": 2, "dp_shard": 1, "tp": 2},
            ),
        },
    )
