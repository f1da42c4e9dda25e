"""FSDP2, DDP and HSDP against the unsharded reference (5 SGD steps, clipped, fp32, 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import clip_grad_norm_, loss_context
from parallel.testing import run_distributed
from pretrain.models import build_model
from tests.distributed.parallel_cases import SEED, batches, check_cases, parallel_model, tiny_config

inf = float("inf")


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


# ---------------------------------------------------------------------------------------------
# gradient clipping: one all-reduce per (mesh, placements) group, not one per parameter


def _norms_and_collectives(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out = []
    for cfg, par in cases:
        model, dims = parallel_model(cfg, par, world_size=world_size)
        tokens, targets = batches(cfg)[0]
        tokens, targets = tokens.chunk(dims.dp)[dims.dp_rank], targets.chunk(dims.dp)[dims.dp_rank]
        logits = model(tokens)
        with loss_context(dims):
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        groups = {(g.device_mesh, tuple(g.placements)) for g in grads if isinstance(g, DTensor)}
        calls = []
        original = dist.all_reduce

        def counting(*args, **kwargs):
            calls.append(kwargs.get("group"))
            return original(*args, **kwargs)

        dist.all_reduce = counting
        try:
            # max_norm inf: nothing is clipped, so the 2-norm below sees the same gradients.
            inf_norm = clip_grad_norm_(model, max_norm=float("inf"), dims=dims, norm_type=inf)
            inf_calls = len(calls)
            calls.clear()
            norm = clip_grad_norm_(model, max_norm=float("inf"), dims=dims)
        finally:
            dist.all_reduce = original
        out.append(
            {
                "norm": norm.item(),
                "inf_norm": inf_norm.item(),
                "calls": len(calls),
                "inf_calls": inf_calls,
                "groups": len(groups),
                "dtensor_grads": sum(isinstance(g, DTensor) for g in grads),
            }
        )
    return out


def _reference_norms(cfg) -> tuple[float, float]:
    model = build_model(copy.deepcopy(cfg))
    model.init_weights(SEED)
    tokens, targets = batches(cfg)[0]
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    two = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    return two, max(g.abs().max().item() for g in grads)


def _check_norm_collectives(world_size: int, cases: dict, expected_calls: dict) -> None:
    labels = list(cases)
    results = run_distributed(
        _norms_and_collectives,
        world_size=world_size,
        args=([cases[k] for k in labels],),
        timeout_s=240,
    )
    for index, label in enumerate(labels):
        two, inf_ref = _reference_norms(cases[label][0])
        for rank, per_rank in enumerate(results):
            got = per_rank[index]
            where = f"{label}, rank {rank}: {got}"
            assert got["norm"] == pytest.approx(two, rel=1e-5, abs=1e-6), where
            assert got["inf_norm"] == pytest.approx(inf_ref, rel=1e-5, abs=1e-6), where
            assert got["calls"] <= got["groups"], where
            assert got["calls"] == got["inf_calls"] == expected_calls[label], where


def test_clip_grad_norm_one_all_reduce_per_mesh_group_world_2():
    cases = {
        # every gradient Shard(0) on dp_shard: one group, one all-reduce
        "FSDP2 x2": (tiny_config("decoder"), {}),
        # colwise Shard(0) and rowwise Shard(1) share the tp group (one all-reduce); the
        # sequence-parallel norms' Partial gradients are summed together in a second
        "TP2+SP": (tiny_config("decoder"), {"tp": 2}),
        "TP2 without SP": (tiny_config("encoder"), {"tp": 2, "sequence_parallel": False}),
        # plain replicated gradients: no collective
        "DDP x2": (tiny_config("decoder"), {"dp_replicate": 2, "dp_shard": 1}),
        # experts Shard(0) over ep = dp_shard: the same group as the rest
        "EP2": (tiny_config("decoder", moe=True), {"ep": 2}),
    }
    expected = {"FSDP2 x2": 1, "TP2+SP": 2, "TP2 without SP": 1, "DDP x2": 0, "EP2": 1}
    _check_norm_collectives(2, cases, expected)


def test_clip_grad_norm_one_all_reduce_per_mesh_group_world_4():
    cases = {
        # (dp_shard, tp) 2-D gradients reduced over the world; (Shard, Replicate) ones over
        # dp_shard: two groups
        "FSDP2 x2 x TP2": (tiny_config("decoder"), {"dp_shard": 2, "tp": 2}),
        # (Replicate, Shard(0)) on (dp_replicate, dp_shard): one group over dp_shard
        "HSDP 2x2": (tiny_config("decoder"), {"dp_replicate": 2, "dp_shard": 2}),
    }
    expected = {"FSDP2 x2 x TP2": 2, "HSDP 2x2": 1}
    _check_norm_collectives(4, cases, expected)


# ---------------------------------------------------------------------------------------------
# metric reduction: counts past fp32's 2**24 stay exact


def _reduce_counts(rank: int, world_size: int) -> dict:
    from parallel.parallelize import reduce_metric

    dims = ParallelDims.from_config(ParallelConfig(), world_size=world_size)
    dims.build_mesh()
    count = 2**24 + 1 + rank  # 16777217 and 16777218: neither fits fp32 exactly
    out = {}
    for label, value in {
        "python float": float(count),
        "python int": count,
        "int32 tensor": torch.tensor(count, dtype=torch.int32),
    }.items():
        summed = reduce_metric(value, dims=dims, op="sum")
        mean = reduce_metric(value, dims=dims, op="mean")
        out[label] = (summed.dtype, summed.item(), mean.item())
    out["int64 tensor"] = reduce_metric(torch.tensor(count), dims=dims, op="sum").item()
    return out


def test_reduce_metric_counts_past_2_pow_24_are_exact():
    results = run_distributed(_reduce_counts, world_size=2, timeout_s=120)
    total = (2**24 + 1) + (2**24 + 2)
    assert float(torch.tensor(2**24 + 1, dtype=torch.float32)) != 2**24 + 1  # fp32 loses it
    for rank, per_rank in enumerate(results):
        for label in ("python float", "python int", "int32 tensor"):
            dtype, summed, mean = per_rank[label]
            assert dtype == torch.float64, (rank, label)
            assert summed == total, (rank, label, summed)
            assert mean == total / 2, (rank, label, mean)
        assert per_rank["int64 tensor"] == total
