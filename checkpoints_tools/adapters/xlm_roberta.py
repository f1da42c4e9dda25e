"""Encoder adapters: dense encoder <-> ``XLMRobertaForMaskedLM``, and an encoder with BERT's
segment embeddings and pair head (``model.type_vocab_size``, ``model.pair_head``: NSP / SOP
pre-training) <-> ``BertForPreTraining``.

What to call: usually ``checkpoints_tools.adapters.to_hf`` / ``from_hf``. :class:`XLMRobertaAdapter`
has ``check(cfg)`` (``ValueError``, one line, when ``cfg`` has no exact XLM-R twin; an MoE
encoder among others), ``to_hf(state_dict, cfg)`` -> ``(hf_state_dict, XLMRobertaConfig)``,
``config_from_hf(hf_config)`` -> our ``ModelConfig`` and ``from_hf(hf_state_dict, hf_config)``
-> ``(state_dict, ModelConfig)`` (``ValueError`` for an activation other than GELU, a
decoder-style config, or a position table too small for its padding offset).

XLM-R details carried over exactly:
    positions: transformers numbers real tokens from ``padding_idx + 1`` (fairseq), so its table
        has ``max_seq_len + padding_idx + 1`` rows; our row p is its row ``p + padding_idx + 1``
        and the rows up to ``padding_idx`` are exported as zeros (padding tokens land there).
        Without a ``model.pad_token_id`` the export uses 1, XLM-R's ``<pad>``.
    token types: one row of zeros (``type_vocab_size=1``). On import a non-zero row 0 is folded
        into our position table (the sum is the same up to float rounding; other rows, used
        only for token types our models never take, are dropped).
    head: ``lm_head.dense`` -> GELU -> ``lm_head.layer_norm`` -> ``lm_head.decoder`` with
        ``lm_head.bias`` (= ``lm_head.decoder.bias``), the decoder weight tied to the word
        embeddings when ``model.tie_embeddings``.
An MoE encoder has no upstream masked-LM class and is refused. SpanBERT's span-boundary head
(``model.span_boundary_positions``) is a pre-training head: the exports leave it out.

BERT (:class:`BertAdapter`): the same body under ``bert.`` names; positions from 0 (no padding
offset: our row p is its row p), ``token_type_embeddings`` our segment table, ``bert.pooler``
our ``pooler``, ``cls.predictions.transform`` our MLM ``head`` with the decoder tied to the
word embeddings when ``model.tie_embeddings`` and ``cls.predictions.bias`` its bias, and
``cls.seq_relationship`` our ``pair_classifier``. Its labels: NSP 0 = B follows A, 1 = B is
random (``next_sentence_label``); a model trained with SOP uses the same head with 0 = in
order, 1 = swapped (``AlbertForPreTraining``'s ``sentence_order_label`` meaning, in BERT's
shape).
"""

from __future__ import annotations

from typing import Any

import torch

from checkpoints_tools.adapters.base import StateDict, as_config, rename, require, require_hf
from pretrain.models.config import ModelConfig

