"""Encoder-decoder adapters: ``MT5ForConditionalGeneration`` (dense, T5 v1.1 shape),
``MBartForConditionalGeneration`` (dense, mBART shape),
``SwitchTransformersForConditionalGeneration`` (Switch top-1 MoE) and
``NllbMoeForConditionalGeneration`` (GShard top-2 MoE, sinusoidal positions).

What to call: usually ``checkpoints_tools.adapters.to_hf`` / ``from_hf``, which pick the class
here. Each of :class:`MT5Adapter`, :class:`MBartAdapter`, :class:`SwitchTransformersAdapter`,
:class:`NllbMoeAdapter` has ``check(cfg)`` (``ValueError``, one line, when ``cfg`` has no
exact twin of that class), ``to_hf(state_dict, cfg)`` -> ``(hf_state_dict, hf_config)``,
``config_from_hf(hf_config)``, ``from_hf(hf_state_dict, hf_config)`` -> ``(state_dict,
ModelConfig)``, and the streaming plans
``export_items(cfg)`` / ``import_items(cfg, stored_names)`` (the ``tensor_map`` contract:
applied to every item they give exactly ``to_hf``'s / ``from_hf``'s state dicts, less the
weights transformers ties). Weights are renamed, split or stacked only: a round trip is
bit-exact, and logits agree in fp32 to 1e-4.

Details that decide exactness (transformers 5.24):
    MT5: ``MT5Config`` forces ``tie_word_embeddings=True`` in ``__post_init__`` and never
        rescales the head. The export sets it back to False on the config object and writes
        ``shared``, both ``embed_tokens`` and ``lm_head``: that directory loads untied under
        transformers 4.x ("rescale if tied") and 5.x alike. A tied model is refused.
    Switch: rescales the decoder output by d_model^-0.5 when tied: a tied model exports with
        ``model.scale_output`` (the same rescale), an untied one without it
        (``tie_word_embeddings=False``, which also unties both ``embed_tokens``: all three are
        written). Sparse blocks ``i % step == 1`` (``model.moe.every`` = step,
        ``model.moe.offset`` = 1; step 1: every block). ``expert_capacity`` is exported as
        ``model.max_seq_len``: transformers counts it per sequence and zeroes overflowed tokens,
        so the export routes every token of a sequence up to that length (dropless, as
        ``--verify`` evaluates ours). ``decoder_start_token_id`` = pad (T5's).
    MBart: learned positions numbered from 2 (two unused rows exported as zeros),
        ``layernorm_embedding``, ``scale_embedding`` always written, ``final_logits_bias``
        ``[1, V]`` (zeros when ``model.final_logits_bias`` is false; an import always keeps
        it), ``decoder_start_token_id`` = eos (mBART-50's convention; generation forces the
        target-language token as the first generated one).
    NLLB-MoE: sinusoidal positions from ``pad_token_id + 1`` (no tensors; a pad id is
        required), embeddings times sqrt(d), no ``layernorm_embedding``, biases, sparse layers
        ``(i + 1) % step == 0`` (``model.moe.every``, default offset), experts as
        ``expert_{e}.fc1/fc2``; exported for a dropless eval (``moe_eval_capacity_token_fraction``
        1, ``moe_token_dropout`` 0, no layer drop). transformers 5.24's ``NllbMoeSparseMLP``
        mis-dispatches (:data:`NLLB_MOE_DEFECT`): the export holds exactly our model, which that
        version does not run; ``export-hf`` prints :meth:`NllbMoeAdapter.export_warning` and
        refuses ``--verify`` while :func:`nllb_moe_dispatch_is_correct` says so.
Imports take ``shared`` and refuse files whose ``embed_tokens`` differ from it (our stacks
share one embedding).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import torch

from checkpoints_tools.adapters.base import StateDict, as_config, require, require_hf
from checkpoints_tools.adapters.tensor_map import ExportItem, ImportItem, pick, stack_experts
from pretrain.models.config import ModelConfig, MoEConfig
from pretrain.models.encoder_decoder import decoder_layers, is_encdec_moe_layer
from pretrain.models.moe import gates_normalized

_STACKS = ("encoder", "decoder")
_MBART_POSITION_OFFSET = 2


def _num_layers(cfg: ModelConfig, stack: str) -> int:
    return cfg.num_layers if stack == "encoder" else decoder_layers(cfg)


def _embedding_exports(prefix: str) -> list[ExportItem]:
    """The shared table as ``{prefix}shared`` and both stacks' ``embed_tokens`` (transformers
    unties them from ``shared`` when the head is untied: all three are written)."""
    return [
        ExportItem(f"{prefix}{name}.weight", ("tok_embeddings.weight",))
        for name in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")
    ]


def _embedding_import(names: set[str], *, prefix: str, shared_required: bool) -> ImportItem:
    """Our one table from ``{prefix}shared.weight`` and the stacks' ``embed_tokens`` that are
    stored (all equal; without ``shared_required`` a stack's copy may stand for it)."""
    embeds = [
        n
        for n in (f"{prefix}encoder.embed_tokens.weight", f"{prefix}decoder.embed_tokens.weight")
        if n in names
    ]
    fallback = () if shared_required else embeds
    shared = pick(names, f"{prefix}shared.weight", *fallback)
    return ImportItem("tok_embeddings.weight", (shared, *embeds), _same_embedding)


def _same_embedding(shared_VD: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    if not shared_VD.is_meta:
        for other in others:
            if not torch.equal(other, shared_VD):
                raise ValueError(
                    "transformers weights have embed_tokens that differ from shared.weight: our "
                    "encoder-decoder shares one token embedding between its stacks"
                )
    return shared_VD


def _check_common(cfg: ModelConfig, *, target: str) -> None:
    require("family", value=cfg.family, expected="encoder_decoder", target=target)
    require("num_kv_heads", value=cfg.kv_heads, expected=cfg.num_heads, target=target)
    require("qk_norm", value=cfg.qk_norm, expected=False, target=target)
    require("num_languages", value=cfg.num_languages, expected=0, target=target)
    require("norm_position", value=cfg.norm_position, expected="pre", target=target)


# ---------------------------------------------------------------------------------------------
# T5 layout (MT5, Switch)


def _t5_check(cfg: ModelConfig, *, target: str) -> None:
    """What MT5 and Switch share (the head's tying is checked by each)."""
    _check_common(cfg, target=target)
    for key, expected in (
        ("position", "relative"),
        ("norm", "rmsnorm"),
        ("bias", False),
        ("scale_attention", False),
        ("scale_embeddings", False),
        ("embedding_norm", False),
        ("final_logits_bias", False),
    ):
        require(key, value=getattr(cfg, key), expected=expected, target=target)


def _t5_table(cfg: ModelConfig, *, switch: bool) -> dict[str, str]:
    """Our key -> transformers key for every 1:1 tensor (embeddings and experts apart)."""
    table = {} if cfg.tie_embeddings else {"output.weight": "lm_head.weight"}
    for stack in _STACKS:
        table[f"{stack}.norm.weight"] = f"{stack}.final_layer_norm.weight"
        for i in range(_num_layers(cfg, stack)):
            ours, theirs = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            pairs = [("attention", "0.SelfAttention"), ("attention_norm", "0.layer_norm")]
            if stack == "decoder":
                pairs += [
                    ("cross_attention", "1.EncDecAttention"),
                    ("cross_attention_norm", "1.layer_norm"),
                ]
            ffn = 1 if stack == "encoder" else 2
            for mine, their in pairs:
                if mine.endswith("norm"):
                    table[f"{ours}{mine}.weight"] = f"{theirs}{their}.weight"
                    continue
                for a, b in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
                    table[f"{ours}{mine}.{a}.weight"] = f"{theirs}{their}.{b}.weight"
            if i == 0:
                table[f"{ours}attention.relative_attention_bias.weight"] = (
                    f"{theirs}0.SelfAttention.relative_attention_bias.weight"
                )
            table[f"{ours}ffn_norm.weight"] = f"{theirs}{ffn}.layer_norm.weight"
            if is_encdec_moe_layer(cfg, layer=i):
                table[f"{ours}moe.router.gate.weight"] = (
                    f"{theirs}{ffn}.mlp.router.classifier.weight"
                )
            elif switch:
                table[f"{ours}feed_forward.w1.weight"] = f"{theirs}{ffn}.mlp.wi.weight"
                table[f"{ours}feed_forward.w2.weight"] = f"{theirs}{ffn}.mlp.wo.weight"
            elif cfg.mlp == "gated_gelu":
                dense = f"{theirs}{ffn}.DenseReluDense."
                table[f"{ours}feed_forward.w1.weight"] = dense + "wi_0.weight"
                table[f"{ours}feed_forward.w3.weight"] = dense + "wi_1.weight"
                table[f"{ours}feed_forward.w2.weight"] = dense + "wo.weight"
            else:
                dense = f"{theirs}{ffn}.DenseReluDense."
                table[f"{ours}feed_forward.w1.weight"] = dense + "wi.weight"
                table[f"{ours}feed_forward.w2.weight"] = dense + "wo.weight"
    return table


def _expert_layers(cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(our experts prefix, transformers experts prefix)`` per MoE layer."""
    out = []
    for stack in _STACKS:
        ffn = 1 if stack == "encoder" else 2
        for i in range(_num_layers(cfg, stack)):
            if is_encdec_moe_layer(cfg, layer=i):
                out.append(
                    (
                        f"{stack}.layers.{i}.moe.experts.",
                        f"{stack}.block.{i}.layer.{ffn}.mlp.experts.",
                    )
                )
    return out


def _expert(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def take(stacked_E: torch.Tensor) -> torch.Tensor:
        return stacked_E[index]

    return take


def _t5_export_items(cfg: ModelConfig, *, switch: bool) -> list[ExportItem]:
    items = _embedding_exports("")
    items += [ExportItem(theirs, (ours,)) for ours, theirs in _t5_table(cfg, switch=switch).items()]
    for ours, theirs in _expert_layers(cfg):
        for e in range(cfg.moe.num_experts):
            items.append(ExportItem(f"{theirs}expert_{e}.wi.weight", (ours + "w1",), _expert(e)))
            items.append(ExportItem(f"{theirs}expert_{e}.wo.weight", (ours + "w2",), _expert(e)))
    return items


def _t5_import_items(cfg: ModelConfig, names: set[str], *, switch: bool) -> list[ImportItem]:
    items = [_embedding_import(names, prefix="", shared_required=True)]
    for ours, theirs in _t5_table(cfg, switch=switch).items():
        if ours == "output.weight":
            # a file saved tied stores only shared.weight; 5.x heads are never rescaled
            items.append(ImportItem(ours, (pick(names, theirs, "shared.weight"),)))
        else:
            items.append(ImportItem(ours, (pick(names, theirs),)))
    for ours, theirs in _expert_layers(cfg):
        for key, name in (("w1", "wi"), ("w2", "wo")):
            sources = tuple(
                pick(names, f"{theirs}expert_{e}.{name}.weight") for e in range(cfg.moe.num_experts)
            )
            items.append(ImportItem(ours + key, sources, stack_experts))
    return items


_T5_MLP = {"gated_gelu": "gated-gelu", "relu": "relu", "gelu": "gelu"}
_T5_MLP_BACK = {v: k for k, v in _T5_MLP.items()}


def _t5_common_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "d_kv": cfg.resolved_head_dim,
        "d_ff": cfg.ffn_hidden_size,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": decoder_layers(cfg),
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "pad_token_id": pad,
        "decoder_start_token_id": pad,
        "n_positions": cfg.max_seq_len,
    }


def _t5_common_cfg(hf: Any) -> dict[str, Any]:
    return {
        "family": "encoder_decoder",
        "vocab_size": hf.vocab_size,
        "hidden_size": hf.d_model,
        "num_layers": hf.num_layers,
        "num_decoder_layers": hf.num_decoder_layers,
        "num_heads": hf.num_heads,
        "head_dim": hf.d_kv,
        "ffn_hidden_size": hf.d_ff,
        "max_seq_len": int(getattr(hf, "n_positions", None) or 512),
        "position": "relative",
        "relative_attention_num_buckets": hf.relative_attention_num_buckets,
        "relative_attention_max_distance": hf.relative_attention_max_distance,
        "norm": "rmsnorm",
        "norm_eps": hf.layer_norm_epsilon,
        "norm_position": "pre",
        "bias": False,
        "scale_attention": False,
        "tie_embeddings": False,
        "dropout": float(hf.dropout_rate),
        "pad_token_id": hf.pad_token_id,
    }


class MT5Adapter:
    """Dense encoder-decoder, T5 v1.1 shape <-> ``MT5ForConditionalGeneration`` (untied)."""

    name = "mt5"
    hf_architecture = "MT5ForConditionalGeneration"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact MT5 twin."""
        target = MT5Adapter.hf_architecture
        _t5_check(cfg, target=target)
        if cfg.tie_embeddings:
            raise ValueError(
                f"model.tie_embeddings (True) must be False to export to {target}: "
                "transformers' T5-family heads differ between versions when tied"
            )
        require("scale_output", value=cfg.scale_output, expected=False, target=target)
        require("moe.num_experts", value=cfg.moe.num_experts, expected=0, target=target)
        if cfg.mlp not in _T5_MLP:
            raise ValueError(
                f"model.mlp ({cfg.mlp!r}) must be one of {', '.join(_T5_MLP)} to export to {target}"
            )

    @staticmethod
    def export_items(cfg: ModelConfig) -> list[ExportItem]:
        """The streaming export plan (every tensor written; see the module docstring)."""
        MT5Adapter.check(cfg)
        return _t5_export_items(cfg, switch=False)

    @staticmethod
    def import_items(cfg: ModelConfig, hf_names: Collection[str]) -> list[ImportItem]:
        """The streaming import plan over the stored names (``ValueError``, one line, for a
        tensor the config implies that is not stored, or a stored one with no place)."""
        return _checked(_t5_import_items(cfg, set(hf_names), switch=False), hf_names)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, MT5Config)`` with ``tie_word_embeddings`` False. Raises
        ValueError if ``cfg`` cannot be exported (a tied model among others)."""
        from transformers import MT5Config

        items = MT5Adapter.export_items(cfg)
        hf_config = MT5Config(
            **_t5_common_kwargs(cfg),
            feed_forward_proj=_T5_MLP[cfg.mlp],
            architectures=[MT5Adapter.hf_architecture],
        )
        hf_config.tie_word_embeddings = False  # __post_init__ forces True
        return _apply(items, state_dict), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of an MT5 (or T5) config.

        Raises:
            ValueError: a feed-forward other than gated-gelu, relu or gelu.
        """
        hf = as_config(hf_config, "mt5")
        proj = hf.feed_forward_proj
        if proj not in _T5_MLP_BACK:
            raise ValueError(
                f"mt5 config feed_forward_proj ({proj!r}) must be one of "
                f"{', '.join(_T5_MLP_BACK)} to import"
            )
        return ModelConfig(**_t5_common_cfg(hf), mlp=_T5_MLP_BACK[proj])

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``, untied (transformers 5.x never rescales the head)."""
        cfg = MT5Adapter.config_from_hf(hf_config)
        return _apply_import(MT5Adapter.import_items(cfg, hf_state_dict), hf_state_dict), cfg


def _switch_num_sparse(cfg: ModelConfig, num_layers: int, *, target: str) -> int:
    """``num_sparse_*_layers`` giving our MoE layers under transformers' ``i % step == 1``."""
    ours = [i for i in range(num_layers) if is_encdec_moe_layer(cfg, layer=i)]
    for num_sparse in range(1, num_layers + 1):
        step = num_layers // num_sparse
        if [i for i in range(num_layers) if i % step == 1 or step == 1] == ours:
            return num_sparse
    raise ValueError(
        f"model.moe.offset ({cfg.moe.offset}) must be 1 (0 with model.moe.every 1) and "
        f"model.moe.every ({cfg.moe.every}) divide {num_layers} layers to export to {target} "
        "(sparse blocks i % step == 1)"
    )


class SwitchTransformersAdapter:
    """Switch top-1 MoE encoder-decoder <-> ``SwitchTransformersForConditionalGeneration``."""

    name = "switch_transformers"
    hf_architecture = "SwitchTransformersForConditionalGeneration"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact Switch twin."""
        target = SwitchTransformersAdapter.hf_architecture
        _t5_check(cfg, target=target)
        if cfg.scale_output != cfg.tie_embeddings:
            raise ValueError(
                f"model.scale_output ({cfg.scale_output}) must be {cfg.tie_embeddings} with "
                f"model.tie_embeddings={cfg.tie_embeddings} to export to {target} (it rescales "
                "the decoder output by d_model^-0.5 exactly when tied)"
            )
        moe = cfg.moe
        if moe.num_experts == 0:
            raise ValueError(f"model.moe.num_experts (0) must be > 0 to export to {target}")
        require("moe.top_k", value=moe.top_k, expected=1, target=target)
        require("moe.normalize_gates", value=gates_normalized(cfg), expected=False, target=target)
        if cfg.mlp not in ("gelu", "relu"):
            raise ValueError(
                f"model.mlp ({cfg.mlp!r}) must be gelu or relu to export to {target} "
                "(its experts are DenseActDense)"
            )
        require(
            "moe.expert_ffn_hidden_size",
            value=cfg.expert_ffn_width,
            expected=cfg.ffn_hidden_size,
            target=target,
        )
        for num_layers in (cfg.num_layers, decoder_layers(cfg)):
            _switch_num_sparse(cfg, num_layers, target=target)

    @staticmethod
    def export_items(cfg: ModelConfig) -> list[ExportItem]:
        """The streaming export plan (every tensor written; see the module docstring)."""
        SwitchTransformersAdapter.check(cfg)
        return _t5_export_items(cfg, switch=True)

    @staticmethod
    def import_items(cfg: ModelConfig, hf_names: Collection[str]) -> list[ImportItem]:
        """The streaming import plan over the stored names (experts stacked; ``ValueError`` as
        :meth:`MT5Adapter.import_items`; a tied ``lm_head.weight`` is ignored)."""
        ignored = {"lm_head.weight"} if cfg.tie_embeddings else ()
        return _checked(
            _t5_import_items(cfg, set(hf_names), switch=True), hf_names, ignored=ignored
        )

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, SwitchTransformersConfig)``. Raises ValueError if ``cfg`` cannot
        be exported (a tied head, a normalised or top-2 gate, gated experts among others)."""
        from transformers import SwitchTransformersConfig

        target = SwitchTransformersAdapter.hf_architecture
        items = SwitchTransformersAdapter.export_items(cfg)
        moe = cfg.moe
        hf_config = SwitchTransformersConfig(
            **_t5_common_kwargs(cfg),
            num_experts=moe.num_experts,
            num_sparse_encoder_layers=_switch_num_sparse(cfg, cfg.num_layers, target=target),
            num_sparse_decoder_layers=_switch_num_sparse(cfg, decoder_layers(cfg), target=target),
            expert_capacity=cfg.max_seq_len,
            router_bias=False,
            router_jitter_noise=moe.jitter,
            router_dtype="float32",
            router_z_loss_coef=moe.z_loss_coef,
            router_aux_loss_coef=moe.aux_loss_coef,
            dense_act_fn=cfg.mlp,
            tie_word_embeddings=cfg.tie_embeddings,
            architectures=[target],
        )
        hf = _apply(items, state_dict)
        if cfg.tie_embeddings:
            hf["lm_head.weight"] = hf["shared.weight"]
        return hf, hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of a Switch config: MoE ``every`` = sparse step, ``offset`` 1,
        dropless (the export's capacity; transformers' per-sequence capacity is not ours).

        Tied embeddings come back tied with ``scale_output`` (transformers' rescale).

        Raises:
            ValueError: a router bias, an activation other than gelu or relu, or different
                sparse steps in the two stacks (and, until the grouped experts take relu, the
                config check refuses relu experts).
        """
        hf = as_config(hf_config, "switch_transformers")
        source = "switch_transformers"
        require_hf("router_bias", value=bool(hf.router_bias), expected=False, source=source)
        if hf.dense_act_fn not in ("gelu", "relu"):
            raise ValueError(
                f"{source} config dense_act_fn ({hf.dense_act_fn!r}) must be gelu or relu to import"
            )
        step = hf.encoder_sparse_step
        require_hf(
            "decoder_sparse_step", value=hf.decoder_sparse_step, expected=step, source=source
        )
        moe = MoEConfig(
            num_experts=hf.num_experts,
            top_k=1,
            router="switch",
            every=step,
            offset=1 if step > 1 else 0,
            dropless=True,
            jitter=float(hf.router_jitter_noise),
            aux_loss_coef=float(hf.router_aux_loss_coef),
            z_loss_coef=float(hf.router_z_loss_coef),
        )
        tied = bool(hf.tie_word_embeddings)
        return ModelConfig(
            **{**_t5_common_cfg(hf), "tie_embeddings": tied},
            scale_output=tied,
            mlp=hf.dense_act_fn,
            moe=moe,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``; experts stacked into our grouped tensors."""
        cfg = SwitchTransformersAdapter.config_from_hf(hf_config)
        items = SwitchTransformersAdapter.import_items(cfg, hf_state_dict)
        return _apply_import(items, hf_state_dict), cfg


# ---------------------------------------------------------------------------------------------
# BART layout (MBart)


def _fairseq_body_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The config keys MBart and NLLB-MoE share (fairseq's transformer): widths, layers,
    heads, positions, dropouts (no layer drop), init, embedding scale, tied head."""
    return {
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "encoder_layers": cfg.num_layers,
        "decoder_layers": decoder_layers(cfg),
        "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.ffn_hidden_size,
        "decoder_ffn_dim": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_seq_len,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "init_std": cfg.init_std,
        "scale_embedding": cfg.scale_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _mbart_table(cfg: ModelConfig) -> dict[str, str]:
    table = {}
    for stack in _STACKS:
        for kind in ("weight", "bias"):
            table[f"{stack}.embed_norm.{kind}"] = f"model.{stack}.layernorm_embedding.{kind}"
            table[f"{stack}.norm.{kind}"] = f"model.{stack}.layer_norm.{kind}"
        for i in range(_num_layers(cfg, stack)):
            ours, theirs = f"{stack}.layers.{i}.", f"model.{stack}.layers.{i}."
            pairs = _fairseq_attention_pairs(stack, cross="encoder_attn")
            pairs.update(
                {"feed_forward.w1": "fc1", "feed_forward.w2": "fc2", "ffn_norm": "final_layer_norm"}
            )
            table.update(_with_biases(ours, theirs, pairs))
    if not cfg.tie_embeddings:
        table["output.weight"] = "lm_head.weight"
    return table


def _fairseq_attention_pairs(stack: str, *, cross: str) -> dict[str, str]:
    """Our attention submodules -> fairseq-style names within a block: ``self_attn`` and, in
    the decoder, the cross-attention called ``cross`` (MBart ``encoder_attn``, NLLB-MoE
    ``cross_attention``), each with its ``*_layer_norm``."""
    pairs = {f"attention.w{x}": f"self_attn.{x}_proj" for x in "qkv"}
    pairs.update({"attention.wo": "self_attn.out_proj", "attention_norm": "self_attn_layer_norm"})
    if stack == "decoder":
        pairs.update({f"cross_attention.w{x}": f"{cross}.{x}_proj" for x in "qkv"})
        pairs["cross_attention.wo"] = f"{cross}.out_proj"
        pairs["cross_attention_norm"] = f"{cross}_layer_norm"
    return pairs


def _with_biases(ours: str, theirs: str, pairs: dict[str, str]) -> dict[str, str]:
    """``pairs`` of module names (under the prefixes) -> their weight and bias tensors."""
    return {
        f"{ours}{mine}.{kind}": f"{theirs}{their}.{kind}"
        for mine, their in pairs.items()
        for kind in ("weight", "bias")
    }


def _mbart_positions(pos_PD: torch.Tensor) -> torch.Tensor:
    return torch.cat([pos_PD.new_zeros(_MBART_POSITION_OFFSET, pos_PD.shape[1]), pos_PD])


def _mbart_positions_back(pos_PD: torch.Tensor) -> torch.Tensor:
    return pos_PD[_MBART_POSITION_OFFSET:].contiguous()


def _row(bias_V: torch.Tensor) -> torch.Tensor:
    return bias_V[None]


def _zero_row(tok_VD: torch.Tensor) -> torch.Tensor:
    return tok_VD.new_zeros(1, tok_VD.shape[0])


def _unrow(bias_1V: torch.Tensor) -> torch.Tensor:
    return bias_1V.reshape(-1).contiguous()


def _output_bias_key(cfg: ModelConfig) -> str:
    return "output_bias" if cfg.tie_embeddings else "output.bias"


class MBartAdapter:
    """Dense encoder-decoder, mBART shape <-> ``MBartForConditionalGeneration``."""

    name = "mbart"
    hf_architecture = "MBartForConditionalGeneration"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact MBart twin."""
        target = MBartAdapter.hf_architecture
        _check_common(cfg, target=target)
        for key, expected in (
            ("position", "learned"),
            ("norm", "layernorm"),
            ("norm_eps", 1e-5),
            ("bias", True),
            ("mlp", "gelu"),
            ("scale_attention", True),
            ("embedding_norm", True),
            ("moe.num_experts", 0),
        ):
            value = cfg.moe.num_experts if key == "moe.num_experts" else getattr(cfg, key)
            require(key, value=value, expected=expected, target=target)
        require(
            "head_dim",
            value=cfg.resolved_head_dim,
            expected=cfg.hidden_size // cfg.num_heads,
            target=target,
        )

    @staticmethod
    def export_items(cfg: ModelConfig) -> list[ExportItem]:
        """The streaming export plan (``lm_head.weight`` left out when tied)."""
        MBartAdapter.check(cfg)
        items = _embedding_exports("model.")
        for stack in _STACKS:
            items.append(
                ExportItem(
                    f"model.{stack}.embed_positions.weight",
                    (f"{stack}.pos_embeddings.weight",),
                    _mbart_positions,
                )
            )
        if cfg.final_logits_bias:
            items.append(ExportItem("final_logits_bias", (_output_bias_key(cfg),), _row))
        else:
            items.append(ExportItem("final_logits_bias", ("tok_embeddings.weight",), _zero_row))
        items += [ExportItem(theirs, (ours,)) for ours, theirs in _mbart_table(cfg).items()]
        return items

    @staticmethod
    def import_items(cfg: ModelConfig, hf_names: Collection[str]) -> list[ImportItem]:
        """The streaming import plan over the stored names (``ValueError`` as
        :meth:`MT5Adapter.import_items`; a tied ``lm_head.weight`` is ignored)."""
        names = set(hf_names)
        items = [_embedding_import(names, prefix="model.", shared_required=False)]
        for stack in _STACKS:
            items.append(
                ImportItem(
                    f"{stack}.pos_embeddings.weight",
                    (pick(names, f"model.{stack}.embed_positions.weight"),),
                    _mbart_positions_back,
                )
            )
        items.append(ImportItem(_output_bias_key(cfg), (pick(names, "final_logits_bias"),), _unrow))
        items += [ImportItem(ours, (pick(names, t),)) for ours, t in _mbart_table(cfg).items()]
        return _checked(items, names, ignored={"lm_head.weight"} if cfg.tie_embeddings else ())

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, MBartConfig)``. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import MBartConfig

        items = MBartAdapter.export_items(cfg)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 1
        hf_config = MBartConfig(
            **_fairseq_body_kwargs(cfg),
            activation_function="gelu",
            pad_token_id=pad,
            architectures=[MBartAdapter.hf_architecture],
        )
        return _apply_tied(items, state_dict, cfg), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of an MBart config (``final_logits_bias`` always kept).

        Raises:
            ValueError: an activation other than gelu, or stacks of different widths/heads.
        """
        hf = as_config(hf_config, "mbart")
        source = "mbart"
        require_hf(
            "activation_function", value=hf.activation_function, expected="gelu", source=source
        )
        for ours, theirs in (
            ("decoder_attention_heads", "encoder_attention_heads"),
            ("decoder_ffn_dim", "encoder_ffn_dim"),
        ):
            require_hf(ours, value=getattr(hf, ours), expected=getattr(hf, theirs), source=source)
        return ModelConfig(
            family="encoder_decoder",
            vocab_size=hf.vocab_size,
            hidden_size=hf.d_model,
            num_layers=hf.encoder_layers,
            num_decoder_layers=hf.decoder_layers,
            num_heads=hf.encoder_attention_heads,
            ffn_hidden_size=hf.encoder_ffn_dim,
            max_seq_len=hf.max_position_embeddings,
            position="learned",
            norm="layernorm",
            norm_eps=1e-5,
            norm_position="pre",
            mlp="gelu",
            bias=True,
            tie_embeddings=bool(hf.tie_word_embeddings),
            scale_embeddings=bool(hf.scale_embedding),
            embedding_norm=True,
            final_logits_bias=True,
            dropout=float(hf.dropout),
            init_std=float(hf.init_std),
            pad_token_id=hf.pad_token_id,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``."""
        cfg = MBartAdapter.config_from_hf(hf_config)
        items = MBartAdapter.import_items(cfg, hf_state_dict)
        return _apply_import(items, hf_state_dict), cfg


# ---------------------------------------------------------------------------------------------
# NLLB-MoE (GShard top-2)

NLLB_MOE_DEFECT = (
    "transformers' NllbMoeSparseMLP passes its already one-hot top-1 mask to NllbMoeExperts, "
    "which one-hot encodes it again: every token reaches experts 0 and 1 only"
)


@functools.cache
def nllb_moe_dispatch_is_correct() -> bool:
    """Whether the installed transformers' ``NllbMoeSparseMLP`` sends each token to its top-2
    experts: a 4-expert probe compared with a correct top-2 sum over its own router's combine
    weights (a few milliseconds)."""
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    config = NllbMoeConfig(d_model=8, num_experts=4, moe_token_dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = NllbMoeSparseMLP(config, ffn_dim=8).eval()
    x_ND = torch.randn(16, 8, generator=gen)
    with torch.no_grad():
        theirs_ND = mlp(x_ND[None])[0]
        _, combine_NE, _ = mlp.router(x_ND)
        correct_ND = sum(
            combine_NE[:, e : e + 1] * mlp.experts[f"expert_{e}"](x_ND) for e in range(4)
        )
    return bool((theirs_ND - correct_ND).abs().max() < 1e-5)


def _nllb_table(cfg: ModelConfig) -> dict[str, str]:
    table = {}
    for stack in _STACKS:
        for kind in ("weight", "bias"):
            table[f"{stack}.norm.{kind}"] = f"model.{stack}.layer_norm.{kind}"
        for i in range(_num_layers(cfg, stack)):
            ours, theirs = f"{stack}.layers.{i}.", f"model.{stack}.layers.{i}."
            pairs = _fairseq_attention_pairs(stack, cross="cross_attention")
            pairs["ffn_norm"] = "ff_layer_norm"
            if is_encdec_moe_layer(cfg, layer=i):
                table[f"{ours}moe.router.gate.weight"] = f"{theirs}ffn.router.classifier.weight"
            else:
                pairs.update({"feed_forward.w1": "ffn.fc1", "feed_forward.w2": "ffn.fc2"})
            table.update(_with_biases(ours, theirs, pairs))
    if not cfg.tie_embeddings:
        table["output.weight"] = "lm_head.weight"
    return table


def _nllb_expert_layers(cfg: ModelConfig) -> list[tuple[str, str]]:
    return [
        (f"{stack}.layers.{i}.moe.experts.", f"model.{stack}.layers.{i}.ffn.experts.")
        for stack in _STACKS
        for i in range(_num_layers(cfg, stack))
        if is_encdec_moe_layer(cfg, layer=i)
    ]


_NLLB_EXPERT_TENSORS = (("w1", "fc1.weight"), ("b1", "fc1.bias"), ("w2", "fc2.weight"),
                        ("b2", "fc2.bias"))  # fmt: skip


class NllbMoeAdapter:
    """GShard top-2 MoE encoder-decoder with sinusoidal positions <->
    ``NllbMoeForConditionalGeneration``.

    Exact but for transformers' own dispatch (:data:`NLLB_MOE_DEFECT`, installed 5.24): the
    export is what a correct NLLB-MoE runs; :func:`nllb_moe_dispatch_is_correct` tells whether
    the installed one does (``export-hf`` prints :meth:`export_warning` while it does not).
    """

    name = "nllb-moe"
    hf_architecture = "NllbMoeForConditionalGeneration"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact NLLB-MoE twin."""
        target = NllbMoeAdapter.hf_architecture
        _check_common(cfg, target=target)
        for key, expected in (
            ("position", "sinusoidal"),
            ("norm", "layernorm"),
            ("norm_eps", 1e-5),
            ("bias", True),
            ("scale_attention", True),
            ("embedding_norm", False),
            ("final_logits_bias", False),
            ("scale_output", False),
        ):
            require(key, value=getattr(cfg, key), expected=expected, target=target)
        if cfg.pad_token_id is None:
            raise ValueError(
                f"model.pad_token_id (None) must be set to export to {target} "
                "(its positions skip padding tokens)"
            )
        if cfg.mlp not in ("gelu", "relu"):
            raise ValueError(f"model.mlp ({cfg.mlp!r}) must be gelu or relu to export to {target}")
        require(
            "head_dim",
            value=cfg.resolved_head_dim,
            expected=cfg.hidden_size // cfg.num_heads,
            target=target,
        )
        moe = cfg.moe
        if moe.num_experts:
            require("moe.top_k", value=moe.top_k, expected=2, target=target)
            require(
                "moe.normalize_gates", value=gates_normalized(cfg), expected=True, target=target
            )
            offset = moe.every - 1 if moe.offset is None else moe.offset
            require("moe.offset", value=offset, expected=moe.every - 1, target=target)
            require(
                "moe.expert_ffn_hidden_size",
                value=cfg.expert_ffn_width,
                expected=cfg.ffn_hidden_size,
                target=target,
            )

    @staticmethod
    def export_warning(cfg: ModelConfig) -> str | None:
        """The warning line ``export-hf`` prints for an MoE export while the installed
        transformers mis-dispatches (None: dense, or a fixed transformers)."""
        if not cfg.moe.num_experts or nllb_moe_dispatch_is_correct():
            return None
        import transformers

        return (
            f"warning: {NllbMoeAdapter.hf_architecture} in transformers {transformers.__version__}"
            f" does not run this export as trained: {NLLB_MOE_DEFECT}; the weights and config "
            "are exact (a fixed transformers runs them as our model does)"
        )

    @staticmethod
    def export_items(cfg: ModelConfig) -> list[ExportItem]:
        """The streaming export plan (``lm_head.weight`` left out when tied)."""
        NllbMoeAdapter.check(cfg)
        items = _embedding_exports("model.")
        items += [ExportItem(theirs, (ours,)) for ours, theirs in _nllb_table(cfg).items()]
        for ours, theirs in _nllb_expert_layers(cfg):
            for e in range(cfg.moe.num_experts):
                for mine, their in _NLLB_EXPERT_TENSORS:
                    items.append(
                        ExportItem(f"{theirs}expert_{e}.{their}", (ours + mine,), _expert(e))
                    )
        return items

    @staticmethod
    def import_items(cfg: ModelConfig, hf_names: Collection[str]) -> list[ImportItem]:
        """The streaming import plan over the stored names (``ValueError`` as
        :meth:`MT5Adapter.import_items`; a tied ``lm_head.weight`` is ignored)."""
        names = set(hf_names)
        items = [_embedding_import(names, prefix="model.", shared_required=False)]
        items += [ImportItem(ours, (pick(names, t),)) for ours, t in _nllb_table(cfg).items()]
        for ours, theirs in _nllb_expert_layers(cfg):
            for mine, their in _NLLB_EXPERT_TENSORS:
                sources = tuple(
                    pick(names, f"{theirs}expert_{e}.{their}") for e in range(cfg.moe.num_experts)
                )
                items.append(ImportItem(ours + mine, sources, stack_experts))
        return _checked(items, names, ignored={"lm_head.weight"} if cfg.tie_embeddings else ())

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, NllbMoeConfig)``: eval dropless (capacity fraction 1), no expert
        output dropout, no layer drop. Raises ValueError if ``cfg`` cannot be exported."""
        from transformers import NllbMoeConfig

        items = NllbMoeAdapter.export_items(cfg)
        moe = cfg.moe
        step = moe.every if moe.num_experts else 0
        hf_config = NllbMoeConfig(
            **_fairseq_body_kwargs(cfg),
            activation_function=cfg.mlp,
            pad_token_id=cfg.pad_token_id,
            num_experts=max(moe.num_experts, 1),
            encoder_sparse_step=step,
            decoder_sparse_step=step,
            router_dtype="float32",
            router_bias=False,
            router_z_loss_coef=moe.z_loss_coef,
            router_aux_loss_coef=moe.aux_loss_coef,
            second_expert_policy="random" if moe.random_second_expert else "all",
            normalize_router_prob_before_dropping=True,
            batch_prioritized_routing=False,
            moe_eval_capacity_token_fraction=1.0,
            moe_token_dropout=0.0,
            architectures=[NllbMoeAdapter.hf_architecture],
        )
        return _apply_tied(items, state_dict, cfg), hf_config

    @staticmethod
    def config_from_hf(hf_config: Any) -> ModelConfig:
        """Our ``ModelConfig`` of an NLLB-MoE config; the MoE comes back dropless (its eval
        routing with capacity fraction 1 drops nothing).

        Raises:
            ValueError: an activation other than gelu or relu, a router bias, stacks of
                different shapes or sparse steps, or expert-output dropout
                (``moe_token_dropout``), which our experts do not apply.
        """
        hf = as_config(hf_config, "nllb-moe")
        source = "nllb-moe"
        if hf.activation_function not in ("gelu", "relu"):
            raise ValueError(
                f"{source} config activation_function ({hf.activation_function!r}) must be gelu "
                "or relu to import"
            )
        require_hf("router_bias", value=bool(hf.router_bias), expected=False, source=source)
        require_hf("moe_token_dropout", value=hf.moe_token_dropout, expected=0.0, source=source)
        for ours, theirs in (
            ("decoder_attention_heads", "encoder_attention_heads"),
            ("decoder_ffn_dim", "encoder_ffn_dim"),
            ("decoder_sparse_step", "encoder_sparse_step"),
        ):
            require_hf(ours, value=getattr(hf, ours), expected=getattr(hf, theirs), source=source)
        step = hf.encoder_sparse_step
        moe = MoEConfig()
        if step > 0:
            moe = MoEConfig(
                num_experts=hf.num_experts,
                top_k=2,
                router="gshard",
                every=step,
                dropless=True,
                random_second_expert=hf.second_expert_policy == "random",
                aux_loss_coef=float(hf.router_aux_loss_coef),
                z_loss_coef=float(hf.router_z_loss_coef),
            )
        return ModelConfig(
            family="encoder_decoder",
            vocab_size=hf.vocab_size,
            hidden_size=hf.d_model,
            num_layers=hf.encoder_layers,
            num_decoder_layers=hf.decoder_layers,
            num_heads=hf.encoder_attention_heads,
            ffn_hidden_size=hf.encoder_ffn_dim,
            max_seq_len=hf.max_position_embeddings,
            position="sinusoidal",
            norm="layernorm",
            norm_eps=1e-5,
            norm_position="pre",
            mlp=hf.activation_function,
            bias=True,
            tie_embeddings=bool(hf.tie_word_embeddings),
            scale_embeddings=bool(hf.scale_embedding),
            dropout=float(hf.dropout),
            init_std=float(hf.init_std),
            pad_token_id=hf.pad_token_id,
            moe=moe,
        )

    @staticmethod
    def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
        """``(state_dict, ModelConfig)``; experts stacked into our grouped tensors."""
        cfg = NllbMoeAdapter.config_from_hf(hf_config)
        return _apply_import(NllbMoeAdapter.import_items(cfg, hf_state_dict), hf_state_dict), cfg


# ---------------------------------------------------------------------------------------------


def _apply(items: list[ExportItem], state_dict: StateDict) -> StateDict:
    """``to_hf`` from the plan; every key of ``state_dict`` must be used."""
    _all_used(items, state_dict)
    return {item.name: item.combine(*[state_dict[s] for s in item.sources]) for item in items}


def _all_used(
    items: list[ExportItem] | list[ImportItem],
    names: Collection[str],
    ignored: Collection[str] = (),
) -> None:
    """Raises ValueError (one line) for the first of ``names`` no item reads."""
    used = {source for item in items for source in item.sources} | set(ignored)
    extra = sorted(set(names) - used)
    if extra:
        raise ValueError(f"state dict key {extra[0]!r} has no mapping for this model family")


def _apply_tied(items: list[ExportItem], state_dict: StateDict, cfg: ModelConfig) -> StateDict:
    """``_apply``, plus ``lm_head.weight`` as the shared table when the head is tied (the
    fairseq-style classes store both)."""
    hf = _apply(items, state_dict)
    if cfg.tie_embeddings:
        hf["lm_head.weight"] = hf["model.shared.weight"]
    return hf


def _checked(
    items: list[ImportItem], hf_names: Collection[str], *, ignored: Collection[str] = ()
) -> list[ImportItem]:
    """``items``, once every stored name is used by one or ``ignored``."""
    _all_used(items, hf_names, ignored)
    return items


def _apply_import(items: list[ImportItem], hf_state_dict: StateDict) -> StateDict:
    """``from_hf`` from the (checked) plan."""
    return {item.name: item.combine(*[hf_state_dict[s] for s in item.sources]) for item in items}


ENCODER_DECODER_ADAPTERS = (MT5Adapter, MBartAdapter, SwitchTransformersAdapter, NllbMoeAdapter)
"""Every adapter of this module."""
