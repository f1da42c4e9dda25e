"""Pipeline parallel (each schedule family, both families), PP x DP, PP x TP and PP x EP against
the unsharded reference; MoE aux/z losses and per-token loss normalisation across microbatches.

References: the whole batch in one process; with MoE aux/z losses, gradient accumulation over the
same microbatches in one process (a load-balancing loss is a per-forward statistic, so that is
what pipelining computes: ``parallel.pipeline``). Encoder runs on one dp rank use MLM-like
targets (most positions ignored, a different count in each microbatch) to check per-token
normalisation.
"""

from __future__ import annotations

import dataclasses

import torch

from parallel.parallelize import clip_grad_norm_
from parallel.pipeline import pipeline_step
from parallel.testing import run_distributed
from tests.distributed.parallel_cases import (
    MAX_NORM,
    assert_matches,
    batches,
    full_params,
    pipeline_setup,
    reference,
    tiny_config,
)


def _config():
    return dataclasses.replace(tiny_config("decoder"), num_layers=4)


def _moe_with_aux(family: str = "decoder"):
    """The 4-layer MoE model (untied) with load-balancing and z losses switched on."""
    cfg = tiny_config(family, moe=True)
    moe = dataclasses.replace(cfg.moe, aux_loss_coef=0.1, z_loss_coef=0.01)
    return dataclasses.replace(cfg, num_layers=4, moe=moe, tie_embeddings=False)


def _untied_encoder(*, moe: bool = False):
    return dataclasses.replace(tiny_config("encoder", moe=moe), num_layers=4, tie_embeddings=False)


def _data(cfg, *, dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches(cfg)``; for the encoder on one dp rank with MLM-like targets: about 30% of the
    positions predicted, a different count in each row. (With dp > 1 every position is a
    target: data parallel averages each rank's per-token mean, as the trainer does, which is the
    batch's per-token mean only when the ranks hold equal target counts.)"""
    data = batches(cfg)
    if cfg.family != "encoder" or dp > 1:
        return data
    gen = torch.Generator().manual_seed(11)
    out = []
    for tokens, targets in data:
        keep = torch.rand(targets.shape, generator=gen) < 0.3
        out.append((tokens, torch.where(keep, targets, torch.full_like(targets, -100))))
    return out


def _pp_run(rank: int, world_size: int, cfg, par: dict) -> dict:
    dims, schedule, models, info = pipeline_setup(world_size, cfg, par)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    losses_out, norms = [], []
    for tokens, targets in _data(cfg, dp=dims.dp):
        tokens = tokens.chunk(dims.dp)[dims.dp_rank]
        targets = targets.chunk(dims.dp)[dims.dp_rank]
        opt.zero_grad()
        loss = pipeline_step(schedule, info=info, dims=dims, inputs=tokens, targets=targets)
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
    refs: dict[tuple, dict] = {}
    for index, label in enumerate(labels):
        cfg, par = cases[label]
        # With aux/z losses the reference accumulates over the same (dp x microbatch) slices.
        aux = cfg.moe.num_experts > 0 and (cfg.moe.aux_loss_coef or cfg.moe.z_loss_coef)
        dp = world_size // (par.get("pp", 1) * par.get("tp", 1))
        micro = dp * par.get("microbatches", par.get("pp", 1)) if aux else 1
        key = (id(cfg), micro, dp > 1)
        if key not in refs:
            refs[key] = reference(cfg, microbatches=micro, data=_data(cfg, dp=dp))
        ref = refs[key]
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
            "PP2 GPipe": {"pp": 2, "pp_schedule": "GPipe", "microbatches": 4},
            "PP2 LoopedBFS": {
                "pp": 2,
                "pp_schedule": "LoopedBFS",
                "stages_per_rank": 2,
                "microbatches": 4,
            },
            "PP2 DualPipeV": {
                "pp": 2,
                "pp_schedule": "DualPipeV",
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
            # Reference: accumulation over the 2 dp x 2 microbatch slices.
            "PP2 x EP2 (FSDP2 x2) 1F1B MoE aux+z": (
                _moe_with_aux(),
                {"pp": 2, "ep": 2, "pp_schedule": "1F1B", "microbatches": 2},
            ),
            "PP2 x FSDP2 1F1B untied encoder": (
                _untied_encoder(),
                {"pp": 2, "pp_schedule": "1F1B", "microbatches": 2},
            ),
            "PP2 x TP2 x EP2 over tp 1F1B MoE": (
                moe,
                {"pp": 2, "tp": 2, "ep": 2, "ep_over_tp": True, "microbatches": 2},
            ),
        },
    )


def test_pp2_moe_aux_and_z_losses_match_gradient_accumulation():
    # Each stage's MoE layers add their aux/z gradients in its own backward; the zero-bubble
    # schedules split that backward into input and weight gradients.
    moe = _moe_with_aux()
    _check(
        2,
        {
            "PP2 1F1B MoE aux+z": (moe, {"pp": 2, "pp_schedule": "1F1B", "microbatches": 4}),
            "PP2 InterleavedZeroBubble MoE aux+z": (
                moe,
                {
                    "pp": 2,
                    "pp_schedule": "InterleavedZeroBubble",
                    "stages_per_rank": 2,
                    "microbatches": 4,
                },
            ),
            "PP2 ZBVZeroBubble MoE aux+z": (
                moe,
                {
                    "pp": 2,
                    "pp_schedule": "ZBVZeroBubble",
                    "stages_per_rank": 2,
                    "microbatches": 2,
                },
            ),
        },
    )


def test_pp2_untied_encoder_matches_the_reference():
    # MLM-like targets: a different number of predicted positions in each microbatch.
    _check(
        2,
        {
            "PP2 1F1B encoder": (_untied_encoder(), {"pp": 2, "pp_schedule": "1F1B"}),
            "PP2 GPipe encoder": (_untied_encoder(), {"pp": 2, "pp_schedule": "GPipe"}),
            **{
                f"PP2 {schedule} encoder": (
                    _untied_encoder(),
                    {"pp": 2, "pp_schedule": schedule, "stages_per_rank": 2, "microbatches": 4},
                )
                for schedule in (
                    "InterleavedZeroBubble",
                    "ZBVZeroBubble",
                    "LoopedBFS",
                    "DualPipeV",
                )
            },
            "PP2 Interleaved1F1B MoE encoder aux+z": (
                _moe_with_aux("encoder"),
                {
                    "pp": 2,
                    "pp_schedule": "Interleaved1F1B",
                    "stages_per_rank": 2,
                    "microbatches": 4,
                },
            ),
        },
    )
