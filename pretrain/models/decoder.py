"""Llama-shaped causal decoder (CLM), dense or MoE.

What to call: ``build_model(cfg)`` with ``model.family=decoder`` (a :class:`Decoder`);
``model(input_ids_BT, position_ids_BT=, document_ids_BT=, return_hidden=) -> logits_BTV`` and
``output_projection()`` as ``pretrain.models.transformer.Transformer`` defines them.

Exports exactly to ``LlamaForCausalLM`` (dense), ``MixtralForCausalLM`` (MoE, normalised top-k)
or ``Qwen3MoeForCausalLM`` (MoE, Switch's unnormalised gate; needs ``model.qk_norm``); see
``checkpoints_tools.adapters``.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

from pretrain.models.config import ModelConfig
from pretrain.models.transformer import Transformer


class Decoder(Transformer):
    """Causal Transformer: ``forward(tokens_BT, ...) -> logits_BTV`` (see ``Transformer``)."""

    causal = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
