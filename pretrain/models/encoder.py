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

from pretrain.models.blocks import Block, build_norm
from pretrain.models.config import ModelConfig, generator_config
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


class ElectraGenerator(nn.Module):
    """ELECTRA's generator (``model.generator_fraction``): a narrower dense stack over the
    model's own embeddings, ``head(layers(project(x)))`` -> hidden states of the model's width
    for its tied output projection (``ElectraForMaskedLM``: ``embeddings_project``,
    ``encoder``, ``generator_predictions``, ``generator_lm_head``). Submodules ``project``
    (None when the widths agree), ``layers.{i}``, ``norm`` (pre-norm models only), ``head``
    (dense to the model width, GELU, norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        gen = generator_config(cfg)
        self.cfg = gen
        self.project: nn.Linear | None = (
            nn.Linear(cfg.hidden_size, gen.hidden_size)
            if gen.hidden_size != cfg.hidden_size
            else None
        )
        self.layers = nn.ModuleDict(
            {str(i): Block(gen, use_moe=False) for i in range(gen.num_layers)}
        )
        # pre-norm blocks leave their output unnormalised: a final norm, as the stack's
        self.norm: nn.Module | None = build_norm(gen) if cfg.norm_position == "pre" else None
        self.head = GeneratorHead(cfg, width=gen.hidden_size)

    def forward(self, x_BTD: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """Embedded inputs ``x_BTD`` (model width) -> ``h_BTD`` (model width)."""
        if self.project is not None:
            x_BTD = self.project(x_BTD)
        for layer in self.layers.values():
            x_BTD = layer(x_BTD, **block_kwargs)
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        return self.head(x_BTD)


class GeneratorHead(nn.Module):
    """ELECTRA's generator predictions: ``norm(gelu(dense(x)))`` from the generator width back
    to the model's; submodules ``dense``, ``norm``."""

    def __init__(self, cfg: ModelConfig, *, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x_BTG: torch.Tensor) -> torch.Tensor:
        """``x_BTG -> h_BTD``."""
        return self.norm(F.gelu(self.dense(x_BTG)))


class DiscriminatorHead(nn.Module):
    """ELECTRA's discriminator predictions: ``dense_prediction(gelu(dense(x)))``, one logit per
    position (replaced or not); submodules ``dense``, ``dense_prediction``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dense_prediction = nn.Linear(cfg.hidden_size, 1)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> logits_BT``."""
        return self.dense_prediction(F.gelu(self.dense(x_BTD))).squeeze(-1)


class Encoder(Transformer):
    """Bidirectional Transformer with an MLM head: ``forward(tokens_BT, ...) -> logits_BTV``.

    Padding: give pad tokens the ``document_ids_BT`` value -1, so that real tokens never see
    them and MoE layers do not route them.

    ELECTRA (``model.generator_fraction``): no MLM head; the masked-LM outputs come from the
    ``generator`` (a narrower stack over the same embeddings) and the stack itself is the
    discriminator, scored by ``discriminator`` (``Transformer.forward``'s ``rtd_labels_BT``).
    """

    causal = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from pretrain.objectives.contrastive import SentencePool

        self.sentence_pool = SentencePool()
        if cfg.generator_fraction:
            # ELECTRA: the stack is the discriminator; the masked-LM outputs are the generator's
            self.generator = ElectraGenerator(cfg)
            self.discriminator = DiscriminatorHead(cfg)
        else:
            self.head = MLMHead(cfg)
        if cfg.pair_head:
            self.pooler = Pooler(cfg)
            self.pair_classifier = nn.Linear(cfg.hidden_size, 2)
        if cfg.span_boundary_positions:
            self.span_boundary = SpanBoundaryHead(cfg)
