"""Per-family state-dict adapters between our models and their exact transformers twins.

What to call (torchtitan ``state_dict_adapter`` style)::

    hf_state_dict, hf_config = to_hf(state_dict, cfg)      # our full state dict + ModelConfig
    state_dict, cfg = from_hf(hf_state_dict, hf_config)    # hf_config: object or config.json dict
    adapter = adapter_for(cfg)                             # or adapter_for_hf(hf_config)

Guarantees: weights are only renamed, concatenated or split, never changed, so a round trip is
bit-exact; a config the target class cannot represent (or a transformers variant we do not
import) raises ``ValueError`` with one line naming what it cannot represent. ``ADAPTERS``
maps transformers ``model_type`` -> adapter class; each adapter has ``check(cfg)``, ``to_hf``,
``config_from_hf`` and ``from_hf``.

``hf_state_dict`` uses the transformers model's in-memory names: ``Cls(hf_config)
.load_state_dict(hf_state_dict)`` then ``save_pretrained`` writes a standard checkpoint, and
``Cls.from_pretrained(dir).state_dict()`` is what ``from_hf`` takes. Our state dict is the plain
(unsharded) ``model.state_dict()`` of ``pretrain.models.build_model(cfg)``.

    family, feed-forward                          transformers class
    decoder, dense                                LlamaForCausalLM
    decoder, MoE, normalised top-k, every layer   MixtralForCausalLM
    decoder, MoE, otherwise (Switch's unnormal-   Qwen3MoeForCausalLM (needs model.qk_norm;
      ised top-1 gate, every k-th layer)            see checkpoints_tools.adapters.decoder)
    encoder, dense                                XLMRobertaForMaskedLM
    encoder, dense, segments + pair head (NSP)    BertForPreTraining
    encoder, dense, ELECTRA generator             ElectraForPreTraining + ElectraForMaskedLM
                                                    (export only: checkpoints_tools.adapters
                                                    .electra)
    encoder, MoE                                  refused (no upstream class)
    encoder_decoder, dense, relative positions    MT5ForConditionalGeneration (untied)
    encoder_decoder, dense, learned positions     MBartForConditionalGeneration
    encoder_decoder, MoE, top-1                   SwitchTransformersForConditionalGeneration
    encoder_decoder, sinusoidal positions (GShard NllbMoeForConditionalGeneration (its installed
      top-2 MoE or dense)                           sparse MLP mis-dispatches: see
                                                    checkpoints_tools.adapters.encoder_decoder)
"""

from __future__ import annotations

from typing import Any

from checkpoints_tools.adapters.base import StateDict
from checkpoints_tools.adapters.decoder import LlamaAdapter, MixtralAdapter, Qwen3MoeAdapter
from checkpoints_tools.adapters.electra import ElectraAdapter
from checkpoints_tools.adapters.encoder_decoder import (
    MBartAdapter,
    MT5Adapter,
    NllbMoeAdapter,
    SwitchTransformersAdapter,
)
from checkpoints_tools.adapters.xlm_roberta import BertAdapter, XLMRobertaAdapter
from pretrain.models.config import ModelConfig, validate_model
from pretrain.models.moe import gates_normalized

ADAPTERS = {
    adapter.name: adapter
    for adapter in (
        LlamaAdapter,
        MixtralAdapter,
        Qwen3MoeAdapter,
        XLMRobertaAdapter,
        BertAdapter,
        MT5Adapter,
        MBartAdapter,
        SwitchTransformersAdapter,
        NllbMoeAdapter,
    )
}
"""transformers ``model_type`` -> adapter class."""


def adapter_for(cfg: ModelConfig) -> Any:
    """The adapter that exports ``cfg``'s family (see the module table).

    Raises:
        ValueError: an invalid config or a family with no exact twin (an MoE encoder, a
            top-2 MoE encoder-decoder without sinusoidal positions).
    """
    validate_model(cfg)
    if cfg.family == "decoder":
        if cfg.moe.num_experts == 0:
            return LlamaAdapter
        if gates_normalized(cfg) and cfg.moe.every == 1 and not cfg.qk_norm:
            return MixtralAdapter
        return Qwen3MoeAdapter
    if cfg.family == "encoder" and cfg.generator_fraction:
        return ElectraAdapter
    if cfg.family == "encoder":
        return BertAdapter if cfg.pair_head or cfg.type_vocab_size else XLMRobertaAdapter
    if cfg.position == "sinusoidal":
        return NllbMoeAdapter
    if cfg.moe.num_experts > 0:
        if cfg.moe.top_k == 1:
            return SwitchTransformersAdapter
        raise ValueError(
            f"model.moe.top_k ({cfg.moe.top_k}) must be 1 to export an MoE encoder-decoder with "
            f"model.position={cfg.position} (SwitchTransformersForConditionalGeneration); top-2 "
            "exports with position=sinusoidal (NllbMoeForConditionalGeneration)"
        )
    return MT5Adapter if cfg.position == "relative" else MBartAdapter


def adapter_for_hf(hf_config: Any) -> Any:
    """The adapter for a transformers config (object or ``config.json`` dict) by model_type.

    Raises:
        ValueError: a model_type we do not import.
    """
    model_type = (
        hf_config.get("model_type") if isinstance(hf_config, dict) else hf_config.model_type
    )
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model_type ({model_type!r}) must be one of {', '.join(ADAPTERS)} to import"
        )
    return ADAPTERS[model_type]


def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
    """Our state dict -> ``(transformers state dict, transformers config)``.

    Raises:
        ValueError: one line naming the config key that the target class cannot represent.
    """
    return adapter_for(cfg).to_hf(state_dict, cfg)


def from_hf(hf_state_dict: StateDict, hf_config: Any) -> tuple[StateDict, ModelConfig]:
    """transformers state dict + config -> ``(our state dict, ModelConfig)``.

    Raises:
        ValueError: an unsupported model_type or config variant (one line).
    """
    return adapter_for_hf(hf_config).from_hf(hf_state_dict, hf_config)


__all__ = [
    "ADAPTERS",
    "BertAdapter",
    "LlamaAdapter",
    "MBartAdapter",
    "MT5Adapter",
    "MixtralAdapter",
    "NllbMoeAdapter",
    "Qwen3MoeAdapter",
    "SwitchTransformersAdapter",
    "XLMRobertaAdapter",
    "adapter_for",
    "adapter_for_hf",
    "from_hf",
    "to_hf",
]