_LAYER = {
    "attention.wq": "attention.self.query",
    "attention.wk": "attention.self.key",
    "attention.wv": "attention.self.value",
    "attention.wo": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "feed_forward.w1": "intermediate.dense",
    "feed_forward.w2": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


def _padding_idx(cfg: ModelConfig) -> int:
    return cfg.pad_token_id if cfg.pad_token_id is not None else 1


def _table(cfg: ModelConfig) -> dict[str, str]:
    """Our key -> transformers key for every 1:1 tensor (positions and output apart)."""
    table = {
        "tok_embeddings.weight": "roberta.embeddings.word_embeddings.weight",
        "embed_norm.weight": "roberta.embeddings.LayerNorm.weight",
        "embed_norm.bias": "roberta.embeddings.LayerNorm.bias",
        "head.dense.weight": "lm_head.dense.weight",
        "head.dense.bias": "lm_head.dense.bias",
        "head.norm.weight": "lm_head.layer_norm.weight",
        "head.norm.bias": "lm_head.layer_norm.bias",
    }
    for layer in range(cfg.num_layers):
        for ours, theirs in _LAYER.items():
            for kind in ("weight", "bias"):
                table[f"layers.{layer}.{ours}.{kind}"] = (
                    f"roberta.encoder.layer.{layer}.{theirs}.{kind}"
                )
    return table


def _check_body(cfg: ModelConfig, *, target: str) -> None:
    """The encoder body both exports share (XLM-R's and BERT's): dense, learned positions,
    post-LayerNorm, GELU, biases, plain multi-head attention, no language embeddings."""
    require("family", value=cfg.family, expected="encoder", target=target)
    if cfg.moe.num_experts > 0:
        raise ValueError(
            f"model.moe.num_experts ({cfg.moe.num_experts}) must be 0 to export an encoder: "
            "transformers has no MoE masked-LM encoder class"
        )
    for key, expected in (
        ("position", "learned"),
        ("norm", "layernorm"),
        ("norm_position", "post"),
        ("mlp", "gelu"),
        ("bias", True),
        ("qk_norm", False),
        ("num_languages", 0),
    ):
        require(key, value=getattr(cfg, key), expected=expected, target=target)
    require(
        "num_kv_heads",
        value=cfg.kv_heads,
        expected=cfg.num_heads,
        target=target,
    )
    default_head_dim = cfg.hidden_size // cfg.num_heads
    require(
        "head_dim",
        value=cfg.resolved_head_dim,
        expected=default_head_dim,
        target=target,
    )


def _without_pretraining_heads(state_dict: StateDict) -> StateDict:
    """The state dict less SpanBERT's span-boundary head, a pre-training head with no place in
    transformers' classes (SpanBERT's own release leaves it out too)."""
    return {k: v for k, v in state_dict.items() if not k.startswith("span_boundary.")}


def _hf_body_config(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config values of the encoder body (XLM-R's and BERT's names)."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _body_config(hf: Any, *, source: str, **fields: Any) -> ModelConfig:
    """Our ``ModelConfig`` of an XLM-R / BERT config's body, plus ``fields``.

    Raises:
        ValueError: an activation other than GELU or a decoder-style config.
    """
    require_hf("hidden_act", value=hf.hidden_act, expected="gelu", source=source)
    require_hf("is_decoder", value=bool(hf.is_decoder), expected=False, source=source)
    return ModelConfig(
        family="encoder",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        position="learned",
        norm="layernorm",
        norm_eps=hf.layer_norm_eps,
        norm_position="post",
        mlp="gelu",
        bias=True,
        tie_embeddings=bool(hf.tie_word_embeddings),
        dropout=float(hf.hidden_dropout_prob),
        init_std=hf.initializer_range,
        pad_token_id=hf.pad_token_id,
        **fields,
    )


def _head_to_hf(remaining: StateDict, cfg: ModelConfig, hf: StateDict, *, prefix: str) -> None:
    """Our output projection into ``hf``: ``{prefix}.decoder.weight`` (untied; a tied one is
    set to the word embeddings afterwards), its bias as ``{prefix}.bias`` and
    ``{prefix}.decoder.bias``."""
    if cfg.tie_embeddings:
        bias_V = remaining.pop("output_bias")
    else:
        hf[f"{prefix}.decoder.weight"] = remaining.pop("output.weight")
        bias_V = remaining.pop("output.bias")
    hf[f"{prefix}.bias"] = bias_V
    hf[f"{prefix}.decoder.bias"] = bias_V


def _head_from_hf(remaining: StateDict, cfg: ModelConfig, *, prefix: str) -> StateDict:
    """The output projection from a transformers state dict (the inverse of
    :func:`_head_to_hf`)."""
    bias_V = remaining.pop(f"{prefix}.bias")
    remaining.pop(f"{prefix}.decoder.bias", None)
    decoder_VD = remaining.pop(f"{prefix}.decoder.weight", None)
    if cfg.tie_embeddings:
        return {"output_bias": bias_V}
    return {"output.weight": decoder_VD, "output.bias": bias_V}


class XLMRobertaAdapter:
    """Dense encoder <-> ``XLMRobertaForMaskedLM``."""

    name = "xlm-roberta"
    hf_architecture = "XLMRobertaForMaskedLM"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact XLM-R twin."""
        target = XLMRobertaAdapter.hf_architecture
        _check_body(cfg, target=target)
        require("type_vocab_size", value=cfg.type_vocab_size, expected=0, target=target)
        require("pair_head", value=cfg.pair_head, expected=False, target=target)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, XLMRobertaConfig)``. Raises ValueError if ``cfg`` cannot be
        exported (an MoE encoder among others)."""
        from transformers import XLMRobertaConfig

        XLMRobertaAdapter.check(cfg)
        pad = _padding_idx(cfg)
        hf_config = XLMRobertaConfig(
            **_hf_body_config(cfg),
            max_position_embeddings=cfg.max_seq_len + pad + 1,
            type_vocab_size=1,
            pad_token_id=pad,
            architectures=[XLMRobertaAdapter.hf_architecture],
        )
        remaining = _without_pretraining_heads(state_dict)
        pos_PD = remaining.pop("pos_embeddings.weight")
        hf: StateDict = {
            "roberta.embeddings.position_embeddings.weight": torch.cat(
                [pos_PD.new_zeros(pad + 1, cfg.hidden_size), pos_PD]
            ),
            "roberta.embeddings.token_type_embeddings.weight": pos_PD.new_zeros(1, cfg.hidden_size),
        }
        _head_to_hf(remaining, cfg, hf, prefix="lm_head")
        hf.update(rename(remaining, table=_table(cfg)))
        if cfg.tie_embeddings:
            hf["lm_head.decoder.weight"] = hf["roberta.embeddings.word_embeddings.weight"]
        return hf, hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of an XLM-R config.

        Raises:
            ValueError: an activation other than GELU, a decoder-style config, or a position
                table too small for its padding offset.
        """
        hf = as_config(hf_config, "xlm-roberta")
        pad = hf.pad_token_id if hf.pad_token_id is not None else 1
        max_seq_len = hf.max_position_embeddings - pad - 1
        if max_seq_len <= 0:
            raise ValueError(
                f"xlm-roberta config max_position_embeddings ({hf.max_position_embeddings}) must "
                f"be > pad_token_id + 1 ({pad + 1}) to import"
            )
        return _body_config(hf, source="xlm-roberta", max_seq_len=max_seq_len)

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``.

        Raises:
            ValueError: an activation other than GELU, a decoder-style config, or a position
                table too small for its padding offset.
        """
        cfg = XLMRobertaAdapter.config_from_hf(hf_config)
        pad = _padding_idx(cfg)
        remaining = dict(hf_state_dict)
        pos_PD = remaining.pop("roberta.embeddings.position_embeddings.weight")[pad + 1 :]
        token_type_RD = remaining.pop("roberta.embeddings.token_type_embeddings.weight")
        if bool(token_type_RD[0].any()):
            pos_PD = pos_PD + token_type_RD[0]
        ours: StateDict = {"pos_embeddings.weight": pos_PD.contiguous()}
        ours.update(_head_from_hf(remaining, cfg, prefix="lm_head"))
        inverse = {v: k for k, v in _table(cfg).items()}
        ours.update(rename(remaining, table=inverse))
        return ours, cfg


_BERT_TOP = {
    "tok_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "pos_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.dense.weight": "bert.pooler.dense.weight",
    "pooler.dense.bias": "bert.pooler.dense.bias",
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "pair_classifier.weight": "cls.seq_relationship.weight",
    "pair_classifier.bias": "cls.seq_relationship.bias",
}


def _bert_table(cfg: ModelConfig) -> dict[str, str]:
    """Our key -> ``BertForPreTraining`` key for every 1:1 tensor (the output apart)."""
    table = dict(_BERT_TOP)
    for layer in range(cfg.num_layers):
        for ours, theirs in _LAYER.items():
            for kind in ("weight", "bias"):
                theirs_key = f"bert.encoder.layer.{layer}.{theirs}.{kind}"
                table[f"layers.{layer}.{ours}.{kind}"] = theirs_key
    return table


class BertAdapter:
    """Dense encoder with segment embeddings and the pair head <-> ``BertForPreTraining``."""

    name = "bert"
    hf_architecture = "BertForPreTraining"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact ``BertForPreTraining`` twin."""
        target = BertAdapter.hf_architecture
        _check_body(cfg, target=target)
        require("pair_head", value=cfg.pair_head, expected=True, target=target)
        if cfg.type_vocab_size < 1:
            raise ValueError(
                f"model.type_vocab_size ({cfg.type_vocab_size}) must be >= 1 to export to {target}"
            )

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, BertConfig)``. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import BertConfig

        BertAdapter.check(cfg)
        hf_config = BertConfig(
            **_hf_body_config(cfg),
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=cfg.type_vocab_size,
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            architectures=[BertAdapter.hf_architecture],
        )
        remaining = _without_pretraining_heads(state_dict)
        hf: StateDict = {}
        _head_to_hf(remaining, cfg, hf, prefix="cls.predictions")
        hf.update(rename(remaining, table=_bert_table(cfg)))
        if cfg.tie_embeddings:
            hf["cls.predictions.decoder.weight"] = hf["bert.embeddings.word_embeddings.weight"]
        return hf, hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of a BERT config.

        Raises:
            ValueError: an activation other than GELU or a decoder-style config.
        """
        hf = as_config(hf_config, "bert")
        return _body_config(
            hf,
            source="bert",
            max_seq_len=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            pair_head=True,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)`` of a ``BertForPreTraining`` state dict.

        Raises:
            ValueError: as :meth:`config_from_hf`; a key of another shape.
        """
        cfg = BertAdapter.config_from_hf(hf_config)
        remaining = dict(hf_state_dict)
        remaining.pop("bert.embeddings.position_ids", None)
        remaining.pop("bert.embeddings.token_type_ids", None)
        ours = _head_from_hf(remaining, cfg, prefix="cls.predictions")
        inverse = {v: k for k, v in _bert_table(cfg).items()}
        ours.update(rename(remaining, table=inverse))
        return ours, cfg
