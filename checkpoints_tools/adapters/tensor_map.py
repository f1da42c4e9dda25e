"""Per-tensor export and import plans: each tensor as a function of the few of the other side's
that it needs.

What to call: ``export_items(cfg)`` -> ``[ExportItem(name, sources, combine)]`` in a stable
order, ``name = combine(*[ours[s] for s in sources])`` (``ValueError`` when ``cfg`` has no
exact transformers twin); ``import_items(cfg, hf_names)`` -> ``[ImportItem(name, sources,
combine)]`` over the stored transformers names (``ValueError``, one line naming it, for a tensor
the config implies that is not stored or a stored tensor with no place in our model).
Guarantee: applied to every item, the plans give exactly ``to_hf``'s / ``from_hf``'s state dicts
(below), while reading only the few tensors each item needs.

``to_hf`` maps a whole state dict; an export that streams a checkpoint needs the same mapping one
output tensor at a time, so that memory stays bounded by the largest tensor (an MoE layer's
``gate_up_proj`` reads that layer's ``w1`` and ``w3`` together; everything else is 1:1).
``export_items(cfg)`` lists, in a stable order, ``ExportItem(name, sources, combine)`` with
``combine(*tensors) -> tensor``; applied to every item it gives exactly ``to_hf``'s state dict,
less the weights transformers ties and does not save (``lm_head.weight`` /
``lm_head.decoder.weight`` when ``model.tie_embeddings``). tests/unit/test_checkpoints_export.py
pins that equality for every family.

``import_items(cfg, hf_names)`` is the reverse, for an import that streams a transformers
directory: ``ImportItem(name, sources, combine)`` gives each of our tensors from the stored
transformers tensors, so that applied to every item it gives exactly ``from_hf``'s state dict.
Stored names are what is on disk, which is not always transformers' in-memory name: our
export-hf and the in-memory layout keep an MoE layer's experts fused (``mlp.experts.gate_up_proj``
``[E, 2F, D]``, ``mlp.experts.down_proj``), while transformers' own ``save_pretrained`` and the
Hub store one tensor per expert (Mixtral: ``block_sparse_moe.experts.<e>.w1/w2/w3.weight`` and
``block_sparse_moe.gate.weight``; Qwen3-MoE: ``mlp.experts.<e>.gate_proj/up_proj/down_proj
.weight``), which an import stacks into our grouped ``[E, ...]`` tensors. Both layouts are read.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from checkpoints_tools.adapters import decoder, xlm_roberta
from checkpoints_tools.adapters.decoder import LlamaAdapter, MixtralAdapter, Qwen3MoeAdapter
from checkpoints_tools.adapters.electra import ElectraAdapter
from checkpoints_tools.adapters.xlm_roberta import BertAdapter, XLMRobertaAdapter
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


def _bert_items(cfg: ModelConfig) -> list[ExportItem]:
    bias = "output_bias" if cfg.tie_embeddings else "output.bias"
    items = [
        ExportItem("cls.predictions.bias", (bias,)),
        ExportItem("cls.predictions.decoder.bias", (bias,)),
    ]
    if not cfg.tie_embeddings:
        items.append(ExportItem("cls.predictions.decoder.weight", ("output.weight",)))
    items += [ExportItem(theirs, (ours,)) for ours, theirs in xlm_roberta._bert_table(cfg).items()]
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
    if adapter is BertAdapter:
        return _bert_items(cfg)
    if adapter is ElectraAdapter:  # the discriminator's (its generator: its own plan)
        return adapter.export_items(cfg)
    raise AssertionError(f"no export plan for {adapter.__name__}")


@dataclass(frozen=True)
class ImportItem:
    """One of our tensors: ``name = combine(*[stored[s] for s in sources])`` (stored names)."""

    name: str
    sources: tuple[str, ...]
    combine: Callable[..., torch.Tensor] = _identity


def _first_half(gate_up_E2FD: torch.Tensor) -> torch.Tensor:
    return gate_up_E2FD.chunk(2, dim=1)[0].contiguous()


def _second_half(gate_up_E2FD: torch.Tensor) -> torch.Tensor:
    return gate_up_E2FD.chunk(2, dim=1)[1].contiguous()


def stack_experts(*per_expert: torch.Tensor) -> torch.Tensor:
    """Per-expert tensors -> our grouped ``[E, ...]`` tensor."""
    return torch.stack(per_expert)


def pick(names: Collection[str], *candidates: str) -> str:
    """The first of ``candidates`` among the stored ``names``.

    Raises:
        ValueError: none is stored (naming the first, which the config implies).
    """
    for name in candidates:
        if name in names:
            return name
    raise ValueError(
        f"transformers weights lack tensor {candidates[0]!r}, which their config implies"
    )


# Stored tensors that transformers itself drops on load: RoPE tables old Llama files carry and
# XLM-R's position-id buffer and pooler (the masked-LM class has no pooler).
_DROPPED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids", "embeddings.token_type_ids")
_DROPPED_PREFIXES = ("roberta.pooler.",)


class _Stored:
    """The stored names, with the one-line errors of a lookup that fails."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = set(names)

    def pick(self, *candidates: str) -> str:
        return pick(self.names, *candidates)


