"""The encoder-decoder family under tensor (+ sequence), data (FSDP2) and expert parallel,
against the unsharded one-process reference: losses, clipped gradient norms and parameters
after 5 SGD steps on padded sources (``parallel_cases``)."""

from __future__ import annotations

from tests.distributed.parallel_cases import check_cases, tiny_encdec_config


def test_encoder_decoder_layouts_on_two_ranks_match_the_reference():
    check_cases(
        2,
        {
            "TP2+SP mT5-shaped": (tiny_encdec_config("mt5"), {"tp": 2}),
            "TP2 without SP mT5-shaped": (
                tiny_encdec_config("mt5"),
                {"tp": 2, "sequence_parallel": False},
            ),
            "TP2+SP mBART-shaped (tied, final_logits_bias)": (
                tiny_encdec_config("mbart"),
                {"tp": 2},
            ),
            "FSDP2 dp2 mT5-shaped, full checkpointing": (
                tiny_encdec_config("mt5"),
                {"dp_shard": 2, "activation_checkpointing": "full"},
            ),
            "EP2 Switch top-1 in both stacks": (tiny_encdec_config("mt5", moe="switch"), {"ep": 2}),
            "TP2+SP GShard top-2 in both stacks": (
                tiny_encdec_config("mt5", moe="gshard"),
                {"tp": 2},
            ),
        },
    )


def test_encoder_decoder_layouts_on_four_ranks_match_the_reference():
    check_cases(
        4,
        {
            "HSDP 2x2 mBART-shaped": (
                tiny_encdec_config("mbart"),
                {"dp_replicate": 2, "dp_shard": 2},
            ),
            "TP2+SP x FSDP2 mT5-shaped, selective checkpointing": (
                tiny_encdec_config("mt5"),
                {"tp": 2, "dp_shard": 2, "activation_checkpointing": "selective"},
            ),
            "EP2 x FSDP2 GShard top-2": (
                tiny_encdec_config("mt5", moe="gshard"),
                {"ep": 2, "dp_shard": 4},
            ),
        },
    )
