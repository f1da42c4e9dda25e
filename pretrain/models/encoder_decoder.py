"""Encoder-decoder family: mT5/T5 v1.1-, mBART- and Switch-shaped, dense or MoE.

What to call: ``build_model(cfg)`` with ``model.family=encoder_decoder`` returns an
:class:`EncoderDecoder`; ``model(tokens_BS, decoder_tokens_BT, document_ids_BS=...,
decoder_document_ids_BT=...) -> logits_BTV`` (with ``return_hidden``: ``hidden_BTD``, what
enters the output projection), and ``output_projection() -> (weight_VD, bias_V)`` for the
chunked losses of ``pretrain.objectives``. ``encode`` / ``decode`` run the two halves. Padding
has document id -1 in either stack: real tokens never attend to it (self- or cross-attention)
and MoE layers do not route it. Same document ids in source and target pair a packed source
with its target.

Variants are config, not classes:
    mT5 / T5 v1.1: ``norm=rmsnorm`` (fp32, eps 1e-6), pre-norm, ``bias=false``,
        ``scale_attention=false``, ``position=relative`` (block 0 of each stack owns the bucket
        table ``layers.0.attention.relative_attention_bias``; later blocks reuse its bias;
        cross-attention has none), ``mlp=gated_gelu``, untied head, ``head_dim`` free.
    T5 v1.0 / Switch: as mT5 with ``mlp=relu`` (Switch experts: gelu) and, tied,
        ``scale_output`` (the decoder output times d^-0.5 before the tied head).
    mBART: ``norm=layernorm``, ``bias=true``, ``embedding_norm``, ``position=learned``,
        ``scale_embeddings`` optional, ``mlp=gelu``, ``tie_embeddings`` + ``final_logits_bias``.
    NLLB-MoE / M2M100: as mBART without ``embedding_norm`` or ``final_logits_bias``, with
        ``position=sinusoidal`` and ``scale_embeddings``; GShard top-2 experts.
    MoE: ``model.moe`` in both stacks, on layers ``i % every == offset`` (Switch: offset 1),
        through ``pretrain.models.moe.MoE`` (experts take swiglu or gelu).

Submodule names: ``tok_embeddings`` (shared), ``encoder`` / ``decoder`` (:class:`Stack`:
``pos_embeddings``, ``embed_norm``, ``layers.{i}`` (``attention``, ``attention_norm``,
``cross_attention``, ``cross_attention_norm`` (decoder), ``feed_forward`` or ``moe``,
``ffn_norm``), ``norm``), and the output head: ``output`` (untied ``nn.Linear``; its bias is
mBART's ``final_logits_bias``) or ``tied_output`` (a ``transformer.TiedOutput`` applying
``tok_embeddings.weight`` and ``output_bias``). The logits always come from calling that module.

Shape legend:
    B batch, S source length, T target length (queries), K keys (S or T), D model width,
    H heads, Hd head width, V vocabulary, F feed-forward width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.blocks import (
    FeedForward,
    RMSNorm,
    attention_mask,
    build_norm,
    causal_mask,
    document_positions,
)
from pretrain.models.config import ModelConfig
from pretrain.models.kv_cache import KVCache, LayerKV
from pretrain.models.moe import MoE, MoEMetrics, MoEStats
from pretrain.models.transformer import TiedOutput, canonical_name, param_seed


def is_encdec_moe_layer(cfg: ModelConfig, *, layer: int) -> bool:
    """Whether block ``layer`` of either stack has an MoE feed-forward:
    ``layer % moe.every == moe.offset`` (offset default every - 1)."""
    moe = cfg.moe
    if moe.num_experts == 0:
        return False
    offset = moe.every - 1 if moe.offset is None else moe.offset
    return layer % moe.every == offset


def decoder_layers(cfg: ModelConfig) -> int:
    """Decoder blocks: ``num_decoder_layers`` or ``num_layers``."""
    return cfg.num_layers if cfg.num_decoder_layers is None else cfg.num_decoder_layers


def sinusoidal_positions(position_ids_BT: torch.Tensor, *, dim: int) -> torch.Tensor:
    """fairseq's (tensor2tensor's) sinusoidal embeddings ``pos_BTD`` of the given positions:
    ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (dim/2 - 1))``, a zero column when
    ``dim`` is odd."""
    half = dim // 2
    inv_freq = torch.exp(
        torch.arange(half, device=position_ids_BT.device).float() * -(math.log(10000) / (half - 1))
    )
    angles_BTP = position_ids_BT.float()[..., None] * inv_freq
    pos_BTD = torch.cat([angles_BTP.sin(), angles_BTP.cos()], dim=-1)
    if dim % 2 == 1:
        pos_BTD = F.pad(pos_BTD, (0, 1))
    return pos_BTD


def relative_position_bucket(
    relative_KK: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): half of the buckets exact, half
    log-spaced up to ``max_distance``; the bidirectional form splits them by sign."""
    buckets = torch.zeros_like(relative_KK)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_KK > 0).long() * num_buckets
        distance = relative_KK.abs()
    else:
        distance = -torch.minimum(relative_KK, torch.zeros_like(relative_KK))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (
        torch.log(distance.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


class EncDecAttention(nn.Module):
    """Multi-head attention with an optional additive bias (relative positions, masks).

    ``wq``/``wk``/``wv`` (column-parallel candidates), ``wo`` (row-parallel); inner width
    ``num_heads * head_dim`` may differ from D. ``relative_attention_bias`` (buckets x H) only
    on block 0's self-attention with ``position=relative``.
    """

    def __init__(self, cfg: ModelConfig, *, owns_relative_bias: bool) -> None:
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        self.dropout = cfg.dropout
        self.scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attention else 1.0
        inner = cfg.num_heads * self.head_dim
        kv_inner = cfg.kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.hidden_size, inner, bias=cfg.bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_inner, bias=cfg.bias)
        self.wv = nn.Linear(cfg.hidden_size, kv_inner, bias=cfg.bias)
        self.wo = nn.Linear(inner, cfg.hidden_size, bias=cfg.bias)
        self.relative_attention_bias: nn.Embedding | None = (
            nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
            if owns_relative_bias
            else None
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        kv_source_BKD: torch.Tensor | None = None,
        bias_BHTK: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """Attend from ``x_BTD`` to itself or ``kv_source_BKD``; ``bias_BHTK`` is added to the
        scores (float) or masks them (bool, True = may attend). Returns ``y_BTD``. ``cache``
        (generation, ``pretrain.models.kv_cache``): self-attention appends the new tokens'
        keys/values to it; a ``static`` slot (cross-attention) holds the memory's, computed
        at the first call."""
        batch, seq, _ = x_BTD.shape
        q = self.wq(x_BTD).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if cache is not None and cache.static and cache.k_BKSHd is not None:
            k, v = cache.k_BKSHd, cache.v_BKSHd
        else:
            kv_BKD = x_BTD if kv_source_BKD is None else kv_source_BKD
            k = self.wk(kv_BKD).view(batch, kv_BKD.shape[1], -1, self.head_dim).transpose(1, 2)
            v = self.wv(kv_BKD).view(batch, kv_BKD.shape[1], -1, self.head_dim).transpose(1, 2)
            if cache is not None:
                k, v = cache.extend(k, v)
        out_BHTHd = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias_BHTK,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and bias_BHTK is None,
            scale=self.scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return self.wo(out_BHTHd.transpose(1, 2).reshape(batch, seq, -1))


class EncDecFeedForward(FeedForward):
    """``blocks.FeedForward`` plus T5's variants: gated_gelu ``w2(gelu_tanh(w1 x) * w3 x)``
    (mT5's ``wi_0``, ``wi_1``, ``wo``) and relu ``w2(relu(w1 x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.activation = cfg.mlp
        if cfg.mlp == "gated_gelu":
            self.w3 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> y_BTD``."""
        if self.activation == "gated_gelu":
            return self.w2(F.gelu(self.w1(x_BTD), approximate="tanh") * self.w3(x_BTD))
        if self.activation == "relu":
            return self.w2(F.relu(self.w1(x_BTD)))
        return super().forward(x_BTD)


class EncDecBlock(nn.Module):
    """Self-attention, cross-attention (decoder only), feed-forward; pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, *, layer: int, cross: bool) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention = EncDecAttention(
            cfg, owns_relative_bias=cfg.position == "relative" and layer == 0
        )
        self.attention_norm = build_norm(cfg)
        self.cross_attention = EncDecAttention(cfg, owns_relative_bias=False) if cross else None
        self.cross_attention_norm = build_norm(cfg) if cross else None
        if is_encdec_moe_layer(cfg, layer=layer):
            self.moe: MoE | None = MoE(cfg)
            self.feed_forward: EncDecFeedForward | None = None
        else:
            self.moe = None
            self.feed_forward = EncDecFeedForward(cfg)
        self.ffn_norm = build_norm(cfg)
        self.relative_max_distance = cfg.relative_attention_max_distance

    def _residual(self, x_BTD: torch.Tensor, norm: nn.Module, fn, **kwargs) -> torch.Tensor:
        if self.pre_norm:
            return x_BTD + self.dropout(fn(norm(x_BTD), **kwargs))
        return norm(x_BTD + self.dropout(fn(x_BTD, **kwargs)))

    def position_bias(
        self,
        position_bias: torch.Tensor | None,
        *,
        num_tokens: int,
        causal: bool,
        dtype,
        past: int = 0,
    ) -> torch.Tensor | None:
        """The relative-position bias ``bias_1HTK`` of the stack: from this block's table when
        it owns one (block 0 with ``position=relative``), else ``position_bias`` as given.
        ``past``: cached positions before the ``num_tokens`` queries (keys: all of them)."""
        table = self.attention.relative_attention_bias
        if table is None:
            return position_bias
        keys = torch.arange(past + num_tokens, device=table.weight.device)
        buckets_TT = relative_position_bucket(
            keys[None, :] - keys[past:, None],
            bidirectional=not causal,
            num_buckets=table.num_embeddings,
            max_distance=self.relative_max_distance,
        )
        return table(buckets_TT).permute(2, 0, 1)[None].to(dtype)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        self_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        num_tokens: int,
        is_causal: bool,
        memory_BSD: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
        past: int = 0,
        cache: tuple[LayerKV, LayerKV | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x_BTD -> (y_BTD, position_bias)``. ``self_mask``: the self-attention mask (bool,
        True = may attend; None: all, or causal); ``position_bias``: the stack's relative
        position bias ``bias_1HTT`` (None without relative positions, or before block 0): block
        0 makes it from its table and returns it, the later blocks reuse it, as T5 does. The
        table is read inside this block's forward, so that a per-block FSDP unit holds it
        gathered, and the bias is an activation a pipeline stage can hand on. ``num_tokens``:
        the whole sequence's length (a sequence-parallel rank holds a chunk of it). ``past`` /
        ``cache`` (generation): ``x_BTD`` holds the tokens after ``past`` cached ones, whose
        keys/values are in ``cache`` (self-attention slot, cross-attention slot); the mask
        then spans cached + new keys."""
        position_bias = self.position_bias(
            position_bias, num_tokens=num_tokens, causal=is_causal, dtype=x_BTD.dtype, past=past
        )
        self_bias = self_mask
        if position_bias is not None:
            if self_mask is None and is_causal:
                self_mask = causal_mask(num_tokens, past=past, device=position_bias.device)
            self_bias = _mask_to_bias(self_mask, position_bias)
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x_BTD = self._residual(
            x_BTD,
            self.attention_norm,
            self.attention,
            bias_BHTK=self_bias,
            is_causal=is_causal and cache is None,
            cache=self_cache,
        )
        if self.cross_attention is not None:
            x_BTD = self._residual(
                x_BTD,
                self.cross_attention_norm,
                self.cross_attention,
                kv_source_BKD=memory_BSD,
                bias_BHTK=cross_bias,
                cache=cross_cache,
            )
        if self.moe is not None:
            x_BTD = self._residual(x_BTD, self.ffn_norm, self.moe, token_mask_BT=token_mask_BT)
        else:
            x_BTD = self._residual(x_BTD, self.ffn_norm, self.feed_forward)
        return x_BTD, position_bias


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; the gradient made contiguous in backward (a pipeline stage's received
    activations: gloo sends only contiguous gradients, and the encoder memory's is strided)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """A stage's outputs, None left out, each contiguous (the next stage receives into buffers
    of the same strides, and gloo receives only into contiguous ones)."""
    return tuple(t.contiguous() for t in tensors if t is not None)


def _mask_to_bias(mask_B1TK: torch.Tensor | None, bias_1HTK: torch.Tensor | None):
    """One attention bias from a boolean mask and a float bias (either may be None)."""
    if bias_1HTK is None:
        return mask_B1TK
    if mask_B1TK is None:
        return bias_1HTK
    return bias_1HTK.masked_fill(~mask_B1TK, float("-inf"))


class Stack(nn.Module):
    """One stack (encoder, or decoder with cross-attention) over an embedding it is handed."""

    def __init__(self, cfg: ModelConfig, *, decoder: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = decoder
        num_layers = decoder_layers(cfg) if decoder else cfg.num_layers
        dim = cfg.hidden_size
        self.pos_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.max_seq_len, dim) if cfg.position == "learned" else None
        )
        # fairseq numbers positions from padding_idx + 1 (NLLB / M2M100)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 1
        self.sinusoid_offset: int | None = pad + 1 if cfg.position == "sinusoidal" else None
        self.embed_norm: nn.Module | None = build_norm(cfg) if cfg.embedding_norm else None
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict(
            {str(i): EncDecBlock(cfg, layer=i, cross=decoder) for i in range(num_layers)}
        )
        self.norm: nn.Module | None = build_norm(cfg) if cfg.norm_position == "pre" else None
        self.final_dropout = nn.Dropout(cfg.dropout)
        self.ends = True  # holds the stack's last block (false on earlier pipeline stages)

    def embed(
        self,
        x_BTD: torch.Tensor,
        *,
        document_ids_BT: torch.Tensor | None,
        num_tokens: int,
        past: int = 0,
    ) -> torch.Tensor:
        """Token embeddings ``x_BTD`` -> the first block's input (positions, embedding norm,
        dropout). ``past``: cached positions before these tokens (``document_ids_BT`` then
        covers cached and new ones)."""
        if self.pos_embeddings is not None or self.sinusoid_offset is not None:
            if document_ids_BT is not None:
                position_ids_BT = document_positions(document_ids_BT)[:, past:]
            else:
                position_ids_BT = torch.arange(past, past + num_tokens, device=x_BTD.device)[None]
            if self.pos_embeddings is not None:
                x_BTD = x_BTD + self.pos_embeddings(position_ids_BT)
            else:
                pos_BTD = sinusoidal_positions(
                    position_ids_BT + self.sinusoid_offset, dim=x_BTD.shape[-1]
                )
                x_BTD = x_BTD + pos_BTD.to(x_BTD.dtype)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)
        return self.embed_dropout(x_BTD)

    def run_blocks(
        self,
        x_BTD: torch.Tensor,
        *,
        document_ids_BT: torch.Tensor | None,
        num_tokens: int,
        position_bias: torch.Tensor | None = None,
        memory_BSD: torch.Tensor | None = None,
        memory_document_ids_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_prefix: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stack's blocks (all, or a pipeline stage's) -> ``(h_BTD, position_bias)``.
        ``cache`` (generation): ``x_BTD`` holds the tokens after ``cache.length`` cached ones
        (``document_ids_BT`` covers all of them); slots ``{cache_prefix}layers.{i}.*``."""
        past = 0 if cache is None else cache.length
        self_mask = attention_mask(document_ids_BT, causal=self.causal, past=past)
        if self_mask is None and cache is not None and num_tokens > 1:
            self_mask = causal_mask(num_tokens, past=past, device=x_BTD.device)
        new_ids_BT = None if document_ids_BT is None else document_ids_BT[:, past:]
        cross_bias = None
        if memory_BSD is not None:
            cross_bias = cross_attention_mask(new_ids_BT, memory_document_ids_BS, num_tokens)
        token_mask_BT = None if new_ids_BT is None else new_ids_BT >= 0
        for key, layer in self.layers.items():
            slots = None
            if cache is not None:
                name = f"{cache_prefix}layers.{key}"
                slots = (
                    cache.slot(f"{name}.attention"),
                    cache.slot(f"{name}.cross_attention", static=True),
                )
            x_BTD, position_bias = layer(
                x_BTD,
                self_mask=self_mask,
                position_bias=position_bias,
                num_tokens=num_tokens,
                is_causal=self.causal,
                memory_BSD=memory_BSD,
                cross_bias=cross_bias,
                token_mask_BT=token_mask_BT,
                past=past,
                cache=slots,
            )
        return x_BTD, position_bias

    def finish(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The last block's output -> the stack's output (final norm, dropout)."""
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        return self.final_dropout(x_BTD)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        document_ids_BT: torch.Tensor | None,
        num_tokens: int,
        memory_BSD: torch.Tensor | None = None,
        memory_document_ids_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded tokens ``x_BTD`` (before positions) of a ``num_tokens``-long sequence (under
        sequence parallel a rank's ``x_BTD`` is a chunk of it) -> hidden states ``h_BTD``."""
        x_BTD = self.embed(x_BTD, document_ids_BT=document_ids_BT, num_tokens=num_tokens)
        x_BTD, _ = self.run_blocks(
            x_BTD,
            document_ids_BT=document_ids_BT,
            num_tokens=num_tokens,
            memory_BSD=memory_BSD,
            memory_document_ids_BS=memory_document_ids_BS,
        )
        return self.finish(x_BTD)


def cross_attention_mask(
    target_ids_BT: torch.Tensor | None, source_ids_BS: torch.Tensor | None, num_targets: int
) -> torch.Tensor | None:
    """Boolean ``mask_B1TS``: a target token sees the real source tokens of its own document
    (any real source token without target ids); rows that would see nothing (target padding)
    see every source token, so that no softmax row is empty. None without source ids."""
    if source_ids_BS is None:
        return None
    real_B1S = (source_ids_BS >= 0)[:, None, :]
    if target_ids_BT is None:
        mask_BTS = real_B1S.expand(-1, num_targets, -1)
    else:
        mask_BTS = (target_ids_BT[:, :, None] == source_ids_BS[:, None, :]) & real_B1S
    mask_BTS = mask_BTS | ~mask_BTS.any(dim=-1, keepdim=True)
    return mask_BTS[:, None]


class EncoderDecoder(nn.Module):
    """Two stacks over one shared token embedding and an output projection (see the module
    docstring). Build with ``build_model``; ``init_weights(seed)`` after ``to_empty()``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, dim)
        self.embed_scale = math.sqrt(dim) if cfg.scale_embeddings else 1.0
        self.output_scale = dim**-0.5 if cfg.scale_output else 1.0
        # (stack of its blocks, first, last) once pruned to a pipeline stage
        self.stage: tuple[str, bool, bool] | None = None
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        if cfg.tie_embeddings:
            # As in ``Transformer``: the tied head reads tok_embeddings.weight at call time.
            self.output: nn.Linear | None = None
            self.tied_output: TiedOutput | None = TiedOutput()
            self.output_bias: nn.Parameter | None = (
                nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.final_logits_bias else None
            )
        else:
            self.output = nn.Linear(dim, cfg.vocab_size, bias=cfg.final_logits_bias)
            self.tied_output = None
            self.output_bias = None

    def _embed(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.tok_embeddings(tokens_BT)
        return x_BTD * self.embed_scale if self.embed_scale != 1.0 else x_BTD

    def encode(
        self, tokens_BS: torch.Tensor, *, document_ids_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Source ids ``tokens_BS`` -> encoder output ``memory_BSD``."""
        return self.encoder(
            self._embed(tokens_BS), document_ids_BT=document_ids_BS, num_tokens=tokens_BS.shape[1]
        )

    def decode(
        self,
        decoder_tokens_BT: torch.Tensor,
        *,
        memory_BSD: torch.Tensor,
        document_ids_BS: torch.Tensor | None = None,
        decoder_document_ids_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Decoder ids + encoder output -> the hidden states ``h_BTD`` that enter the output
        projection (after the final norm; times hidden_size^-0.5 with ``model.scale_output``).

        ``cache`` (generation, ``pretrain.models.kv_cache``): ``decoder_tokens_BT`` are the new
        tokens after the ``cache.length`` cached ones (``decoder_document_ids_BT``, if given,
        covers all of them); self-attention keys/values grow, cross-attention ones are the
        memory's from the first call; the result equals a forward over the whole prefix."""
        num_tokens = decoder_tokens_BT.shape[1]
        past = 0 if cache is None else cache.length
        x_BTD = self.decoder.embed(
            self._embed(decoder_tokens_BT),
            document_ids_BT=decoder_document_ids_BT,
            num_tokens=num_tokens,
            past=past,
        )
        x_BTD, _ = self.decoder.run_blocks(
            x_BTD,
            document_ids_BT=decoder_document_ids_BT,
            num_tokens=num_tokens,
            memory_BSD=memory_BSD,
            memory_document_ids_BS=document_ids_BS,
            cache=cache,
            cache_prefix="decoder.",
        )
        if cache is not None:
            cache.length += num_tokens
        return self._scale_output(self.decoder.finish(x_BTD))

    def _scale_output(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        return hidden_BTD * self.output_scale if self.output_scale != 1.0 else hidden_BTD

    def output_projection(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(weight_VD, bias_V)`` of the output projection (tied: the shared embedding)."""
        if self.output is not None:
            return self.output.weight, self.output.bias
        if self.tied_output is not None and self.tok_embeddings is not None:
            return self.tok_embeddings.weight, self.output_bias
        return None, None

    def project(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Logits ``logits_BTV`` from decoder hidden states, through the output head module
        (``output`` or ``tied_output``), so that a parallel style on it sees them."""
        if self.output is not None:
            return self.output(hidden_BTD)
        return self.tied_output(hidden_BTD, self.tok_embeddings.weight, self.output_bias)

    def forward(
        self,
        *inputs: torch.Tensor,
        decoder_tokens_BT: torch.Tensor | None = None,
        document_ids_BS: torch.Tensor | None = None,
        decoder_document_ids_BT: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``model(tokens_BS, decoder_tokens_BT)`` (or ``decoder_tokens_BT=`` as a keyword) ->
        ``logits_BTV`` (``hidden_BTD`` with ``return_hidden``). Document ids: -1 marks padding;
        equal ids pair packed sources with their targets; None: no padding, one document per
        row. A pipeline stage (``prune_to_stage``) takes what the stage before it returned as
        ``inputs`` (see ``stage_forward``)."""
        if self.stage is not None:
            return self.stage_forward(
                *inputs,
                decoder_tokens_BT=decoder_tokens_BT,
                document_ids_BS=document_ids_BS,
                decoder_document_ids_BT=decoder_document_ids_BT,
            )
        tokens_BS, *rest = inputs
        if rest:
            (decoder_tokens_BT,) = rest
        memory_BSD = self.encode(tokens_BS, document_ids_BS=document_ids_BS)
        hidden_BTD = self.decode(
            decoder_tokens_BT,
            memory_BSD=memory_BSD,
            document_ids_BS=document_ids_BS,
            decoder_document_ids_BT=decoder_document_ids_BT,
        )
        if return_hidden:
            return hidden_BTD
        return self.project(hidden_BTD)

    # ----------------------------------------------------------------------------------------
    # pipeline stages

    def prune_to_stage(self, *, layer_keys: list[str], first: bool, last: bool) -> None:
        """Keep the blocks ``layer_keys`` (``encoder.{i}`` / ``decoder.{j}``, one stack per
        stage: ``pretrain.models.pipeline_stage_layers``); the first stage keeps the token
        embedding and both stacks' embedding parts (it embeds source and target), the stage
        with the encoder's last block its final norm, the last stage the decoder's final norm
        and the output head. Works on the meta device.

        Raises:
            ValueError: tied embeddings on a split model; keys of both stacks on one stage of
                several.
        """
        if self.cfg.tie_embeddings and not (first and last):
            raise ValueError(
                "model.tie_embeddings (True) cannot be split over pipeline stages; untie it"
            )
        stacks = {key.partition(".")[0] for key in layer_keys}
        if not (first and last) and len(stacks) != 1:
            raise ValueError(
                f"pipeline stage blocks ({layer_keys}) must be of one stack (encoder or decoder)"
            )
        for name in ("encoder", "decoder"):
            stack = getattr(self, name)
            keep = {key.partition(".")[2] for key in layer_keys if key.startswith(name + ".")}
            holds_end = str(len(stack.layers) - 1) in keep
            for key in list(stack.layers.keys()):
                if key not in keep:
                    del stack.layers[key]
            if not first:
                stack.pos_embeddings = None
                stack.embed_norm = None
            if not holds_end or (name == "decoder" and not last):
                stack.norm = None
                stack.ends = False
        if not first:
            self.tok_embeddings = None
        if not last:
            self.output = None
            self.tied_output = None
            self.output_bias = None
        self.stage = ("encoder" if "encoder" in stacks else "decoder", first, last)

    def stage_forward(
        self,
        *inputs: torch.Tensor,
        decoder_tokens_BT: torch.Tensor,
        document_ids_BS: torch.Tensor | None = None,
        decoder_document_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One pipeline stage. The first stage takes ``(tokens_BS,)`` and embeds source and
        target; an encoder stage returns ``(h_BSD, x_BTD[, bias_1HSS])`` (the target's
        embeddings carried through; the encoder's position bias while blocks of it remain),
        the encoder's last stage ``(memory_BSD, x_BTD)``; a decoder stage returns
        ``(memory_BSD, h_BTD[, bias_1HTT])``, the last one the logits. Ids and masks come to
        every stage as keyword arguments (integer activations between stages would be
        garbage during torch's shape inference). Outputs are made contiguous and received
        activations get contiguous gradients (``ContiguousGrad``: the memory's gradient is
        strided): gloo sends and receives only contiguous tensors."""
        kind, first, _ = self.stage
        target_len = decoder_tokens_BT.shape[1]
        if first:
            (tokens_BS,) = inputs
            source_len = tokens_BS.shape[1]
            h_BSD = self.encoder.embed(
                self._embed(tokens_BS), document_ids_BT=document_ids_BS, num_tokens=source_len
            )
            x_BTD = self.decoder.embed(
                self._embed(decoder_tokens_BT),
                document_ids_BT=decoder_document_ids_BT,
                num_tokens=target_len,
            )
            carried = (h_BSD, x_BTD)
        else:
            carried = tuple(ContiguousGrad.apply(t) for t in inputs)
            source_len = carried[0].shape[1]
        if kind == "encoder":
            h_BSD, x_BTD, *bias = carried
            h_BSD, bias_1HSS = self.encoder.run_blocks(
                h_BSD,
                document_ids_BT=document_ids_BS,
                num_tokens=source_len,
                position_bias=bias[0] if bias else None,
            )
            if self.encoder.ends:
                return _contiguous(self.encoder.finish(h_BSD), x_BTD)
            return _contiguous(h_BSD, x_BTD, bias_1HSS)
        memory_BSD, h_BTD, *bias = carried
        h_BTD, bias_1HTT = self.decoder.run_blocks(
            h_BTD,
            document_ids_BT=decoder_document_ids_BT,
            num_tokens=target_len,
            position_bias=bias[0] if bias else None,
            memory_BSD=memory_BSD,
            memory_document_ids_BS=document_ids_BS,
        )
        if self.decoder.ends:
            return self.project(self._scale_output(self.decoder.finish(h_BTD)))
        return _contiguous(memory_BSD, h_BTD, bias_1HTT)

    # ----------------------------------------------------------------------------------------
    # MoE reporting (same contract as ``Transformer``)

    def moe_layers(self) -> dict[str, MoE]:
        """``{"encoder.layers.{i}.moe" | "decoder.layers.{i}.moe": MoE}``."""
        out = {}
        for stack in ("encoder", "decoder"):
            for key, layer in getattr(self, stack).layers.items():
                if layer.moe is not None:
                    out[f"{stack}.layers.{key}.moe"] = layer.moe
        return out

    def moe_metrics(self) -> dict[str, MoEMetrics]:
        """Each MoE layer's ``MoEMetrics`` from the last forward."""
        return {n: m.metrics for n, m in self.moe_layers().items() if m.metrics is not None}

    def moe_stats(self, reset: bool = True) -> dict[str, MoEStats]:
        """Each MoE layer's ``MoEStats`` since the last reset (layers without one left out)."""
        out = {}
        for name, moe in self.moe_layers().items():
            stats = moe.stats(reset=reset)
            if stats is not None:
                out[name] = stats
        return out

    def set_moe_aux_loss_scale(self, scale: float) -> None:
        """Scale of the auxiliary-loss gradient in every MoE layer."""
        for moe in self.moe_layers().values():
            moe.aux_loss_scale = scale

    # ----------------------------------------------------------------------------------------
    # initialisation

    def _std(self, name: str) -> float:
        """T5's scaled normal init when attention is unscaled (``scale_attention=false``),
        else ``model.init_std`` everywhere."""
        cfg = self.cfg
        if cfg.scale_attention:
            return cfg.init_std
        dim, inner = cfg.hidden_size, cfg.num_heads * cfg.resolved_head_dim
        if name.endswith("wq.weight"):
            return (dim * cfg.resolved_head_dim) ** -0.5
        if name.endswith("attention.wo.weight"):
            return inner**-0.5
        if name.endswith("feed_forward.w2.weight"):
            return cfg.ffn_hidden_size**-0.5
        if name.endswith("experts.w2"):
            return cfg.expert_ffn_width**-0.5
        if name == "tok_embeddings.weight":
            return 1.0
        return dim**-0.5

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter in place: norm weights 1, biases 0, other weights normal
        (``_std``); with an int ``seed`` each parameter from its own CPU generator seeded by
        its canonical name (``transformer.param_seed``), so values do not depend on the device,
        on which parameters a pipeline stage holds or on sharding (a DTensor parameter gets the
        local part of the same full tensor). None: the global RNG of each parameter's device."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
                is_norm = isinstance(module, (nn.LayerNorm, RMSNorm))
                if is_norm and param_name == "weight":
                    param.fill_(1.0)
                elif param_name in ("bias", "b1", "b2", "output_bias"):
                    param.zero_()
                elif seed is None:
                    param.normal_(0.0, self._std(name))
                else:
                    gen = torch.Generator(device="cpu").manual_seed(param_seed(seed, name=name))
                    full = torch.empty(param.shape, dtype=torch.float32)
                    full.normal_(0.0, self._std(name), generator=gen)
                    full = full.to(device=param.device, dtype=param.dtype)
                    if isinstance(param, DTensor):
                        local = distribute_tensor(
                            full, param.device_mesh, param.placements, src_data_rank=None
                        ).to_local()
                        param.to_local().copy_(local)
                    else:
                        param.copy_(full)
