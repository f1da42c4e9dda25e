"""Decoder adapters: ``LlamaForCausalLM`` (dense), ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` (MoE).

What to call: usually ``checkpoints_tools.adapters.to_hf`` / ``from_hf``, which pick the class
here. Each of :class:`LlamaAdapter`, :class:`MixtralAdapter`, :class:`Qwen3MoeAdapter` has
``check(cfg)`` (``ValueError``, one line, when ``cfg`` has no exact twin of that class),
``to_hf(state_dict, cfg)`` -> ``(hf_state_dict, hf_config)``, ``config_from_hf(hf_config)`` ->
our ``ModelConfig`` and ``from_hf(hf_state_dict, hf_config)`` -> ``(state_dict, ModelConfig)``
(``ValueError`` for variants we do not import: sliding windows; Qwen3-MoE attention biases or
``mlp_only_layers``). Imported MoE models come back dropless, as transformers runs them. Weights
are renamed, concatenated or split only: a round trip is bit-exact.

Which MoE class:
    Mixtral renormalises its top-k gates (``router_top_value /= sum``), so it represents our
    normalised top-k routers (gshard, topk) with an MoE feed-forward in every layer and no q/k
    norm. Switch's top-1 gate is the raw softmax probability, which Mixtral would renormalise
    to 1. ``Qwen3MoeForCausalLM`` with ``norm_topk_prob=False`` keeps the raw probability
    (softmax in fp32, top-k, no renormalisation), so it represents Switch exactly; it also takes
    ``norm_topk_prob=True`` and MoE in every k-th layer (``decoder_sparse_step``, the same
    (i + 1) % k == 0 rule as ``model.moe.every``), with ``intermediate_size`` for the dense layers.
    Its attention always applies a per-head RMSNorm to q and k before RoPE, so our model gained
    ``model.qk_norm`` and this export requires it. Other candidates were rejected: OLMoE's q/k
    norm spans all heads together (it breaks with tensor parallel heads), Qwen2-MoE always adds a
    shared expert, and SwitchTransformers is an encoder-decoder.
    So: normalised gates, every layer MoE, no q/k norm -> Mixtral; otherwise -> Qwen3-MoE, which
    needs ``model.qk_norm=true``.

Layout: our experts ``w1``/``w3`` ``[E, F, D]`` are concatenated on dim 1 into transformers'
``gate_up_proj`` ``[E, 2F, D]`` (gate first); ``w2`` ``[E, D, F]`` is ``down_proj`` as is. Our
RoPE uses the same half-split rotation as transformers, so q/k weights need no permutation.
"""

from __future__ import annotations

from typing import Any

import torch

from checkpoints_tools.adapters.base import (
    StateDict,
    as_config,
    rename,
    require,
    require_hf,
    rope_theta_of,
)
from pretrain.models.config import ModelConfig, MoEConfig
from pretrain.models.moe import gates_normalized
from pretrain.models.transformer import is_moe_layer


def _check_decoder(cfg: ModelConfig, *, target: str) -> None:
    for key, expected in (
        ("family", "decoder"),
        ("position", "rope"),
        ("norm", "rmsnorm"),
        ("norm_position", "pre"),
        ("mlp", "swiglu"),
        ("bias", False),
        ("num_languages", 0),
    ):
        require(key, value=getattr(cfg, key), expected=expected, target=target)


def _layer_table(cfg: ModelConfig, layer: int) -> dict[str, str]:
    ours, theirs = f"layers.{layer}.", f"model.layers.{layer}."
    table = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    if cfg.qk_norm:
        table["attention.q_norm.weight"] = "self_attn.q_norm.weight"
        table["attention.k_norm.weight"] = "self_attn.k_norm.weight"
    if is_moe_layer(cfg, layer=layer):
        table["moe.router.gate.weight"] = "mlp.gate.weight"
    else:
        table["feed_forward.w1.weight"] = "mlp.gate_proj.weight"
        table["feed_forward.w3.weight"] = "mlp.up_proj.weight"
        table["feed_forward.w2.weight"] = "mlp.down_proj.weight"
    return {ours + k: theirs + v for k, v in table.items()}


def _table(cfg: ModelConfig) -> dict[str, str]:
    """Our key -> transformers key for every 1:1 tensor (experts are handled apart)."""
    table = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
    }
    if not cfg.tie_embeddings:
        table["output.weight"] = "lm_head.weight"
    for layer in range(cfg.num_layers):
        table.update(_layer_table(cfg, layer))
    return table


