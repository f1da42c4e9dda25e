"""Pre-training losses computed from final hidden states in token chunks.

hidden_BTD = model(tokens_BT, return_hidden=True)
weight_VD, bias_V = model.output_projection()
loss = clm_loss(hidden_BTD, tokens_BT, weight_VD, bias_V=bias_V, chunk_tokens=4096)
"""

from __future__ import annotations

from pretrain.objectives.losses import IGNORE_INDEX, chunked_cross_entropy, clm_loss, mlm_loss

__all__ = ["IGNORE_INDEX", "chunked_cross_entropy", "clm_loss", "mlm_loss"]
