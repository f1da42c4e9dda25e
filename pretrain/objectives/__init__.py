"""Pre-training objectives: what each asks of the loader, its targets, its loss and its metrics.

What to call: ``ObjectiveMix.from_config(cfg)`` (the run's objectives,
``pretrain.objectives.mix``); ``OBJECTIVES`` / ``register`` (the registry,
``pretrain.objectives.registry``); the chunked losses (``pretrain.objectives.losses``)::

    hidden_BTD = model(tokens_BT, return_hidden=True)
    weight_VD, bias_V = model.output_projection()
    loss = clm_loss(hidden_BTD, tokens_BT, weight_VD, bias_V=bias_V, chunk_tokens=4096)

Encoder-decoder objectives (span corruption, denoising, translation) score the decoder's
hidden states ``model(tokens_BS, decoder_tokens_BT, return_hidden=True)`` against labels
aligned with the decoder inputs (``SequenceToSequence``: no shift).
"""

from __future__ import annotations

from pretrain.objectives.losses import IGNORE_INDEX, chunked_cross_entropy, clm_loss, mlm_loss
from pretrain.objectives.mix import ObjectiveMix
from pretrain.objectives.registry import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    Objective,
    SequenceToSequence,
    TokenPrediction,
    objective_weights,
    register,
)

__all__ = [
    "DEFAULT_OBJECTIVE",
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Objective",
    "ObjectiveMix",
    "SequenceToSequence",
    "TokenPrediction",
    "chunked_cross_entropy",
    "clm_loss",
    "mlm_loss",
    "objective_weights",
    "register",
]
