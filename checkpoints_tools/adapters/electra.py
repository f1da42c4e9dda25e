"""ELECTRA adapter: an encoder with ELECTRA's generator (``model.generator_fraction``) ->
``ElectraForPreTraining`` (the discriminator: the model itself) and ``ElectraForMaskedLM`` (the
generator), two transformers directories.

What to call: usually ``checkpoints_tools.convert.export_hf`` (the generator goes to
``OUT/generator``). :class:`ElectraAdapter` has ``check(cfg)`` (``ValueError``, one line, when
``cfg`` has no exact twin), ``to_hf(state_dict, cfg)`` -> ``(hf_state_dict, ElectraConfig)`` of
the discriminator, ``generator_to_hf`` the same for the generator, and ``export_items`` /
``generator_export_items`` their streaming plans (``tensor_map.ExportItem``). Export only:
ELECTRA checkpoints are not imported (an import would need both directories and gives a model
only ``objective.weights.electra`` trains).

Details carried over exactly (transformers' ``modeling_electra``):
    embeddings: each directory holds its own copy of the shared tables and their norm
        (``electra.embeddings``: words, positions from 0, token types, LayerNorm), as
        ELECTRA's releases do; a model without segment embeddings exports one row of zeros
        (``type_vocab_size=1``).
    discriminator: ``electra.encoder`` our ``layers``, ``discriminator_predictions.dense`` ->
        the config's ``hidden_act`` (GELU) -> ``dense_prediction``: our ``discriminator``.
    generator: ``embedding_size`` our width, ``hidden_size`` the generator's;
        ``electra.embeddings_project`` our ``generator.project`` (absent when the widths
        agree, as in transformers), ``generator_predictions.dense`` -> GELU (fixed in
        transformers) -> ``LayerNorm`` our ``generator.head``, ``generator_lm_head`` our output
        projection (tied to the word embeddings with ``model.tie_embeddings``; its bias our
        ``output_bias``).
"""

from __future__ import annotations

from typing import Any

import torch

from checkpoints_tools.adapters.base import StateDict
from checkpoints_tools.adapters.xlm_roberta import _LAYER, _check_body, _hf_body_config
from pretrain.models.config import ModelConfig, generator_config

_TARGET = "ElectraForPreTraining"


def _zero_token_types(pos_PD: torch.Tensor) -> torch.Tensor:
    return pos_PD.new_zeros(1, pos_PD.shape[1])


def _table(cfg: ModelConfig, *, generator: bool) -> dict[str, str]:
    """Theirs -> ours for every 1:1 tensor of one directory (the zero token types apart)."""
    embed = "electra.embeddings."
    table = {
        embed + "word_embeddings.weight": "tok_embeddings.weight",
        embed + "position_embeddings.weight": "pos_embeddings.weight",
        embed + "LayerNorm.weight": "embed_norm.weight",
        embed + "LayerNorm.bias": "embed_norm.bias",
    }
    if cfg.type_vocab_size:
        table[embed + "token_type_embeddings.weight"] = "type_embeddings.weight"
    heads = {"dense": "dense", "dense_prediction": "dense_prediction"}
    prefix, stack, head = "discriminator_predictions", "layers", "discriminator"
    if generator:
        heads = {"dense": "dense", "LayerNorm": "norm"}
        prefix, stack, head = "generator_predictions", "generator.layers", "generator.head"
        if generator_config(cfg).hidden_size != cfg.hidden_size:
            for kind in ("weight", "bias"):
                table[f"electra.embeddings_project.{kind}"] = f"generator.project.{kind}"
        table["generator_lm_head.bias"] = "output_bias" if cfg.tie_embeddings else "output.bias"
        if not cfg.tie_embeddings:
            table["generator_lm_head.weight"] = "output.weight"
    for kind in ("weight", "bias"):
        for layer in range(cfg.num_layers):
            for mine, theirs in _LAYER.items():
                table[f"electra.encoder.layer.{layer}.{theirs}.{kind}"] = (
                    f"{stack}.{layer}.{mine}.{kind}"
                )
        for theirs, mine in heads.items():
            table[f"{prefix}.{theirs}.{kind}"] = f"{head}.{mine}.{kind}"
    return table


