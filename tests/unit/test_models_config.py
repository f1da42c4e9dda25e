"""Model config: one-line errors pinned by message; presets build on the meta device."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from pretrain.models import build_model, param_counts, validate_model
from pretrain.models.config import ModelConfig, MoEConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OK = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64)


def _moe(**kwargs) -> ModelConfig:
    return dataclasses.replace(OK, moe=MoEConfig(num_experts=4, **kwargs))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            dataclasses.replace(OK, num_heads=4, num_kv_heads=3),
            "model.num_heads (4) must be divisible by model.num_kv_heads (3)",
        ),
        (
            dataclasses.replace(OK, hidden_size=30, num_heads=4),
            (
                "model.hidden_size (30) must be divisible by model.num_heads (4) when "
                "model.head_dim is not set"
            ),
        ),
        (
            dataclasses.replace(OK, head_dim=7),
            "model.head_dim (7) must be even with model.position=rope",
        ),
        (
            _moe(top_k=5, router="topk"),
            "model.moe.top_k (5) must be <= model.moe.num_experts (4)",
        ),
        (
            _moe(top_k=2, capacity_factor=0.0),
            "model.moe.capacity_factor (0.0) must be > 0",
        ),
        (
            _moe(top_k=2, capacity_factor=-1.0),
            "model.moe.capacity_factor (-1.0) must be > 0",
        ),
        (
            _moe(router="expert_choice"),
            "model.moe.router ('expert_choice') must be one of switch, gshard, topk",
        ),
        (
            dataclasses.replace(OK, family="gpt"),
            "model.family ('gpt') must be one of decoder, encoder, encoder_decoder",
        ),
        (
            dataclasses.replace(OK, pad_token_id=64),
            "model.pad_token_id (64) must be in [0, model.vocab_size (64))",
        ),
        (
            dataclasses.replace(OK, attention="flash"),
            "model.attention ('flash') must be one of sdpa, flex, auto",
        ),
        (
            dataclasses.replace(OK, attention="flex", dropout=0.1),
            "model.dropout (0.1) must be 0 with model.attention=flex (FlexAttention has no "
            "attention dropout)",
        ),
    ],
    ids=[
        "attention",
        "flex-dropout",
        "kv-heads",
        "head-dim-divisible",
        "head-dim-even",
        "top-k",
        "capacity-zero",
        "capacity-negative",
        "router",
        "family",
        "pad-token",
    ],
)
def test_bad_config_is_one_line(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_model(cfg)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build_model(cfg)


def test_dropless_ignores_capacity_factor() -> None:
    validate_model(_moe(top_k=2, capacity_factor=0.0, dropless=True))


def test_encoder_decoder_refuses_rope() -> None:
    # the family itself: tests/unit/test_encdec_model.py
    with pytest.raises(
        ValueError, match=r"^model\.position \('rope'\) must be relative, learned or sinusoidal"
    ):
        build_model(dataclasses.replace(OK, family="encoder_decoder"))


def _preset(name: str) -> ModelConfig:
    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    section = yaml.safe_load(path.read_text())["model"]
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize(
    ("name", "total_range", "active_range"),
    [
        ("tiny_decoder", (0.5e6, 5e6), None),
        ("tiny_moe", (0.5e6, 5e6), (0.5e6, 5e6)),
        ("tiny_encoder", (0.5e6, 5e6), None),
        ("decoder_125m", (100e6, 140e6), None),
        ("decoder_1b", (1.0e9, 1.2e9), None),
        ("moe_8x_top2", (3e9, 4e9), (1.0e9, 1.2e9)),
        ("switch_top1", (6e9, 7e9), (1.0e9, 1.2e9)),
        ("encoder_base", (260e6, 290e6), None),
    ],
)
def test_presets_build_on_meta(name: str, total_range, active_range) -> None:
    cfg = _preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    counts = param_counts(model)
    assert total_range[0] <= counts["params_total"] <= total_range[1], counts
    if active_range is None:
        assert counts["params_active"] == counts["params_total"]
    else:
        assert active_range[0] <= counts["params_active"] <= active_range[1], counts


def test_moe_presets_share_the_dense_1b_active_size() -> None:
    dense, moe = _preset("decoder_1b"), _preset("moe_8x_top2")
    with torch.device("meta"):
        dense_active = param_counts(build_model(dense))["params_active"]
        moe_active = param_counts(build_model(moe))["params_active"]
    # Same active FFN width (2 x 2816 = 5632); only the routers differ.
    assert moe_active - dense_active == moe.num_layers * moe.hidden_size * moe.moe.num_experts


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            _moe(top_k=2, eval_capacity_factor=0.0),
            "model.moe.eval_capacity_factor (0.0) must be > 0",
        ),
        (
            _moe(top_k=2, eval_capacity_factor=-2.0),
            "model.moe.eval_capacity_factor (-2.0) must be > 0",
        ),
        (
            _moe(top_k=2, aux_loss_type="gshard"),
            "model.moe.aux_loss_type ('gshard') must be one of topk, switch",
        ),
    ],
    ids=["eval-capacity-zero", "eval-capacity-negative", "aux-loss-type"],
)
def test_bad_moe_routing_config_is_one_line(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build_model(cfg)


def test_eval_capacity_factor_defaults_to_dropless_and_takes_null() -> None:
    assert MoEConfig().eval_capacity_factor is None
    assert MoEConfig().aux_loss_type == "topk"
    validate_model(_moe(top_k=2, eval_capacity_factor=None))
    validate_model(_moe(top_k=2, eval_capacity_factor=2.0))
    validate_model(_moe(top_k=2, dropless=True, eval_capacity_factor=0.0))  # ignored


def test_derived_values_resolve_the_none_defaults_and_stay_out_of_the_saved_config() -> None:
    from pretrain.config import RunConfig, config_to_dict

    dense = ModelConfig(hidden_size=96, num_heads=6, ffn_hidden_size=256)
    assert (dense.resolved_head_dim, dense.kv_heads, dense.expert_ffn_width) == (16, 6, 256)
    set_ = ModelConfig(
        hidden_size=96,
        num_heads=6,
        num_kv_heads=2,
        head_dim=32,
        ffn_hidden_size=256,
        moe=MoEConfig(num_experts=4, expert_ffn_hidden_size=48),
    )
    assert (set_.resolved_head_dim, set_.kv_heads, set_.expert_ffn_width) == (32, 2, 48)
    # The fields keep what the user set; the properties never reach a saved config.
    assert (dense.head_dim, dense.num_kv_heads, dense.moe.expert_ffn_hidden_size) == (None,) * 3
    derived = {"resolved_head_dim", "kv_heads", "expert_ffn_width"}
    assert not derived & set(dataclasses.asdict(dense))
    assert not derived & set(config_to_dict(RunConfig(model=dense))["model"])


def test_architecture_keys_come_from_the_field_metadata() -> None:
    from pretrain.checkpoint import _ARCHITECTURE_KEYS
    from pretrain.models.config import architecture_keys

    # The keys a checkpoint and the run resuming it must agree on, in the order checked.
    expected = (
        "family", "vocab_size", "hidden_size", "num_layers", "num_decoder_layers", "num_heads",
        "num_kv_heads", "head_dim", "ffn_hidden_size", "position",
        "relative_attention_num_buckets", "relative_attention_max_distance", "norm",
        "norm_position", "mlp", "bias", "qk_norm", "tie_embeddings", "scale_attention",
        "scale_embeddings", "embedding_norm", "final_logits_bias", "scale_output",
        "num_languages", "type_vocab_size", "pair_head", "span_boundary_positions",
        "generator_fraction",
        "moe.num_experts", "moe.offset", "moe.top_k", "moe.router", "moe.every",
        "moe.expert_ffn_hidden_size",
    )  # fmt: skip
    assert architecture_keys() == expected
    assert _ARCHITECTURE_KEYS == expected


def test_every_choice_field_is_checked_from_its_literal_type() -> None:
    from data_pipeline.config import choices_of

    assert choices_of(ModelConfig) == {
        "family": ("decoder", "encoder", "encoder_decoder"),
        "position": ("rope", "learned", "relative", "sinusoidal"),
        "norm": ("rmsnorm", "layernorm"),
        "norm_position": ("pre", "post"),
        "mlp": ("swiglu", "gelu", "gated_gelu", "relu"),
        "attention": ("sdpa", "flex", "auto"),
    }
    assert choices_of(MoEConfig) == {
        "router": ("switch", "gshard", "topk"),
        "aux_loss_type": ("topk", "switch"),
    }
    for key, value, choices in (
        ("position", "alibi", "rope, learned, relative, sinusoidal"),
        ("norm", "batchnorm", "rmsnorm, layernorm"),
        ("norm_position", "sandwich", "pre, post"),
        ("mlp", "geglu", "swiglu, gelu, gated_gelu, relu"),
    ):
        with pytest.raises(ValueError) as info:
            validate_model(dataclasses.replace(OK, **{key: value}))
        assert str(info.value) == f"model.{key} ({value!r}) must be one of {choices}"
