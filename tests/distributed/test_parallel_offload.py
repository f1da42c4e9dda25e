"""FSDP2 CPU offload (``parallel.cpu_offload``): the same training as without it, the optimizer
on the host, and the config rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from parallel.config import ParallelConfig, validate_parallel
from parallel.mesh import ParallelDims
from parallel.parallelize import clip_grad_norm_, parallelize_model
from parallel.testing import run_distributed
from pretrain.config import OptimConfig
from pretrain.models import build_model, tp_plan
from pretrain.optim import build_optimizer
from tests.distributed.parallel_cases import (
    SEED,
    batches,
    check_cases,
    full_params,
    tiny_config,
)

ADAMW_STEPS = 3


def _adamw_run(rank: int, world_size: int, cpu_offload: bool) -> dict:
    cfg = tiny_config("decoder")
    pcfg = ParallelConfig(cpu_offload=cpu_offload)
    dims = ParallelDims.from_config(pcfg, world_size=world_size)
    dims.build_mesh()
    with torch.device("meta"):
        model = build_model(copy.deepcopy(cfg))
    parallelize_model(model, dims=dims, cfg=pcfg, tp_plan=tp_plan(cfg), seed=SEED)
    # device_type "cuda" asks for the fused default: parameters on the host must turn it off.
    optimizer = build_optimizer(
        model, OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0), device_type="cuda"
    )
    losses, norms = [], []
    for tokens, targets in batches(cfg)[:ADAMW_STEPS]:
        tokens = tokens.chunk(dims.dp)[dims.dp_rank]
        targets = targets.chunk(dims.dp)[dims.dp_rank]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        loss.backward()
        norms.append(clip_grad_norm_(model, max_norm=0.5, dims=dims).item())
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        losses.append(value.item() / world_size)
        optimizer.step()
    offload = {
        type(state._fsdp_param_group.offload_policy).__name__ for state in _fsdp_states(model)
    }
    return {
        "losses": losses,
        "norms": norms,
        "params": full_params(model),
        "fused": optimizer.defaults["fused"],
        "grad_devices": sorted({p.grad.to_local().device.type for p in model.parameters()}),
        "offload_policies": sorted(offload),
    }


def _fsdp_states(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [
        m._get_fsdp_state()
        for m in model.modules()
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group is not None
    ]


def _both_runs(rank: int, world_size: int) -> dict:
    return {offload: _adamw_run(rank, world_size, offload) for offload in (False, True)}


def test_cpu_offload_adamw_matches_the_plain_fsdp_run():
    results = run_distributed(_both_runs, world_size=2, timeout_s=240)
    for rank, per_rank in enumerate(results):
        plain, offloaded = per_rank[False], per_rank[True]
        assert offloaded["offload_policies"] == ["CPUOffloadPolicy"], rank
        assert plain["offload_policies"] == ["OffloadPolicy"], rank
        assert offloaded["fused"] is False and offloaded["grad_devices"] == ["cpu"]
        torch.testing.assert_close(
            torch.tensor(offloaded["losses"]), torch.tensor(plain["losses"]), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(offloaded["norms"]), torch.tensor(plain["norms"]), rtol=0, atol=1e-6
        )
        assert offloaded["params"].keys() == plain["params"].keys()
        for name, value in plain["params"].items():
            torch.testing.assert_close(offloaded["params"][name], value, rtol=0, atol=1e-6)
    # The steps moved the parameters: the comparison above is not between two initial states.
    init = build_model(copy.deepcopy(tiny_config("decoder")))
    init.init_weights(SEED)
    start = full_params(init)
    moved = max((results[0][True]["params"][k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-3


def test_cpu_offload_sgd_matches_the_unsharded_reference():
    check_cases(
        2,
        {
            "FSDP2 x2 decoder, cpu offload": (tiny_config("decoder"), {"cpu_offload": True}),
            "FSDP2 x2 encoder, cpu offload": (tiny_config("encoder"), {"cpu_offload": True}),
        },
    )


@pytest.mark.parametrize(
    ("kwargs", "world_size"),
    [
        ({"cpu_offload": True, "dp_shard": 1}, None),
        ({"cpu_offload": True, "dp_replicate": 2}, 2),  # dp_shard -1 resolves to 1: DDP
        ({"cpu_offload": True, "tp": 2}, 2),
    ],
)
def test_cpu_offload_needs_fsdp_sharding(kwargs, world_size):
    with pytest.raises(ValueError) as err:
        validate_parallel(ParallelConfig(**kwargs), world_size=world_size)
    assert str(err.value) == (
        "parallel.cpu_offload (True) needs FSDP: parallel.dp_shard (1) must be > 1"
    )


def test_cpu_offload_with_fsdp_sharding_is_valid():
    degrees = validate_parallel(ParallelConfig(cpu_offload=True, tp=2), world_size=4)
    assert degrees["dp_shard"] == 2
