"""Encoder-decoder pipeline stages in one process: the stage layout ``[encoder stages | decoder
stages]``, and the stages chained by hand (each one's outputs the next one's inputs, ids as
keyword arguments) give the whole model's logits and parameter gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.models import (
    build_model,
    pipeline_split_points,
    pipeline_stage_layers,
    prune_to_stage,
)
from pretrain.models.transformer import canonical_name
from tests.distributed.parallel_cases import tiny_encdec_config


def test_stage_layout_keeps_the_stacks_apart():
    cfg = tiny_encdec_config("mt5")
    assert pipeline_stage_layers(cfg, num_stages=1) == [
        ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    ]
    assert pipeline_stage_layers(cfg, num_stages=2) == [
        ["encoder.0", "encoder.1"],
        ["decoder.0", "decoder.1"],
    ]
    assert pipeline_stage_layers(cfg, num_stages=3) == [
        ["encoder.0", "encoder.1"],
        ["decoder.0"],
        ["decoder.1"],
    ]
    assert pipeline_stage_layers(cfg, num_stages=4) == [
        ["encoder.0"], ["encoder.1"], ["decoder.0"], ["decoder.1"]
    ]  # fmt: skip
    assert pipeline_split_points(cfg, num_stages=3) == ["decoder.layers.0", "decoder.layers.1"]
    with pytest.raises(ValueError, match=r"^pipeline stages \(5\) must be between 1 and"):
        pipeline_stage_layers(cfg, num_stages=5)


def test_a_stage_of_both_stacks_and_a_split_tied_model_are_refused():
    cfg = dataclasses.replace(tiny_encdec_config("mt5"))
    with pytest.raises(ValueError, match=r"must be of one stack"):
        prune_to_stage(
            build_model(cfg), layer_keys=["encoder.1", "decoder.0"], first=False, last=False
        )
    with pytest.raises(ValueError, match=r"^model.tie_embeddings \(True\) cannot be split"):
        prune_to_stage(
            build_model(tiny_encdec_config("mbart")),
            layer_keys=["encoder.0"],
            first=True,
            last=False,
        )


@pytest.mark.parametrize("shape,num_stages", [("mt5", 3), ("mt5", 4), ("mbart", 2)])
def test_chained_stages_equal_the_whole_model(shape: str, num_stages: int):
    cfg = dataclasses.replace(tiny_encdec_config(shape), tie_embeddings=False)
    whole = build_model(cfg)
    whole.init_weights(5)
    gen = torch.Generator().manual_seed(0)
    source = torch.randint(1, cfg.vocab_size, (3, 10), generator=gen)
    source[1, -4:] = 0
    doc_ids = torch.where(source == 0, -1, 0)
    decoder_in = torch.randint(1, cfg.vocab_size, (3, 7), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (3, 7), generator=gen)
    ref = whole(source, decoder_in, document_ids_BS=doc_ids)
    torch.nn.functional.cross_entropy(ref.flatten(0, 1), targets.flatten()).backward()

    keys = pipeline_stage_layers(cfg, num_stages=num_stages)
    stages = []
    for index, layer_keys in enumerate(keys):
        stage = build_model(cfg)
        prune_to_stage(stage, layer_keys=layer_keys, first=index == 0, last=index == len(keys) - 1)
        stage.init_weights(5)
        stages.append(stage)
    out: tuple = (source,)
    for index, stage in enumerate(stages):
        out = stage(*out, decoder_tokens_BT=decoder_in, document_ids_BS=doc_ids)
        out = out if isinstance(out, tuple) else (out,)
        if index < len(stages) - 1:
            relative = cfg.position == "relative" and len(out) == 3
            assert len(out) == (3 if relative else 2)
    (logits,) = out
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    expected = {canonical_name(n): p.grad for n, p in whole.named_parameters()}
    seen = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            name = canonical_name(name)
            seen.add(name)
            torch.testing.assert_close(
                param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert seen == set(expected)  # every parameter on exactly the stages that need it