def _items(cfg: ModelConfig, *, generator: bool) -> list[Any]:
    from checkpoints_tools.adapters.tensor_map import ExportItem

    items = [ExportItem(t, (o,)) for t, o in _table(cfg, generator=generator).items()]
    if not cfg.type_vocab_size:
        name = "electra.embeddings.token_type_embeddings.weight"
        items.append(ExportItem(name, ("pos_embeddings.weight",), _zero_token_types))
    return items


def _apply(items: list[Any], state_dict: StateDict) -> StateDict:
    return {item.name: item.combine(*[state_dict[s] for s in item.sources]) for item in items}


class ElectraAdapter:
    """ELECTRA encoder -> ``ElectraForPreTraining`` + ``ElectraForMaskedLM`` (export only)."""

    name = "electra"
    hf_architecture = _TARGET
    generator_architecture = "ElectraForMaskedLM"

    @staticmethod
    def check(cfg: ModelConfig) -> None:
        """Raises ValueError (one line) if ``cfg`` has no exact ELECTRA twin."""
        _check_body(cfg, target=_TARGET)
        if not cfg.generator_fraction:
            raise ValueError(f"model.generator_fraction (0.0) must be > 0 to export to {_TARGET}")
        for key in ("pair_head", "span_boundary_positions"):
            if getattr(cfg, key):
                raise ValueError(
                    f"model.{key} ({getattr(cfg, key)!r}) must be off to export to {_TARGET}"
                )

    @staticmethod
    def _config(cfg: ModelConfig, *, generator: bool) -> Any:
        from transformers import ElectraConfig

        body = _hf_body_config(cfg)
        body.pop("tie_word_embeddings")
        if generator:
            gen = generator_config(cfg)
            body.update(
                hidden_size=gen.hidden_size,
                num_attention_heads=gen.num_heads,
                intermediate_size=gen.ffn_hidden_size,
            )
        return ElectraConfig(
            **body,
            embedding_size=cfg.hidden_size,
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=max(cfg.type_vocab_size, 1),
            pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else 0,
            tie_word_embeddings=cfg.tie_embeddings if generator else False,
            architectures=[
                ElectraAdapter.generator_architecture
                if generator
                else ElectraAdapter.hf_architecture
            ],
        )

    @staticmethod
    def export_items(cfg: ModelConfig) -> list[Any]:
        """The discriminator's streaming plan (``tensor_map.ExportItem``)."""
        ElectraAdapter.check(cfg)
        return _items(cfg, generator=False)

    @staticmethod
    def generator_export_items(cfg: ModelConfig) -> list[Any]:
        """The generator's streaming plan (the tied ``generator_lm_head.weight`` left out, as
        transformers saves it)."""
        ElectraAdapter.check(cfg)
        return _items(cfg, generator=True)

    @staticmethod
    def to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, ElectraConfig)`` of the discriminator."""
        ElectraAdapter.check(cfg)
        hf_config = ElectraAdapter._config(cfg, generator=False)
        return _apply(_items(cfg, generator=False), state_dict), hf_config

    @staticmethod
    def generator_to_hf(state_dict: StateDict, cfg: ModelConfig) -> tuple[StateDict, Any]:
        """``(hf_state_dict, ElectraConfig)`` of the generator (``ElectraForMaskedLM``)."""
        ElectraAdapter.check(cfg)
        hf_config = ElectraAdapter._config(cfg, generator=True)
        hf = _apply(_items(cfg, generator=True), state_dict)
        if cfg.tie_embeddings:
            hf["generator_lm_head.weight"] = hf["electra.embeddings.word_embeddings.weight"]
        return hf, hf_config
