"""SpanBERT entire (``objective.weights={spanbert: 1}``): span masking plus the span-boundary
objective. The boundary inputs on real tokens against the spans themselves, the loader's batches
(the same masking with and without them), the loss (MLM + SBO cross-entropies over the masked
count) against the formula written out here, the config rules and the export leaving the head
out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.transforms import (
    IGNORE_INDEX,
    MaskingConfig,
    SpanMaskingConfig,
    Vocab,
    join_mono,
    select_spans,
    span_mask,
)
from pretrain.batches import model_inputs
from pretrain.models import build_model
from pretrain.objectives import ObjectiveMix
from tests.objective_checks import encoder_config
from tests.sample_data import SAMPLE, first_lines


@pytest.fixture(scope="module")
def rows(tok_dir: Path) -> np.ndarray:
    tok = load_tokenizer(str(tok_dir))
    docs = tok.encode(first_lines(SAMPLE / "mono" / "en.train.txt.zst", 200))
    flat = np.concatenate([np.array(d, dtype=np.int64) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    ids, _ = join_mono(flat, offsets, eos_id=tok.special_ids["eos"])
    return ids[: (len(ids) // 64) * 64].reshape(-1, 64)


def test_boundaries_are_the_tokens_just_outside_each_span(rows, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    inputs, labels, bounds = span_mask(rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(2),
                                       with_boundaries=True)  # fmt: skip
    # the same draws without the boundaries: the same masking
    same = span_mask(rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(inputs, same[0])
    np.testing.assert_array_equal(labels, same[1])
    # the rule from the spans themselves: the latest span covering a token owns it
    _, spans = select_spans(rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(2))
    want = {k: np.full(rows.shape, -1) for k in ("left_BT", "right_BT", "offset_BT")}
    width = rows.shape[1]
    for row, start, end in zip(spans.row_S, spans.start_S, spans.end_S):
        for i in range(start, end):
            want["left_BT"][row, i] = max(start - 1, 0)
            want["right_BT"][row, i] = min(end, width - 1)
            want["offset_BT"][row, i] = i - start
    for key, table in want.items():
        np.testing.assert_array_equal(bounds[key], table, err_msg=key)
    assert ((bounds["left_BT"] >= 0) == (labels != IGNORE_INDEX)).all()
    assert bounds["offset_BT"].max() >= 3  # spans of several pieces


def _loader(shards, *, span_boundary: bool):
    data = DataConfig(manifest=str(shards["shards"]), seq_len=64, batch_size=4)
    masking = MaskingConfig(mono_kinds=(("span", 1.0),), span_boundary=span_boundary)
    return build_loader(data, dp_rank=0, dp_world_size=1, objective="mlm", masking=masking,
                        seed=3)  # fmt: skip


def test_loader_batches_carry_the_boundaries_and_mask_as_without(shards) -> None:
    batch = next(iter(_loader(shards, span_boundary=True)))
    plain = next(iter(_loader(shards, span_boundary=False)))
    assert "span_left" not in plain
    torch.testing.assert_close(batch["input_ids"], plain["input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(batch["labels"], plain["labels"], rtol=0, atol=0)
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["span_left"] >= 0, chosen)
    assert bool((batch["span_left"][chosen] < batch["span_right"][chosen]).all())


def test_config_rules() -> None:
    cfg = encoder_config("objective.weights={spanbert: 1}")
    assert cfg.model.span_boundary_positions == 32
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert transform == "mlm" and masking.span_boundary and masking.mono_kinds == (("span", 1.0),)
    with pytest.raises(ValueError, match=r"two objectives of one row kind \(span, spanbert\)"):
        encoder_config("objective.weights={span: 1, spanbert: 1}")
    with pytest.raises(ValueError, match=r"objective.weights.spanbert needs parallel.pp 1"):
        encoder_config(
            "objective.weights={spanbert: 1}",
            "parallel.pp=2",
            "model.tie_embeddings=false",
            "parallel.dp_shard=1",
        )


def test_the_loss_is_mlm_plus_sbo_over_the_masked_count(shards) -> None:
    cfg = encoder_config("objective.weights={spanbert: 1}", "model.dropout=0.0")
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = next(iter(_loader(shards, span_boundary=True)))
    mix = ObjectiveMix.from_config(cfg)
    num_groups = mix.num_groups(4)
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    labels = mix.targets(batch["labels"])
    groups = mix.target_groups(batch["lang_ids"], batch["attention_mask"], num_languages=4,
                               row_transform_B=batch["row_transform"])  # fmt: skip
    options = mix.model_options(batch)
    labels_x, groups_x = mix.extend_targets(labels, groups, batch, num_groups=num_groups)
    hidden = model(batch["input_ids"], return_hidden=True, **kwargs, **options)
    weight, bias = model.output_projection()
    loss, sums, counts = mix.loss(hidden, weight, bias, labels_x, groups_x, num_groups=num_groups)
    # the formula written out: the stack's states, then MLM at the targets and the SBO head
    seen = {}
    handle = model.head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    logits = model(batch["input_ids"], **kwargs)
    handle.remove()
    x = seen["x"]
    chosen = batch["labels"] != IGNORE_INDEX
    target = batch["labels"][chosen].long()
    mlm = F.cross_entropy(logits[chosen], target, reduction="sum")
    sbo = model.span_boundary
    rows, cols = chosen.nonzero().unbind(1)
    left, right = batch["span_left"][rows, cols].long(), batch["span_right"][rows, cols].long()
    offset = batch["span_offset"][rows, cols].long().clamp(max=31)
    h = torch.cat([x[rows, left], x[rows, right], sbo.positions.weight[offset]], dim=-1)
    h = F.layer_norm(F.gelu(F.linear(h, sbo.dense1.weight, sbo.dense1.bias)), (64,),
                     sbo.norm1.weight, sbo.norm1.bias, 1e-5)  # fmt: skip
    h = F.layer_norm(F.gelu(F.linear(h, sbo.dense2.weight, sbo.dense2.bias)), (64,),
                     sbo.norm2.weight, sbo.norm2.bias, 1e-5)  # fmt: skip
    boundary = F.cross_entropy(F.linear(h, weight, bias), target, reduction="sum")
    torch.testing.assert_close(loss, mlm + boundary, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums[-1], boundary.detach(), rtol=1e-5, atol=1e-4)
    assert float(counts[-1]) == float(chosen.sum()) == float(mix.num_targets(batch["labels"]))
    metrics = mix.group_metrics(sums.double(), counts.double(), ["de", "en", "ja", "ru"])
    assert metrics["span_boundary_loss"]["spanbert"] == pytest.approx(
        float(boundary.detach()) / float(chosen.sum()), rel=1e-5
    )
    # the head trains: its parameters get gradients from the loss
    loss.backward()
    assert float(sbo.dense1.weight.grad.abs().sum()) > 0


def test_export_leaves_the_boundary_head_out() -> None:
    from checkpoints_tools.adapters import to_hf

    cfg = encoder_config("objective.weights={spanbert: 1}")
    model = build_model(cfg.model)
    hf_state, hf_config = to_hf(model.state_dict(), cfg.model)
    assert hf_config.architectures == ["XLMRobertaForMaskedLM"]
    assert not any("span_boundary" in key or "positions.weight" == key for key in hf_state)
