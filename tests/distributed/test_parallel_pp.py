"""Pipeline parallel (each schedule family), PP x DP, PP x TP and PP x EP against the unsharded
reference."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from test_parallel_common import (
    MAX_NORM,
    SEED,
    assert_matches,
    batches,
    full_params,
    reference,
    tiny_config,
)

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import clip_grad_norm_
from parallel.pipeline import build_pipeline, pipeline_loss
from parallel.testing import run_distributed
from pretrain.models import build_model, pipeline_stage_layers, prune_to_stage, tp_plan


def _config():
    return dataclasses.replace(tiny_config("decoder"), num_layers=4)


def _loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _pp_run(rank: int, world_size: int, cfg, par: dict) -> dict:
    pcfg = ParallelConfig(**par)
    dims = ParallelDims.from_config(pcfg, world_size=world_size)
    dims.build_mesh()

    def build_stage(stage: int, num_stages: int):
        with torch.device("meta"):
            model = build_model(copy.deepcopy(cfg))
        keys = pipeline_stage_layers(cfg, num_stages=num_stages)
        prune_to_stage(
            model, layer_keys=keys[stage], first=stage == 0, last=stage == num_stages - 1
        )
        return model

    schedule, models, info = build_pipeline(
        build_stage, dims=dims, cfg=pcfg, tp_plan=tp_plan(cfg), seed=SEED, loss_fn=_loss_fn
    )
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    losses_out, norms = [], []
    for tokens, targets in batches(cfg):
        tokens = tokens.chunk(dims.dp)[dims.dp_rank]
        targets = targets.chunk(dims.dp)[dims.dp_rank]
        opt.zero_grad()
        losses: list[torch.Tensor] = []
        args = (tokens,) if info.has_first else ()
        kwargs = {"target": targets, "losses": losses} if info.has_last else {}
        schedule.step(*args, **kwargs)
        loss = pipeline_loss(losses, info=info, dims=dims)
        if dims.dp > 1:
            torch.distributed.all_reduce(loss, group=dims["dp"].get_group())
            loss /= dims.dp
        norms.append(clip_grad_norm_(models, max_norm=MAX_NORM, dims=dims).item())
        losses_out.append(loss.item())
        opt.step()
    stage_params = {}
    for model in models:
        stage_params.update(full_params(model))
    return {"losses": losses_out, "norms": norms, "stage_params": stage_params}


def _pp_cases(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    """Several pipeline runs in one launch (each launch costs seconds of start-up)."""
    return [_pp_run(rank, world_size, cfg, par) for cfg, par in cases]


def _check(world_size: int, cases: dict[str, dict | tuple]) -> None:
    """Run ``cases`` (label -> parallel settings, or (model config, settings)) in one launch
    and compare each with the unsharded reference of its model."""
    cases = {k: v if isinstance(v, tuple) else (_config(), v) for k, v in cases.items()}
    labels = list(cases)
    results = run_distributed(
        _pp_cases, world_size=world_size, args=([cases[k] for k in labels],), timeout_s=300
    )
    refs: dict[int, dict] = {}
    for index, label in enumerate(labels):
        cfg = cases[label][0]
        ref = refs.setdefault(id(cfg), reference(cfg))
        per_case = [per_rank[index] for per_rank in results]
        merged: dict[str, torch.Tensor] = {}
        for result in per_case:
            merged.update(result["stage_params"])
        for rank, result in enumerate(per_case):
            try:
                assert_matches({**result, "params": merged}, ref)
            except AssertionError as err:
                raise AssertionError(f"{label}, rank {rank}: {err}") from None


def test_pp2_schedules_match_the_reference():
    _check(
        2,
        {
            "PP2 1F1B": {"pp": 2, "pp_schedule": "1F1B", "microbatches": 4},
            "PP2 Interleaved1F1B": {
                "pp": 2,
                "pp_schedule": "Interleaved1F1B",
                "stages_per_rank": 2,
                "microbatches": 4,
            },
            "PP2 ZBVZeroBubble": {
                "pp": 2,
                "pp_schedule": "ZBVZeroBubble",
                "stages_per_rank": 2,
                "microbatches": 4,
            },
        },
    )


def test_pp2_with_dp2_tp2_ep2_world_4_matches_the_reference():
    moe = dataclasses.replace(tiny_config("decoder", moe=True), num_layers=4)
    _check(
        4,
        {
            "PP2 x FSDP2 1F1B": {"pp": 2, "pp_schedule": "1F1B", "microbatches": 2},
            # The last stage's logits are vocab-sharded; the loss runs under loss_parallel.
            "PP2 x TP2+SP 1F1B": {"pp": 2, "tp": 2, "pp_schedule": "1F1B", "microbatches": 4},
            "PP2 x EP2 (FSDP2 x2) 1F1B MoE": (
                moe,
                {"pp": 2, "ep": 2, "pp_schedule": "1F1B", "microbatches": 2},
            ),
        },
    )
