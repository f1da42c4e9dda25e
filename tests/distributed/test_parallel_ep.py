"""Expert parallel (all-to-all dispatch) against the unsharded reference, alone and with TP,
FSDP2 and HSDP; expert weights sharded by FSDP2 over the expert data-parallel axis."""

from __future__ import annotations

import dataclasses

from test_parallel_common import check_cases, expert_elements, tiny_config

from pretrain.models import build_model


def _assert_expert_shards(results: dict[str, list[dict]], cases: dict, shards: dict) -> None:
    """Each rank holds ``1 / shards[label]`` of the expert elements (ep x dp_shard_mod_ep x
    tp), not a full copy per ep shard."""
    for label, factor in shards.items():
        per_rank = results[label]
        full = expert_elements(build_model(cases[label][0]), local=False)
        assert full > 0
        for rank, result in enumerate(per_rank):
            assert result["expert_local"] * factor == full, (label, rank)


def test_ep2_world_2_matches_the_reference():
    cases = {
        "EP2 (dp_shard 2) decoder": (tiny_config("decoder", moe=True), {"ep": 2}),
        "EP2 encoder": (tiny_config("encoder", moe=True), {"ep": 2}),
    }
    results = check_cases(2, cases)
    _assert_expert_shards(results, cases, dict.fromkeys(cases, 2))


def test_tp2_ep2_and_ep_with_expert_data_parallel_world_4_match_the_reference():
    cases = {
        "TP2 x EP2 decoder": (tiny_config("decoder", moe=True), {"ep": 2, "tp": 2}),
        "TP2 x EP2 encoder": (tiny_config("encoder", moe=True), {"ep": 2, "tp": 2}),
        "EP2 in dp_shard 4 (edp 2)": (tiny_config("decoder", moe=True), {"ep": 2}),
        "EP2 under HSDP 2x2 (edp 2)": (
            tiny_config("decoder", moe=True),
            {"ep": 2, "dp_replicate": 2, "dp_shard": 2},
        ),
        # One local expert for two expert-data-parallel shards: FSDP shards weight dim 1.
        "EP2 in dp_shard 4, 2 experts": (_two_experts(), {"ep": 2}),
    }
    results = check_cases(4, cases)
    # TP2 x EP2: ep 2 x tp 2; EP2 in dp_shard 4: ep 2 x dp_shard_mod_ep 2; HSDP: ep 2 only
    # (dp_replicate replicates). Not the encoder: its b2 [E, D] is replicated over tp.
    shards = dict(zip(cases, (4, None, 4, 2, 4), strict=True))
    _assert_expert_shards(results, cases, {k: v for k, v in shards.items() if v is not None})


def _two_experts():
    cfg = tiny_config("decoder", moe=True)
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=2))


def _with_aux(cfg):
    return dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, aux_loss_coef=0.1, z_loss_coef=0.01)
    )


def test_ep_over_tp_world_2_matches_the_reference():
    # The ep group is the tp group: each tp rank routes its half of the sequence; aux and z
    # losses (on: one dp rank, so the reference's whole-batch statistics) are summed over tp.
    cases = {
        "TP2+SP x EP2 over tp, decoder, aux+z": (
            _with_aux(tiny_config("decoder", moe=True)),
            {"tp": 2, "ep": 2, "ep_over_tp": True},
        ),
        "TP2 without SP x EP2 over tp, encoder, aux+z": (
            _with_aux(tiny_config("encoder", moe=True)),
            {"tp": 2, "ep": 2, "ep_over_tp": True, "sequence_parallel": False},
        ),
    }
    results = check_cases(2, cases)
    _assert_expert_shards(results, cases, dict.fromkeys(cases, 2))


def test_ep_over_tp_world_4_matches_the_reference():
    moe = tiny_config("decoder", moe=True)
    cases = {
        # dp_shard 2 x tp 2: one ep group of all four ranks.
        "TP2 x EP4 over dp_shard 2 x tp 2": (moe, {"tp": 2, "ep": 4, "ep_over_tp": True}),
        # ep groups {0, 1} and {2, 3}; FSDP2 shards experts over edp {0, 2} and {1, 3}.
        "TP2 x EP2 over tp, FSDP2 x2 (edp 2)": (moe, {"tp": 2, "ep": 2, "ep_over_tp": True}),
    }
    results = check_cases(4, cases)
    _assert_expert_shards(results, cases, dict.fromkeys(cases, 4))
