"""The encoder-decoder family: padding and packing invariance, T5's relative buckets, MoE layer
placement, the config rules that only this family reads.

Shape legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import build_model
from pretrain.models.config import ModelConfig, MoEConfig, validate_model
from pretrain.models.encoder_decoder import (
    EncoderDecoder,
    is_encdec_moe_layer,
    relative_position_bucket,
)
from pretrain.models.transformer import is_moe_layer
from tests.twins import tiny_encdec  # noqa: E402

VOCAB = 64

_COMMON = {"vocab_size": VOCAB, "ffn_hidden_size": 48, "max_seq_len": 64}
_BUCKETS = {"relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}
MT5 = tiny_encdec("mt5", **_COMMON, num_decoder_layers=3)
MBART = tiny_encdec("mbart", **_COMMON, **_BUCKETS, num_decoder_layers=3, pad_token_id=0)
SWITCH = tiny_encdec("switch", **_COMMON)
NLLB = tiny_encdec("nllb", **_COMMON, **_BUCKETS, num_decoder_layers=3)
SHAPES = {"mt5": MT5, "mbart": MBART, "switch": SWITCH, "nllb": NLLB}


def _model(cfg: ModelConfig, *, seed: int = 0) -> EncoderDecoder:
    model = build_model(cfg)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # norms and biases random too
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _ids(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_appended_padding_changes_no_real_logit(shape: str) -> None:
    model = _model(SHAPES[shape])
    src_BS, tgt_BT = _ids(2, 9, seed=1), _ids(2, 6, seed=2)
    with torch.no_grad():
        plain_BTV = model(src_BS, tgt_BT)
        padded_BTV = model(
            F.pad(src_BS, (0, 5), value=0),
            F.pad(tgt_BT, (0, 3), value=0),
            document_ids_BS=F.pad(torch.zeros_like(src_BS), (0, 5), value=-1),
            decoder_document_ids_BT=F.pad(torch.zeros_like(tgt_BT), (0, 3), value=-1),
        )
    assert padded_BTV.shape == (2, 9, VOCAB)
    assert (padded_BTV[:, :6] - plain_BTV).abs().max().item() < 1e-5
    assert plain_BTV.abs().max().item() > 1e-2


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_packed_pairs_equal_separate_rows(shape: str) -> None:
    model = _model(SHAPES[shape])
    src_a, src_b = _ids(1, 7, seed=3), _ids(1, 5, seed=4)
    tgt_a, tgt_b = _ids(1, 4, seed=5), _ids(1, 6, seed=6)
    src_BS = torch.cat([src_a, src_b, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    src_doc_BS = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 2])
    tgt_BT = torch.cat([tgt_a, tgt_b, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    tgt_doc_BT = torch.tensor([[0] * 4 + [1] * 6 + [-1]])
    with torch.no_grad():
        packed_BTV = model(
            src_BS, tgt_BT, document_ids_BS=src_doc_BS, decoder_document_ids_BT=tgt_doc_BT
        )
        alone_a = model(src_a, tgt_a)
        alone_b = model(src_b, tgt_b)
    assert (packed_BTV[:, :4] - alone_a).abs().max().item() < 1e-5
    assert (packed_BTV[:, 4:10] - alone_b).abs().max().item() < 1e-5


def test_encode_decode_and_hidden_compose_to_forward() -> None:
    model = _model(MBART)
    src_BS, tgt_BT = _ids(2, 8, seed=7), _ids(2, 5, seed=8)
    with torch.no_grad():
        logits_BTV = model(src_BS, tgt_BT)
        hidden_BTD = model.decode(tgt_BT, memory_BSD=model.encode(src_BS))
        weight_VD, bias_V = model.output_projection()
        assert torch.equal(model(src_BS, tgt_BT, return_hidden=True), hidden_BTD)
    assert (F.linear(hidden_BTD, weight_VD, bias_V) - logits_BTV).abs().max().item() < 1e-6
    assert weight_VD is model.tok_embeddings.weight and bias_V is model.output_bias


def test_decoder_is_causal_and_sees_the_source() -> None:
    model = _model(MT5)
    src_BS, tgt_BT = _ids(1, 8, seed=9), _ids(1, 6, seed=10)
    changed_tgt = tgt_BT.clone()
    changed_tgt[0, 4] = (tgt_BT[0, 4] + 1) % VOCAB
    changed_src = src_BS.clone()
    changed_src[0, 7] = (src_BS[0, 7] + 1) % VOCAB
    with torch.no_grad():
        base = model(src_BS, tgt_BT)
        later = model(src_BS, changed_tgt)
        other_src = model(changed_src, tgt_BT)
    assert torch.allclose(base[:, :4], later[:, :4], atol=1e-6)
    assert not torch.allclose(base[:, 4:], later[:, 4:], atol=1e-4)
    assert not torch.allclose(base[:, :1], other_src[:, :1], atol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (12, 20)])
def test_relative_buckets_equal_t5s(bidirectional: bool, num_buckets: int, max_distance: int):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    pos = torch.arange(300)
    relative_KK = pos[None, :] - pos[:, None]
    ours = relative_position_bucket(
        relative_KK, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    theirs = t5.T5Attention._relative_position_bucket(
        relative_KK, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    assert torch.equal(ours, theirs)
    assert int(ours.max()) == num_buckets - 1


def test_only_block_zero_owns_the_relative_table() -> None:
    model = build_model(MT5)
    owners = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert owners == [
        "encoder.layers.0.attention.relative_attention_bias.weight",
        "decoder.layers.0.attention.relative_attention_bias.weight",
    ]
    assert model.decoder.layers["0"].cross_attention.relative_attention_bias is None


@pytest.mark.parametrize(("num_layers", "num_sparse"), [(12, 3), (12, 6), (4, 2), (2, 1), (6, 6)])
def test_switch_offset_places_moe_where_switch_transformers_does(num_layers, num_sparse):
    step = num_layers // num_sparse
    # SwitchTransformersStack: block i is sparse if i % step == 1 or step == 1
    expected = [i for i in range(num_layers) if i % step == 1 or step == 1]
    moe = MoEConfig(num_experts=4, top_k=1, router="switch", every=step, offset=1 % step)
    cfg = dataclasses.replace(SWITCH, num_layers=num_layers, num_decoder_layers=num_layers, moe=moe)
    assert [i for i in range(num_layers) if is_encdec_moe_layer(cfg, layer=i)] == expected
    model = build_model(cfg)
    names = sorted(model.moe_layers())
    assert names == sorted(
        [f"encoder.layers.{i}.moe" for i in expected]
        + [f"decoder.layers.{i}.moe" for i in expected]
    )
    if num_layers == 12 and num_sparse == 3:
        assert expected == [1, 5, 9]


def test_default_offset_is_the_every_rule() -> None:
    moe = MoEConfig(num_experts=4, top_k=2, router="gshard", every=3)
    cfg = dataclasses.replace(SWITCH, num_layers=6, num_decoder_layers=6, moe=moe)
    decoder_cfg = dataclasses.replace(cfg, family="decoder", position="rope", mlp="swiglu")
    for layer in range(6):
        assert is_encdec_moe_layer(cfg, layer=layer) == is_moe_layer(decoder_cfg, layer=layer)


def test_moe_layers_route_no_padding_and_report() -> None:
    model = _model(SWITCH)
    src_BS = F.pad(_ids(2, 6, seed=11), (0, 4))
    tgt_BT = F.pad(_ids(2, 5, seed=12), (0, 2))
    src_doc = F.pad(torch.zeros(2, 6, dtype=torch.long), (0, 4), value=-1)
    tgt_doc = F.pad(torch.zeros(2, 5, dtype=torch.long), (0, 2), value=-1)
    model.train()
    model(src_BS, tgt_BT, document_ids_BS=src_doc, decoder_document_ids_BT=tgt_doc)
    stats = model.moe_stats()
    assert sorted(stats) == [
        "decoder.layers.1.moe",
        "decoder.layers.3.moe",
        "encoder.layers.1.moe",
        "encoder.layers.3.moe",
    ]
    assert int(stats["encoder.layers.1.moe"].num_routed) == 12
    assert int(stats["decoder.layers.3.moe"].num_routed) == 10


def test_init_is_per_parameter_name_and_t5_scaled() -> None:
    a, b = build_model(MT5), build_model(MT5)
    a.init_weights(3)
    b.init_weights(3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    q = a.encoder.layers["0"].attention.wq.weight
    assert abs(q.std().item() - (32 * 12) ** -0.5) < 0.2 * (32 * 12) ** -0.5
    assert a.encoder.layers["0"].attention_norm.weight.eq(1).all()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"position": "rope"},
            r"^model\.position \('rope'\) must be relative, learned or sinusoidal with ",
        ),
        (
            {"relative_attention_num_buckets": 10},
            r"^model\.relative_attention_num_buckets \(10\) must be divisible by 4",
        ),
        ({"num_decoder_layers": 0}, r"^model\.num_decoder_layers \(0\) must be > 0$"),
        (
            {"moe": MoEConfig(num_experts=4, top_k=1, router="switch", every=2, offset=2)},
            r"^model\.moe\.offset \(2\) must be in \[0, model\.moe\.every \(2\)\)$",
        ),
        (
            {"mlp": "gated_gelu", "moe": MoEConfig(num_experts=4, top_k=1, router="switch")},
            r"^model\.mlp \('gated_gelu'\) must be swiglu.* with model\.moe\.num_experts",
        ),
    ],
)
def test_encoder_decoder_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_model(dataclasses.replace(MT5, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scale_attention": False}, r"^model\.scale_attention \(False\) must be True with "),
        ({"position": "relative"}, r"^model\.position \('relative'\) requires model\.family="),
        ({"position": "sinusoidal"}, r"^model\.position \('sinusoidal'\) requires model\."),
        ({"scale_output": True}, r"^model\.scale_output \(True\) must be False with "),
        ({"mlp": "relu"}, r"^model\.mlp \('relu'\) requires model\.family=encoder_decoder"),
        ({"num_decoder_layers": 2}, r"^model\.num_decoder_layers \(2\) must be None with "),
    ],
)
def test_encoder_decoder_keys_refused_elsewhere(changes: dict, message: str) -> None:
    decoder = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_heads=4, ffn_hidden_size=48)
    with pytest.raises(ValueError, match=message):
        validate_model(dataclasses.replace(decoder, **changes))


def test_dense_gated_gelu_and_relu_build() -> None:
    for mlp in ("gated_gelu", "relu"):
        validate_model(dataclasses.replace(MT5, mlp=mlp))


def test_scale_output_is_part_of_the_hidden_states_the_head_takes() -> None:
    # the chunked losses and generation apply output_projection() to decode()'s output
    cfg = dataclasses.replace(MT5, tie_embeddings=True, scale_output=True)
    model = _model(cfg)
    plain = _model(dataclasses.replace(cfg, scale_output=False))
    src_BS, tgt_BT = _ids(2, 8, seed=13), _ids(2, 5, seed=14)
    with torch.no_grad():
        hidden_BTD = model(src_BS, tgt_BT, return_hidden=True)
        weight_VD, bias_V = model.output_projection()
        assert bias_V is None and weight_VD is model.tok_embeddings.weight
        logits_BTV = model(src_BS, tgt_BT)
        unscaled_BTD = plain(src_BS, tgt_BT, return_hidden=True)
    assert (F.linear(hidden_BTD, weight_VD) - logits_BTV).abs().max().item() < 1e-6
    assert (hidden_BTD - unscaled_BTD * 32**-0.5).abs().max().item() < 1e-6
