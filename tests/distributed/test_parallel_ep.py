"""Expert parallel (all-to-all dispatch) against the unsharded reference, alone and with TP,
FSDP2 and HSDP; expert weights sharded by FSDP2 over the expert data-parallel axis."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.models import build_model
from tests.distributed.parallel_cases import check_cases, expert_elements, tiny_config


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


def _with_capacity(cfg, factor: float = 0.5):
    return dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, dropless=False, capacity_factor=factor)
    )


def test_capacity_with_expert_parallel_world_2_matches_the_reference():
    # Capacity drops depend on which tokens share a layer call. EP over dp_shard: each rank's
    # layer routes its own half of the batch, so the reference is the unsharded layer on each
    # half (gradient accumulation over the two halves). ep_over_tp: one dp rank whose sequence
    # is split over tp; the layer must queue and size capacity as the unsplit one does, so the
    # reference is the whole batch.
    from parallel.testing import run_distributed
    from tests.distributed.parallel_cases import assert_matches, reference, run_cases

    decoder = _with_capacity(tiny_config("decoder", moe=True))
    cases = {
        "EP2 (dp_shard 2), capacity": (decoder, {"ep": 2}, 2),
        "EP2 encoder, capacity": (_with_capacity(tiny_config("encoder", moe=True)), {"ep": 2}, 2),
        "TP2+SP x EP2 over tp, capacity, aux+z": (
            _with_aux(decoder),
            {"tp": 2, "ep": 2, "ep_over_tp": True},
            1,
        ),
        "TP2 without SP x EP2 over tp, capacity": (
            decoder,
            {"tp": 2, "ep": 2, "ep_over_tp": True, "sequence_parallel": False},
            1,
        ),
    }
    labels = list(cases)
    results = run_distributed(
        run_cases,
        world_size=2,
        args=([cases[k][:2] for k in labels],),
        timeout_s=240,
    )
    for index, label in enumerate(labels):
        cfg, _, microbatches = cases[label]
        ref = reference(cfg, microbatches=microbatches)
        for rank, per_rank in enumerate(results):
            try:
                assert_matches(per_rank[index], ref)
            except AssertionError as err:
                raise AssertionError(f"{label}, rank {rank}: {err}") from None
    # The two references differ: the comparison sees where capacity is counted.
    whole, halves = reference(decoder), reference(decoder, microbatches=2)
    assert whole["losses"] != halves["losses"]


def _padded_batch(cfg):
    """Tokens ``[4, 16]`` and document ids with padding (-1): trailing in rows 0-1, leading in
    row 2 (crossing the tp chunk boundary), none in row 3."""
    gen = torch.Generator().manual_seed(11)
    tokens_BT = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
    docs_BT = torch.zeros(4, 16, dtype=torch.int64)
    docs_BT[0, 10:] = -1
    docs_BT[1, 5:] = -1
    docs_BT[2, :12] = -1
    docs_BT[3, 8:] = 1
    return tokens_BT, docs_BT


def _padded_step(model, cfg, *, dims=None) -> dict:
    from torch.distributed.tensor import DTensor

    from parallel.parallelize import local_value, loss_context

    tokens_BT, docs_BT = _padded_batch(cfg)
    targets_BT = torch.where(docs_BT >= 0, tokens_BT.roll(-1, 1), -100)
    model.train()
    logits_BTV = model(tokens_BT, document_ids_BT=docs_BT)
    with loss_context(dims):
        loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())
        loss.backward()
    if isinstance(logits_BTV, DTensor):
        logits_BTV = logits_BTV.full_tensor()
    grads = {}
    for name, param in model.named_parameters():
        if "router.gate" in name:
            grad = param.grad
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    stats = model.moe_stats()["layers.1.moe"]
    return {
        "loss": local_value(loss).item(),
        "logits": logits_BTV.detach()[docs_BT >= 0],
        "grads": grads,
        "counts": stats.tokens_per_expert_E.clone(),
        "aux": stats.aux_loss_sum.item(),
        "z": stats.z_loss_sum.item(),
    }


def _padded_run(rank: int, world_size: int, cfg, par: dict) -> dict:
    from tests.distributed.parallel_cases import parallel_model

    model, dims = parallel_model(cfg, par, world_size=world_size)
    return _padded_step(model, cfg, dims=dims)


def test_ep_over_tp_does_not_route_padding_world_2():
    # The token mask (document id -1) is cut to each tp rank's chunk like the tokens: logits,
    # router gradients, aux and z losses equal the single-process model's; the per-rank expert
    # counts (each rank's chunk) add up to the unsplit layer's.
    from parallel.testing import run_distributed
    from tests.distributed.parallel_cases import SEED

    cfg = _with_aux(_with_capacity(tiny_config("decoder", moe=True), factor=0.75))
    results = run_distributed(
        _padded_run,
        world_size=2,
        args=(cfg, {"tp": 2, "ep": 2, "ep_over_tp": True}),
        timeout_s=240,
    )
    ref_model = build_model(cfg)
    ref_model.init_weights(SEED)
    ref = _padded_step(ref_model, cfg)
    assert int(ref["counts"].sum()) == 2 * (10 + 5 + 4 + 16)
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["aux"] == pytest.approx(ref["aux"], rel=1e-5), rank
        assert got["z"] == pytest.approx(ref["z"], rel=1e-5), rank
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(results[0]["counts"] + results[1]["counts"], ref["counts"])