def _to_hf_state_dict(state_dict: StateDict, cfg: ModelConfig) -> StateDict:
    remaining = dict(state_dict)
    hf: StateDict = {}
    for layer in range(cfg.num_layers):
        if not is_moe_layer(cfg, layer=layer):
            continue
        ours, theirs = f"layers.{layer}.moe.experts.", f"model.layers.{layer}.mlp.experts."
        w1_EFD, w3_EFD = remaining.pop(ours + "w1"), remaining.pop(ours + "w3")
        hf[theirs + "gate_up_proj"] = torch.cat([w1_EFD, w3_EFD], dim=1)
        hf[theirs + "down_proj"] = remaining.pop(ours + "w2")
    hf.update(rename(remaining, table=_table(cfg)))
    if cfg.tie_embeddings:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return hf


def _from_hf_state_dict(hf_state_dict: StateDict, cfg: ModelConfig) -> StateDict:
    remaining = dict(hf_state_dict)
    if cfg.tie_embeddings:
        remaining.pop("lm_head.weight", None)
    ours: StateDict = {}
    for layer in range(cfg.num_layers):
        if not is_moe_layer(cfg, layer=layer):
            continue
        mine, theirs = f"layers.{layer}.moe.experts.", f"model.layers.{layer}.mlp.experts."
        gate_up_E2FD = remaining.pop(theirs + "gate_up_proj")
        w1_EFD, w3_EFD = gate_up_E2FD.chunk(2, dim=1)
        ours[mine + "w1"] = w1_EFD.contiguous()
        ours[mine + "w3"] = w3_EFD.contiguous()
        ours[mine + "w2"] = remaining.pop(theirs + "down_proj")
    inverse = {v: k for k, v in _table(cfg).items()}
    ours.update(rename(remaining, table=inverse))
    return ours


def _common_hf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "pad_token_id": cfg.pad_token_id,
    }


def _common_cfg_kwargs(hf: Any, *, source: str) -> dict[str, Any]:
    require_hf("hidden_act", value=hf.hidden_act, expected="silu", source=source)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return {
        "family": "decoder",
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.hidden_size,
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": hf.num_key_value_heads or hf.num_attention_heads,
        "head_dim": head_dim,
        "max_seq_len": hf.max_position_embeddings,
        "position": "rope",
        "rope_theta": rope_theta_of(hf, source=source),
        "norm": "rmsnorm",
        "norm_eps": hf.rms_norm_eps,
        "norm_position": "pre",
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "init_std": hf.initializer_range,
        "pad_token_id": hf.pad_token_id,
    }


class LlamaAdapter:
    """Dense decoder <-> ``LlamaForCausalLM``."""

    name = "llama"
    hf_architecture = "LlamaForCausalLM"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact Llama twin."""
        target = LlamaAdapter.hf_architecture
        _check_decoder(cfg, target=target)
        require("moe.num_experts", value=cfg.moe.num_experts, expected=0, target=target)
        require("qk_norm", value=cfg.qk_norm, expected=False, target=target)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, LlamaConfig)``. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import LlamaConfig

        LlamaAdapter.check(cfg)
        hf_config = LlamaConfig(
            **_common_hf_kwargs(cfg),
            intermediate_size=cfg.ffn_hidden_size,
            attention_bias=False,
            mlp_bias=False,
            architectures=[LlamaAdapter.hf_architecture],
        )
        return _to_hf_state_dict(state_dict, cfg), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of a Llama config. Raises ValueError for unsupported variants."""
        hf = as_config(hf_config, "llama")
        source = "llama"
        require_hf("attention_bias", value=bool(hf.attention_bias), expected=False, source=source)
        require_hf("mlp_bias", value=bool(hf.mlp_bias), expected=False, source=source)
        return ModelConfig(
            **_common_cfg_kwargs(hf, source=source), ffn_hidden_size=hf.intermediate_size
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``. Raises ValueError for unsupported Llama variants."""
        cfg = LlamaAdapter.config_from_hf(hf_config)
        return _from_hf_state_dict(hf_state_dict, cfg), cfg


class MixtralAdapter:
    """MoE decoder, normalised top-k gates in every layer <-> ``MixtralForCausalLM``."""

    name = "mixtral"
    hf_architecture = "MixtralForCausalLM"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact Mixtral twin."""
        target = MixtralAdapter.hf_architecture
        _check_decoder(cfg, target=target)
        if cfg.moe.num_experts == 0:
            raise ValueError(f"model.moe.num_experts (0) must be > 0 to export to {target}")
        require("qk_norm", value=cfg.qk_norm, expected=False, target=target)
        require("moe.every", value=cfg.moe.every, expected=1, target=target)
        require("moe.normalize_gates", value=gates_normalized(cfg), expected=True, target=target)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, MixtralConfig)``. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import MixtralConfig

        MixtralAdapter.check(cfg)
        hf_config = MixtralConfig(
            **_common_hf_kwargs(cfg),
            intermediate_size=cfg.expert_ffn_width,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
            architectures=[MixtralAdapter.hf_architecture],
        )
        return _to_hf_state_dict(state_dict, cfg), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of a Mixtral config; the MoE is dropless, as transformers runs it.

        Raises:
            ValueError: sliding-window attention.
        """
        hf = as_config(hf_config, "mixtral")
        require_hf("sliding_window", value=hf.sliding_window, expected=None, source="mixtral")
        moe = MoEConfig(
            num_experts=hf.num_local_experts,
            top_k=hf.num_experts_per_tok,
            router="gshard" if hf.num_experts_per_tok == 2 else "topk",
            normalize_gates=True,
            dropless=True,
            aux_loss_coef=hf.router_aux_loss_coef,
        )
        return ModelConfig(
            **_common_cfg_kwargs(hf, source="mixtral"),
            ffn_hidden_size=hf.intermediate_size,
            moe=moe,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``; the MoE comes back dropless, as transformers runs it.

        Raises:
            ValueError: sliding-window attention.
        """
        cfg = MixtralAdapter.config_from_hf(hf_config)
        return _from_hf_state_dict(hf_state_dict, cfg), cfg


