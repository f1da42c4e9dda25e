"""Tensor (+ sequence) parallel against the unsharded reference, both families and MoE."""

from __future__ import annotations

from tests.distributed.parallel_cases import check_cases, tiny_config


def test_tp2_both_families_match_the_reference():
    check_cases(
        2,
        {
            "TP2+SP decoder": (tiny_config("decoder"), {"tp": 2}),
            "TP2+SP encoder (tied, post-norm, MLM head)": (tiny_config("encoder"), {"tp": 2}),
            "TP2 without SP decoder": (
                tiny_config("decoder"),
                {"tp": 2, "sequence_parallel": False},
            ),
            "TP2 without SP encoder": (
                tiny_config("encoder"),
                {"tp": 2, "sequence_parallel": False},
            ),
            "TP2+SP MoE decoder, selective checkpointing": (
                tiny_config("decoder", moe=True),
                {"tp": 2, "activation_checkpointing": "selective"},
            ),
        },
    )