def _decoder_imports(cfg: ModelConfig, stored: _Stored) -> tuple[list[ImportItem], set[str]]:
    items = []
    for ours, theirs in decoder._table(cfg).items():
        # Mixtral's router is stored under its original module name
        legacy = theirs.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        items.append(ImportItem(ours, (stored.pick(theirs, legacy),)))
    for layer in range(cfg.num_layers):
        if not is_moe_layer(cfg, layer=layer):
            continue
        ours, theirs = f"layers.{layer}.moe.experts.", f"model.layers.{layer}.mlp.experts."
        if theirs + "gate_up_proj" in stored.names or theirs + "down_proj" in stored.names:
            gate_up = stored.pick(theirs + "gate_up_proj")
            items.append(ImportItem(ours + "w1", (gate_up,), _first_half))
            items.append(ImportItem(ours + "w3", (gate_up,), _second_half))
            items.append(ImportItem(ours + "w2", (stored.pick(theirs + "down_proj"),)))
            continue
        prefixes = (
            f"model.layers.{layer}.block_sparse_moe.experts.",  # Mixtral as saved
            theirs,  # Qwen3-MoE as saved (and Mixtral renamed)
        )
        if not any(name.startswith(prefixes) for name in stored.names):
            stored.pick(theirs + "gate_up_proj")  # neither layout: name the fused tensor
        for key, names in (("w1", ("w1", "gate_proj")), ("w3", ("w3", "up_proj")),
                           ("w2", ("w2", "down_proj"))):  # fmt: skip
            sources = tuple(
                stored.pick(*[f"{p}{e}.{n}.weight" for n in names for p in prefixes])
                for e in range(cfg.moe.num_experts)
            )
            items.append(ImportItem(ours + key, sources, stack_experts))
    return items, ({"lm_head.weight"} if cfg.tie_embeddings else set())


def _xlmr_imports(cfg: ModelConfig, stored: _Stored) -> tuple[list[ImportItem], set[str]]:
    pad = xlm_roberta._padding_idx(cfg)

    def positions(pos_PD: torch.Tensor, token_type_RD: torch.Tensor) -> torch.Tensor:
        # see xlm_roberta: rows up to pad are unused; a non-zero token type 0 folds in
        pos_PD = pos_PD[pad + 1 :]
        if not pos_PD.is_meta and bool(token_type_RD[0].any()):
            pos_PD = pos_PD + token_type_RD[0]
        return pos_PD.contiguous()

    items = [
        ImportItem(
            "pos_embeddings.weight",
            (
                stored.pick("roberta.embeddings.position_embeddings.weight"),
                stored.pick("roberta.embeddings.token_type_embeddings.weight"),
            ),
            positions,
        )
    ]
    bias = stored.pick("lm_head.bias", "lm_head.decoder.bias")
    if cfg.tie_embeddings:
        items.append(ImportItem("output_bias", (bias,)))
    else:
        items.append(ImportItem("output.weight", (stored.pick("lm_head.decoder.weight"),)))
        items.append(ImportItem("output.bias", (bias,)))
    items += [
        ImportItem(ours, (stored.pick(theirs),)) for ours, theirs in xlm_roberta._table(cfg).items()
    ]
    ignored = {"lm_head.bias", "lm_head.decoder.bias"}
    if cfg.tie_embeddings:
        ignored.add("lm_head.decoder.weight")
    return items, ignored


def _bert_imports(cfg: ModelConfig, stored: _Stored) -> tuple[list[ImportItem], set[str]]:
    bias = stored.pick("cls.predictions.bias", "cls.predictions.decoder.bias")
    items = []
    if cfg.tie_embeddings:
        items.append(ImportItem("output_bias", (bias,)))
    else:
        items.append(ImportItem("output.weight", (stored.pick("cls.predictions.decoder.weight"),)))
        items.append(ImportItem("output.bias", (bias,)))
    items += [
        ImportItem(ours, (stored.pick(theirs),))
        for ours, theirs in xlm_roberta._bert_table(cfg).items()
    ]
    ignored = {"cls.predictions.bias", "cls.predictions.decoder.bias"}
    if cfg.tie_embeddings:
        ignored.add("cls.predictions.decoder.weight")
    return items, ignored


def import_items(cfg: ModelConfig, hf_names: Collection[str]) -> list[ImportItem]:
    """The import plan of ``cfg`` (from the adapter's ``config_from_hf``) over the stored
    tensor names ``hf_names`` (see the module docstring).

    Raises:
        ValueError: a tensor the config implies is not stored, or a stored tensor has no place
            in our model (one line naming it).
    """
    from checkpoints_tools.adapters import adapter_for

    adapter = adapter_for(cfg)
    stored = _Stored(hf_names)
    if adapter in (LlamaAdapter, MixtralAdapter, Qwen3MoeAdapter):
        items, ignored = _decoder_imports(cfg, stored)
    elif adapter is XLMRobertaAdapter:
        items, ignored = _xlmr_imports(cfg, stored)
    elif adapter is BertAdapter:
        items, ignored = _bert_imports(cfg, stored)
    else:
        raise AssertionError(f"no import plan for {adapter.__name__}")
    used = {source for item in items for source in item.sources} | ignored
    for name in hf_names:
        if name in used or name.endswith(_DROPPED_SUFFIXES) or name.startswith(_DROPPED_PREFIXES):
            continue
        raise ValueError(f"state dict key {name!r} has no mapping for this model family")
    return items