class Qwen3MoeAdapter:
    """MoE decoder with per-head q/k norm (Switch's unnormalised top-1 gate, or any top-k,
    MoE in every k-th layer) <-> ``Qwen3MoeForCausalLM``."""

    name = "qwen3_moe"
    hf_architecture = "Qwen3MoeForCausalLM"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact Qwen3-MoE twin."""
        target = Qwen3MoeAdapter.hf_architecture
        _check_decoder(cfg, target=target)
        if cfg.moe.num_experts == 0:
            raise ValueError(f"model.moe.num_experts (0) must be > 0 to export to {target}")
        require("qk_norm", value=cfg.qk_norm, expected=True, target=target)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, Qwen3MoeConfig)``. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import Qwen3MoeConfig

        Qwen3MoeAdapter.check(cfg)
        hf_config = Qwen3MoeConfig(
            **_common_hf_kwargs(cfg),
            intermediate_size=cfg.ffn_hidden_size,
            moe_intermediate_size=cfg.expert_ffn_width,
            num_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            norm_topk_prob=gates_normalized(cfg),
            decoder_sparse_step=cfg.moe.every,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.moe.aux_loss_coef,
            attention_bias=False,
            use_sliding_window=False,
            architectures=[Qwen3MoeAdapter.hf_architecture],
        )
        return _to_hf_state_dict(state_dict, cfg), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of a Qwen3-MoE config; the MoE is dropless, as transformers runs
        it.

        Raises:
            ValueError: attention biases, sliding windows or ``mlp_only_layers``.
        """
        hf = as_config(hf_config, "qwen3_moe")
        source = "qwen3_moe"
        require_hf("attention_bias", value=bool(hf.attention_bias), expected=False, source=source)
        require_hf("sliding_window", value=hf.sliding_window, expected=None, source=source)
        require_hf(
            "mlp_only_layers", value=list(hf.mlp_only_layers or []), expected=[], source=source
        )
        top_k, normalized = hf.num_experts_per_tok, bool(hf.norm_topk_prob)
        if top_k == 1 and not normalized:
            router = "switch"
        elif top_k == 2 and normalized:
            router = "gshard"
        else:
            router = "topk"
        moe = MoEConfig(
            num_experts=hf.num_experts,
            top_k=top_k,
            router=router,
            every=hf.decoder_sparse_step,
            expert_ffn_hidden_size=hf.moe_intermediate_size,
            normalize_gates=normalized,
            dropless=True,
            aux_loss_coef=hf.router_aux_loss_coef,
        )
        return ModelConfig(
            **_common_cfg_kwargs(hf, source=source),
            ffn_hidden_size=hf.intermediate_size,
            qk_norm=True,
            moe=moe,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``; the MoE comes back dropless, as transformers runs it.

        Raises:
            ValueError: attention biases, sliding windows or ``mlp_only_layers``.
        """
        cfg = Qwen3MoeAdapter.config_from_hf(hf_config)
        return _from_hf_state_dict(hf_state_dict, cfg), cfg
