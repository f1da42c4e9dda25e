"""Per-tensor export plans: each transformers tensor as a function of the few of ours it needs.

``to_hf`` maps a whole state dict; an export that streams a checkpoint needs the same mapping one
output tensor at a time, so that memory stays bounded by the largest tensor (an MoE layer's
``gate_up_proj`` reads that layer's ``w1`` and ``w3`` together; everything else is 1:1).
``export_items(cfg)`` lists, in a stable order, ``ExportItem(name, sources, combine)`` with
``combine(*tensors) -> tensor``; applied to every item it gives exactly ``to_hf``'s state dict,
less the weights transformers ties and does not save (``lm_head.weight`` /
``lm_head.decoder.weight`` when ``model.tie_embeddings``). tests/unit/test_checkpoints_plan.py
pins that equality for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkpoints_tools.adapters import decoder, xlm_roberta
from checkpoints_tools.adapters.decoder import LlamaAdapter, MixtralAdapter, Qwen3MoeAdapter
from checkpoints_tools.adapters.xlm_roberta import XLMRobertaAdapter
from pretrain.models.config import ModelConfig
from pretrain.models.transformer import is_moe_layer


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class ExportItem:
    """One transformers tensor: ``name = combine(*[ours[s] for s in sources])``."""

    name: str
    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = _identity


def _gate_up(w1_EFD: torch.Tensor, w3_EFD: torch.Tensor) -> torch.Tensor:
    return torch.cat([w1_EFD, w3_EFD], dim=1)


def _decoder_items(cfg: ModelConfig) -> list[ExportItem]:
    items = [ExportItem(theirs, (ours,)) for ours, theirs in decoder._table(cfg).items()]
    for layer in range(cfg.num_layers):
        if not is_moe_layer(cfg, layer=layer):
            continue
        ours, theirs = f"layers.{layer}.moe.experts.", f"model.layers.{layer}.mlp.experts."
        items.append(ExportItem(theirs + "gate_up_proj", (ours + "w1", ours + "w3"), _gate_up))
        items.append(ExportItem(theirs + "down_proj", (ours + "w2",)))
    return items


def _xlmr_items(cfg: ModelConfig) -> list[ExportItem]:
    pad = xlm_roberta._padding_idx(cfg)

    def positions(pos_PD: torch.Tensor) -> torch.Tensor:
        # transformers numbers positions from pad + 1; the rows below are never used for tokens
        return torch.cat([pos_PD.new_zeros(pad + 1, pos_PD.shape[1]), pos_PD])

    def token_types(pos_PD: torch.Tensor) -> torch.Tensor:
        return pos_PD.new_zeros(1, pos_PD.shape[1])

    bias = "output_bias" if cfg.tie_embeddings else "output.bias"
    items = [
        ExportItem(
            "roberta.embeddings.position_embeddings.weight", ("pos_embeddings.weight",), positions
        ),
        ExportItem(
            "roberta.embeddings.token_type_embeddings.weight",
            ("pos_embeddings.weight",),
            token_types,
        ),
        ExportItem("lm_head.bias", (bias,)),
        ExportItem("lm_head.decoder.bias", (bias,)),
    ]
    if not cfg.tie_embeddings:
        items.append(ExportItem("lm_head.decoder.weight", ("output.weight",)))
    items += [ExportItem(theirs, (ours,)) for ours, theirs in xlm_roberta._table(cfg).items()]
    return items


def export_items(cfg: ModelConfig) -> list[ExportItem]:
    """The export plan of ``cfg``'s family (see the module docstring).

    Raises:
        ValueError: ``cfg`` has no exact transformers twin (the adapter's one-line reason).
    """
    from checkpoints_tools.adapters import adapter_for

    adapter = adapter_for(cfg)
    adapter.check(cfg)
    if adapter in (LlamaAdapter, MixtralAdapter, Qwen3MoeAdapter):
        return _decoder_items(cfg)
    if adapter is XLMRobertaAdapter:
        return _xlmr_items(cfg)
    raise AssertionError(f"no export plan for {adapter.__name__}")
