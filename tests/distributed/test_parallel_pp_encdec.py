"""Pipeline parallel of the encoder-decoder family against the unsharded reference (losses,
clipped gradient norms and parameters after 5 SGD steps): stages ``[encoder | decoder]`` with
the target's embeddings, the encoder memory and the relative-position biases carried from stage
to stage, ids and masks as keyword arguments of every stage; GPipe and 1F1B on 3 ranks,
interleaved 1F1B on 2, MoE aux and z losses on stages of both stacks (reference: gradient
accumulation over the same microbatches, as ``test_parallel_pp``)."""

from __future__ import annotations

import dataclasses

import torch

from parallel.parallelize import clip_grad_norm_
from parallel.pipeline import pipeline_step
from parallel.testing import run_distributed
from tests.distributed.parallel_cases import (
    MAX_NORM,
    SEQ,
    assert_matches,
    batches,
    full_params,
    pipeline_setup,
    reference,
    tiny_encdec_config,
)


def _untied(shape: str = "mt5", moe: str = ""):
    return dataclasses.replace(tiny_encdec_config(shape, moe=moe), tie_embeddings=False)


def _with_aux():
    cfg = _untied("mt5", moe="gshard")
    moe = dataclasses.replace(cfg.moe, aux_loss_coef=0.1, z_loss_coef=0.01, every=1, offset=None)
    return dataclasses.replace(cfg, moe=moe)


def _pp_run(rank: int, world_size: int, cfg, par: dict) -> dict:
    dims, schedule, models, info = pipeline_setup(world_size, cfg, par)
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    losses, norms = [], []
    for tokens, targets in batches(cfg):
        source, decoder_inputs = tokens[:, :SEQ], tokens[:, SEQ:]
        opt.zero_grad()
        loss = pipeline_step(
            schedule,
            info=info,
            dims=dims,
            inputs=source,
            targets=targets,
            stage_kwargs={
                "decoder_tokens_BT": decoder_inputs,
                "document_ids_BS": torch.where(source == 0, -1, 0),
            },
        )
        norms.append(clip_grad_norm_(models, max_norm=MAX_NORM, dims=dims).item())
        losses.append(loss.item())
        opt.step()
    stage_params = {}
    for model in models:
        stage_params.update(full_params(model))
    return {"losses": losses, "norms": norms, "stage_params": stage_params}


def _pp_cases(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    return [_pp_run(rank, world_size, cfg, par) for cfg, par in cases]


def _check(world_size: int, cases: dict[str, tuple]) -> None:
    labels = list(cases)
    results = run_distributed(
        _pp_cases, world_size=world_size, args=([cases[k] for k in labels],), timeout_s=300
    )
    for index, label in enumerate(labels):
        cfg, par = cases[label]
        aux = cfg.moe.num_experts > 0 and (cfg.moe.aux_loss_coef or cfg.moe.z_loss_coef)
        ref = reference(cfg, microbatches=par["microbatches"] if aux else 1)
        per_case = [per_rank[index] for per_rank in results]
        merged: dict[str, torch.Tensor] = {}
        for result in per_case:
            merged.update(result["stage_params"])
        for rank, result in enumerate(per_case):
            try:
                assert_matches({**result, "params": merged}, ref)
            except AssertionError as err:
                raise AssertionError(f"{label}, rank {rank}: {err}") from None


def test_pp3_gpipe_and_1f1b_match_the_reference():
    _check(
        3,
        {
            "PP3 GPipe mT5-shaped [enc | dec | dec]": (
                _untied("mt5"),
                {"pp": 3, "pp_schedule": "GPipe", "microbatches": 4},
            ),
            "PP3 1F1B mBART-shaped (untied)": (
                _untied("mbart"),
                {"pp": 3, "pp_schedule": "1F1B", "microbatches": 4},
            ),
            "PP3 1F1B GShard top-2 in both stacks, aux and z losses": (
                _with_aux(),
                {"pp": 3, "pp_schedule": "1F1B", "microbatches": 4},
            ),
        },
    )


def test_pp2_interleaved_matches_the_reference():
    _check(
        2,
        {
            "PP2 Interleaved1F1B, 4 stages [enc | enc | dec | dec]": (
                _untied("mt5"),
                {
                    "pp": 2,
                    "pp_schedule": "Interleaved1F1B",
                    "stages_per_rank": 2,
                    "microbatches": 4,
                },
            ),
        },
    )
