"""Pipeline parallel with per-token stage inputs: document masks, position resets, language ids
and TLM-style padding go to every stage as ``schedule.step`` keyword arguments, microbatched like
the tokens, and PP2 (1F1B and interleaved) equals the unsplit model in one process (losses,
first-step gradients, grad norms and parameters after the steps; fp32, 1e-5).

Decoder rows: packed documents of random lengths (``document_ids_BT`` only: every stage derives
the RoPE positions from them). Encoder rows: TLM-like pairs ``src </s> tgt </s>`` (a language id
each, positions restarting at the source and at the target) packed and padded (document id -1),
MLM-like targets.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from parallel.parallelize import clip_grad_norm_
from parallel.pipeline import pipeline_step
from parallel.testing import run_distributed
from pretrain.models import build_model
from pretrain.models.transformer import canonical_name
from tests.distributed.parallel_cases import (
    MAX_NORM,
    SEED,
    assert_matches,
    full_params,
    loss_sum,
    pipeline_setup,
    tiny_config,
)
from tests.distributed.trainer_runs import fit_rank as _run
from tests.distributed.trainer_runs import logged_losses as _losses
from tests.distributed.trainer_runs import trainer_config as _cfg

STEPS = 3
BATCH = 4
SEQ = 24
NUM_LANGUAGES = 3

SCHEDULES = {
    "1F1B": {"pp": 2, "pp_schedule": "1F1B", "microbatches": 4},
    "Interleaved1F1B": {
        "pp": 2,
        "pp_schedule": "Interleaved1F1B",
        "stages_per_rank": 2,
        "microbatches": 4,
    },
}


def _decoder():
    return dataclasses.replace(tiny_config("decoder"), num_layers=4, document_masking=True)


def _encoder():
    return dataclasses.replace(
        tiny_config("encoder"),
        num_layers=4,
        tie_embeddings=False,
        num_languages=NUM_LANGUAGES,
        document_masking=True,
    )


def _decoder_batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
    doc_ids = torch.zeros(BATCH, SEQ, dtype=torch.int32)
    for row in range(BATCH):
        cuts = sorted(torch.randperm(SEQ - 1, generator=gen)[: row + 1].add(1).tolist())
        for doc, start in enumerate(cuts, start=1):
            doc_ids[row, start:] = doc
    kwargs = {"document_ids_BT": doc_ids}
    return tokens[:, :-1].contiguous(), kwargs, tokens[:, 1:].contiguous()


def _encoder_batch(gen: torch.Generator, vocab: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    tokens = torch.randint(5, vocab, (BATCH, SEQ), generator=gen)
    doc_ids = torch.full((BATCH, SEQ), -1, dtype=torch.int32)
    positions = torch.zeros(BATCH, SEQ, dtype=torch.int32)
    langs = torch.zeros(BATCH, SEQ, dtype=torch.int32)
    for row in range(BATCH):
        at, pair = 0, 0
        while True:
            src, tgt = (int(x) for x in torch.randint(2, 6, (2,), generator=gen))
            if at + src + tgt > SEQ - 2 + row % 2:  # rows end with 1-4 padding positions
                break
            doc_ids[row, at : at + src + tgt] = pair
            positions[row, at : at + src] = torch.arange(src, dtype=torch.int32)
            positions[row, at + src : at + src + tgt] = torch.arange(tgt, dtype=torch.int32)
            langs[row, at : at + src] = pair % NUM_LANGUAGES
            langs[row, at + src : at + src + tgt] = (pair + 1) % NUM_LANGUAGES
            at, pair = at + src + tgt, pair + 1
        tokens[row, at:] = 1  # padding id
    targets = torch.where(
        (torch.rand(BATCH, SEQ, generator=gen) < 0.3) & (doc_ids >= 0),
        torch.randint(0, vocab, (BATCH, SEQ), generator=gen),
        torch.full((BATCH, SEQ), -100),
    )
    kwargs = {"document_ids_BT": doc_ids, "position_ids_BT": positions, "lang_ids_BT": langs}
    return tokens, kwargs, targets


def _data(cfg) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    make = _encoder_batch if cfg.family == "encoder" else _decoder_batch
    return [make(gen, cfg.vocab_size) for _ in range(STEPS)]


def _grads(models) -> dict[str, torch.Tensor]:
    return {
        canonical_name(name): p.grad.detach().clone()
        for model in models
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def _reference(cfg) -> dict:
    model = build_model(copy.deepcopy(cfg))
    model.init_weights(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses, norms, grads = [], [], None
    for tokens, kwargs, targets in _data(cfg):
        opt.zero_grad()
        logits = model(tokens, **kwargs)
        loss = loss_sum(logits, targets) / (targets != -100).sum()
        loss.backward()
        norms.append(clip_grad_norm_(model, max_norm=MAX_NORM, dims=None).item())
        grads = grads if grads is not None else _grads([model])
        losses.append(loss.item())
        opt.step()
    return {"losses": losses, "norms": norms, "grads": grads, "params": full_params(model)}


def _pp_run(rank: int, world_size: int, cfg, par: dict) -> dict:
    dims, schedule, models, info = pipeline_setup(world_size, cfg, par)
    opt = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.5, momentum=0.9)
    losses, norms, grads = [], [], None
    for tokens, kwargs, targets in _data(cfg):
        opt.zero_grad()
        loss = pipeline_step(
            schedule, info=info, dims=dims, inputs=tokens, targets=targets, stage_kwargs=kwargs
        )
        norms.append(clip_grad_norm_(models, max_norm=MAX_NORM, dims=dims).item())
        grads = grads if grads is not None else _grads(models)
        losses.append(loss.item())
        opt.step()
    params = {}
    for model in models:
        params.update(full_params(model))
    return {"losses": losses, "norms": norms, "grads": grads, "params": params}


def _cases(rank: int, world_size: int, cases: list[tuple]) -> list[dict]:
    return [_pp_run(rank, world_size, cfg, par) for cfg, par in cases]


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_pp2_with_document_masks_positions_and_languages_equals_one_process(family: str):
    cfg = _decoder() if family == "decoder" else _encoder()
    labels = list(SCHEDULES)
    results = run_distributed(
        _cases, world_size=2, args=([(cfg, SCHEDULES[k]) for k in labels],), timeout_s=300
    )
    ref = _reference(cfg)
    # The masks matter here: without them the reference's losses differ.
    plain = copy.deepcopy(cfg)
    model = build_model(plain)
    model.init_weights(SEED)
    tokens, kwargs, targets = _data(cfg)[0]
    unmasked = loss_sum(model(tokens), targets) / (targets != -100).sum()
    assert abs(unmasked.item() - ref["losses"][0]) > 1e-3
    for index, label in enumerate(labels):
        per_rank = [r[index] for r in results]
        grads, params = {}, {}
        for result in per_rank:
            grads.update(result["grads"])
            params.update(result["params"])
        assert grads.keys() == ref["grads"].keys(), label
        for name, value in ref["grads"].items():
            torch.testing.assert_close(
                grads[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{label} {n}: {m}"
            )
        for rank, result in enumerate(per_rank):
            try:
                assert_matches({**result, "params": params}, ref)
            except AssertionError as err:
                raise AssertionError(f"{family} {label}, rank {rank}: {err}") from None


# --- the trainer: PP2 on real shards with the presets' document masking on --------------------


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        # TLM rows (pairs with their own positions and languages, padded) beside MLM rows.
        ("tiny_encoder.yaml", ("model.tie_embeddings=false", "model.num_languages=4",
                               "objective.tlm_share=0.5")),
        ("tiny_decoder.yaml", ("data.reset_position_ids=true",)),
    ],
    ids=["encoder-tlm", "decoder-position-resets"],
)  # fmt: skip
def test_trainer_pp2_follows_one_process(shards, tmp_path, preset: str, extra):
    base = ("train.steps=4", "checkpoint.every=0", "train.eval_every=4", *extra)
    one = _cfg(preset, shards, tmp_path / "one", *base)
    assert run_distributed(_run, world_size=1, args=(one, None)) == [0]
    piped = _cfg(preset, shards, tmp_path / "pp", *base, "parallel.pp=2",
                 "parallel.microbatches=2")  # fmt: skip
    assert one.model.document_masking and piped.model.document_masking
    assert run_distributed(_run, world_size=2, args=(piped, None)) == [0, 0]
    reference, curve = _losses(tmp_path / "one"), _losses(tmp_path / "pp")
    assert sorted(curve) == sorted(reference) == [1, 2, 3, 4]
    for step in reference:
        assert curve[step] == pytest.approx(reference[step], rel=1e-5), step
    # Validation runs forward only through both stages, with the same masks.
    from pretrain.plots import read_metrics

    valid_one, valid_pp = (
        [r["valid_loss_per_lang"] for r in read_metrics(tmp_path / d / "metrics.jsonl")
         if "valid_loss_per_lang" in r]
        for d in ("one", "pp")
    )  # fmt: skip
    assert len(valid_one) == len(valid_pp) == 1
    assert valid_pp[0] == pytest.approx(valid_one[0], rel=1e-5)
