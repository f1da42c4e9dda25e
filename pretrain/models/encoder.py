"""XLM-R/BERT-shaped bidirectional encoder with an MLM head, dense or MoE.

What to call: ``build_model(cfg)`` with ``model.family=encoder`` (an :class:`Encoder`); the
call contract of ``pretrain.models.transformer.Transformer``, the hidden states passing through
``head`` before the projection. Guarantee: padding (document id -1) is never attended to.

The MLM head is ``head`` = dense (D -> D) -> GELU -> norm, followed by the output projection
(tied to ``tok_embeddings`` with a bias of its own in XLM-R). With ``model.pair_head`` BERT's
pooler and a 2-way classifier (``pooler``, ``pair_classifier``) read the first position's state
before the MLM head, for NSP / SOP; ``model.type_vocab_size`` adds segment embeddings. A dense
encoder exports exactly to ``XLMRobertaForMaskedLM``; an MoE encoder has no upstream twin.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.blocks import build_norm
from pretrain.models.config import ModelConfig
from pretrain.models.transformer import Transformer


class MLMHead(nn.Module):
    """XLM-R's LM-head transform: ``norm(gelu(dense(x)))``; submodules ``dense``, ``norm``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        self.norm = build_norm(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> h_BTD``."""
        return self.norm(F.gelu(self.dense(x_BTD)))


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(x[:, 0]))``, the first position's state (``<cls>``) of the
    whole sequence ``x_BTD`` (a tensor-parallel plan gathers it first); submodule ``dense``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> pooled_BD``."""
        return torch.tanh(self.dense(x_BTD[:, 0]))


class SpanBoundaryHead(nn.Module):
    """SpanBERT's span-boundary objective: a target at offset p of a span is predicted from
    the states just outside the span and a relative-position embedding,
    ``y = norm2(gelu(dense2(norm1(gelu(dense1([x_left; x_right; pos_p]))))))``, then the
    output projection; submodules ``positions``, ``dense1``, ``norm1``, ``dense2``,
    ``norm2``. Takes the whole sequence ``x_BTD`` (a tensor-parallel plan gathers it)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.num_positions = cfg.span_boundary_positions
        self.positions = nn.Embedding(self.num_positions, dim)
        self.dense1 = nn.Linear(3 * dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.dense2 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, *, span_targets_N4: torch.Tensor) -> torch.Tensor:
        """``x_BTD`` and ``[N, 4]`` (row, left, right, offset) of each target -> ``y_ND``."""
        row_N, left_N, right_N, offset_N = span_targets_N4.long().unbind(dim=1)
        offset_N = offset_N.clamp(max=self.num_positions - 1)
        h_N3D = torch.cat(
            [x_BTD[row_N, left_N], x_BTD[row_N, right_N], self.positions(offset_N)], dim=-1
        )
        h_ND = self.norm1(F.gelu(self.dense1(h_N3D)))
        return self.norm2(F.gelu(self.dense2(h_ND)))


class Encoder(Transformer):
    """Bidirectional Transformer with an MLM head: ``forward(tokens_BT, ...) -> logits_BTV``.

    Padding: give pad tokens the ``document_ids_BT`` value -1, so that real tokens never see
    them and MoE layers do not route them.
    """

    causal = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.head = MLMHead(cfg)
        if cfg.pair_head:
            self.pooler = Pooler(cfg)
            self.pair_classifier = nn.Linear(cfg.hidden_size, 2)
        if cfg.span_boundary_positions:
            self.span_boundary = SpanBoundaryHead(cfg)
