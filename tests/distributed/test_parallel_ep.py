"""Expert parallel (all-to-all dispatch) against the unsharded reference, alone and with TP,
FSDP2 and HSDP."""

from __future__ import annotations

from test_parallel_common import check_cases, tiny_config


def test_ep2_world_2_matches_the_reference():
    check_cases(
        2,
        {
            "EP2 (dp_shard 2) decoder": (tiny_config("decoder", moe=True), {"ep": 2}),
            "EP2 encoder": (tiny_config("encoder", moe=True), {"ep": 2}),
        },
    )


def test_tp2_ep2_and_ep_with_expert_data_parallel_world_4_match_the_reference():
    check_cases(
        4,
        {
            "TP2 x EP2 decoder": (tiny_config("decoder", moe=True), {"ep": 2, "tp": 2}),
            "EP2 in dp_shard 4 (edp 2)": (tiny_config("decoder", moe=True), {"ep": 2}),
            "EP2 under HSDP 2x2 (edp 2)": (
                tiny_config("decoder", moe=True),
                {"ep": 2, "dp_replicate": 2, "dp_shard": 2},
            ),
        },
    )
