"""Model families: a Llama-shaped decoder, an XLM-R-shaped encoder and an mT5/mBART/Switch-shaped
encoder-decoder, dense or MoE.

``build_model(cfg)`` returns a plain ``nn.Module`` (no parallelism inside). Build it on the meta
device, let ``parallel/`` apply its plans (``pretrain.models.parallel_plan``), then
``to_empty()`` and ``init_weights(seed)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.models.config import ModelConfig, MoEConfig, validate_model
from pretrain.models.moe import MoEMetrics, MoEStats
from pretrain.models.parallel_plan import (
    TP_STYLES,
    param_counts,
    pipeline_split_points,
    pipeline_stage_layers,
    prune_to_stage,
    tp_plan,
)
from pretrain.models.transformer import Transformer

if TYPE_CHECKING:
    from pretrain.models.encoder_decoder import EncoderDecoder


def build_model(cfg: ModelConfig) -> Transformer | EncoderDecoder:
    """Validate ``cfg`` and build its family's model (parameters uninitialised unless on a real
    device, where torch's default init applies until ``init_weights`` is called).

    Raises:
        ValueError: an invalid config.
    """
    validate_model(cfg)
    if cfg.family == "decoder":
        from pretrain.models.decoder import Decoder

        return Decoder(cfg)
    if cfg.family == "encoder":
        from pretrain.models.encoder import Encoder

        return Encoder(cfg)
    from pretrain.models.encoder_decoder import EncoderDecoder

    return EncoderDecoder(cfg)


__all__ = [
    "TP_STYLES",
    "MoEConfig",
    "MoEMetrics",
    "MoEStats",
    "ModelConfig",
    "Transformer",
    "build_model",
    "param_counts",
    "pipeline_split_points",
    "pipeline_stage_layers",
    "prune_to_stage",
    "tp_plan",
    "validate_model",
]
