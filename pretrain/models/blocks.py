"""Transformer building blocks shared by the decoder and encoder families.

What to call: :class:`Block` (attention + feed-forward, pre- or post-norm), ``build_norm``,
``rope_cos_sin`` / ``apply_rope``, ``attention_mask`` / ``document_block_mask`` (document ids ->
SDPA mask or FlexAttention block mask; -1 = padding, never attended to), ``document_positions``.

Plain ``nn.Module``s with no parallelism inside: ``parallel/`` shards them afterwards by submodule
path (see ``pretrain.models.parallel_plan``). Attention reshapes with ``view(B, T, -1, head_dim)``
so that it runs unchanged on tensor-parallel shards holding only the local heads.

Shape legend:
    B batch, T sequence (queries), S sequence (keys), D model width, H query heads,
    K key/value heads, Hd head width, F feed-forward width, P rotary pairs (Hd // 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from pretrain.models.config import ModelConfig
from pretrain.models.kv_cache import LayerKV
from pretrain.models.precision import autocast_operands


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 (as Llama/Mixtral/Qwen3 do).

    Args:
        dim: width of the normalised last dim.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x_...D -> y_...D`` in the input dtype."""
        x_f32 = x.float()
        y = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(cfg: ModelConfig, *, dim: int | None = None) -> nn.Module:
    """The norm named by ``cfg.norm`` over ``dim`` (default ``cfg.hidden_size``)."""
    dim = cfg.hidden_size if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(
    position_ids_BT: torch.Tensor, *, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for the half-split ("rotate_half") layout used by Hugging Face Llama.

    Computed from the position ids on the fly: nothing to materialise after ``to_empty()`` and
    per-document positions come for free.

    Returns:
        ``(cos_BTHd, sin_BTHd)`` in ``dtype``.
    """
    inv_freq_P = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids_BT.device).float()
            / head_dim
        )
    )
    freqs_BTP = position_ids_BT[..., None].float() * inv_freq_P
    emb_BTHd = torch.cat((freqs_BTP, freqs_BTP), dim=-1)
    return emb_BTHd.cos().to(dtype), emb_BTHd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    x_BTHHd: torch.Tensor, *, cos_BTHd: torch.Tensor, sin_BTHd: torch.Tensor
) -> torch.Tensor:
    """Rotate queries or keys ``x_BTHHd`` (heads on dim 2) by the rotary tables."""
    cos = cos_BTHd[:, :, None, :]
    sin = sin_BTHd[:, :, None, :]
    return x_BTHHd * cos + _rotate_half(x_BTHHd) * sin


@dataclass
class AttentionInputs:
    """What every block's attention needs, computed once per forward by the model.

    Attributes:
        rope: ``(cos_BTHd, sin_BTHd)`` or None with learned positions.
        mask_B1TS: boolean mask (True = may attend) or None.
        is_causal: use SDPA's causal mask (only when neither mask is given).
        block_mask: FlexAttention's block-sparse document mask (``document_block_mask``),
            used instead of ``mask_B1TS`` when given.
    """

    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask_B1TS: torch.Tensor | None
    is_causal: bool
    block_mask: BlockMask | None = None


def document_positions(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document (documents are contiguous runs of one id).

    Computed without host syncs: the start of the current run is a running max of run starts.

    Returns:
        ``position_ids_BT`` (int64), 0 at every document start.
    """
    batch, seq = document_ids_BT.shape
    idx_BT = torch.arange(seq, device=document_ids_BT.device).expand(batch, seq)
    starts_BT = torch.zeros_like(idx_BT)
    starts_BT[:, 1:] = torch.where(
        document_ids_BT[:, 1:] != document_ids_BT[:, :-1], idx_BT[:, 1:], 0
    )
    return idx_BT - starts_BT.cummax(dim=1).values


def causal_mask(num_tokens: int, *, past: int = 0, device=None) -> torch.Tensor:
    """Boolean ``mask_11TS`` of ``num_tokens`` queries at positions ``past, past + 1, ...`` over
    the ``past + num_tokens`` keys (True = may attend: the key is not later than the query)."""
    queries_T1 = torch.arange(past, past + num_tokens, device=device)[:, None]
    return (torch.arange(past + num_tokens, device=device)[None, :] <= queries_T1)[None, None]


def attention_mask(
    document_ids_BT: torch.Tensor | None, *, causal: bool, past: int = 0
) -> torch.Tensor | None:
    """Boolean ``mask_B1TS`` letting a token attend only inside its own document (and, when
    ``causal``, only to earlier positions); None without document ids (SDPA then masks itself).
    ``past`` (generation with a key/value cache): the queries are the tokens after the first
    ``past`` of ``document_ids_BT``, the keys all of them (only those rows are built).

    Every token sees at least itself, so no softmax row is empty.
    """
    if document_ids_BT is None:
        return None
    mask_BTS = document_ids_BT[:, past:, None] == document_ids_BT[:, None, :]
    if causal:
        mask_BTS = (
            mask_BTS
            & causal_mask(
                document_ids_BT.shape[1] - past, past=past, device=document_ids_BT.device
            )[0]
        )
    return mask_BTS[:, None]


def document_block_mask(document_ids_BT: torch.Tensor, *, causal: bool) -> BlockMask:
    """:func:`attention_mask` as FlexAttention's block-sparse mask: tiles of 128 x 128 that lie
    outside every document (or above the diagonal) are skipped, whole tiles inside one run
    without a mask. Built once per forward and shared by the layers."""
    batch, seq = document_ids_BT.shape

    def same_document(b, h, q_idx, kv_idx):
        return document_ids_BT[b, q_idx] == document_ids_BT[b, kv_idx]

    def same_document_causal(b, h, q_idx, kv_idx):
        return same_document(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)

    mask_mod = same_document_causal if causal else same_document
    return create_block_mask(mask_mod, batch, None, seq, seq, device=document_ids_BT.device)


_compiled_flex_attention = None


def _flex_attention(q_BHTHd, k_BKSHd, v_BKSHd, *, block_mask: BlockMask, scale: float):
    """FlexAttention, compiled (its eager form is an unfused reference); inside an already
    compiled block it is traced as part of that graph. Operands follow autocast."""
    global _compiled_flex_attention
    q_BHTHd, k_BKSHd, v_BKSHd = autocast_operands(q_BHTHd, k_BKSHd, v_BKSHd)
    fn = flex_attention
    if not torch.compiler.is_compiling():
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex_attention
    return fn(
        q_BHTHd,
        k_BKSHd,
        v_BKSHd,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q_BHTHd.shape[1] != k_BKSHd.shape[1],
    )


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads, through SDPA.

    Submodules ``wq``, ``wk``, ``wv`` (column-parallel candidates) and ``wo`` (row-parallel);
    ``q_norm``/``k_norm`` (per-head RMSNorm over Hd, Qwen3 style) when ``cfg.qk_norm``.
    Cross-attention (the encoder-decoder family, not built yet) reuses this class with
    keys/values from ``kv_source``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        num_kv_heads = cfg.kv_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.hidden_size, num_kv_heads * self.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.hidden_size, num_kv_heads * self.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        inputs: AttentionInputs,
        kv_source_BSD: torch.Tensor | None = None,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """Attend from ``x_BTD`` to itself (or to ``kv_source_BSD``). Returns ``y_BTD``.

        ``cache`` (generation): ``x_BTD`` holds only the new tokens; their keys/values are
        appended to the cached ones and the queries attend to all of them (``inputs`` then
        describe the new tokens: their RoPE positions, a ``[B, 1, T, cached + T]`` mask)."""
        batch, seq, _ = x_BTD.shape
        kv_BSD = x_BTD if kv_source_BSD is None else kv_source_BSD
        q_BTHHd = self.wq(x_BTD).view(batch, seq, -1, self.head_dim)
        k_BSKHd = self.wk(kv_BSD).view(batch, kv_BSD.shape[1], -1, self.head_dim)
        v_BSKHd = self.wv(kv_BSD).view(batch, kv_BSD.shape[1], -1, self.head_dim)
        if self.q_norm is not None:
            q_BTHHd = self.q_norm(q_BTHHd)
            k_BSKHd = self.k_norm(k_BSKHd)
        if inputs.rope is not None and kv_source_BSD is None:
            cos, sin = inputs.rope
            q_BTHHd = apply_rope(q_BTHHd, cos_BTHd=cos, sin_BTHd=sin)
            k_BSKHd = apply_rope(k_BSKHd, cos_BTHd=cos, sin_BTHd=sin)
        q_BHTHd = q_BTHHd.transpose(1, 2)
        k_BKSHd = k_BSKHd.transpose(1, 2)
        v_BKSHd = v_BSKHd.transpose(1, 2)
        if cache is not None:
            k_BKSHd, v_BKSHd = cache.extend(k_BKSHd, v_BKSHd)
        scale = 1.0 / math.sqrt(self.head_dim)
        if inputs.block_mask is not None and kv_source_BSD is None:
            out_BHTHd = _flex_attention(
                q_BHTHd, k_BKSHd, v_BKSHd, block_mask=inputs.block_mask, scale=scale
            )
        else:
            out_BHTHd = F.scaled_dot_product_attention(
                q_BHTHd,
                k_BKSHd,
                v_BKSHd,
                attn_mask=inputs.mask_B1TS,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=inputs.is_causal and inputs.mask_B1TS is None,
                scale=scale,
                enable_gqa=q_BHTHd.shape[1] != k_BKSHd.shape[1],
            )
        return self.wo(out_BHTHd.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """Dense MLP: SwiGLU ``w2(silu(w1 x) * w3 x)`` or GELU ``w2(gelu(w1 x))``.

    ``w1``/``w3`` are column-parallel candidates, ``w2`` row-parallel.
    """

    def __init__(self, cfg: ModelConfig, *, hidden_size: int | None = None) -> None:
        super().__init__()
        ffn = cfg.ffn_hidden_size if hidden_size is None else hidden_size
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.hidden_size, ffn, bias=cfg.bias)
        self.w2 = nn.Linear(ffn, cfg.hidden_size, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.hidden_size, ffn, bias=cfg.bias) if self.swiglu else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> y_BTD``."""
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))
        return self.w2(F.gelu(self.w1(x_BTD)))


class Block(nn.Module):
    """One Transformer layer: self-attention, (later) cross-attention, feed-forward.

    Pre-norm: ``x + f(norm(x))``; post-norm (BERT/XLM-R): ``norm(x + f(x))``. The feed-forward is
    ``feed_forward`` (dense) or ``moe`` (``pretrain.models.moe.MoE``); exactly one is set.
    Submodule names: ``attention``, ``attention_norm``, ``feed_forward``/``moe``, ``ffn_norm``;
    ``cross_attention``/``cross_attention_norm`` are reserved for the encoder-decoder family and
    are None here.
    """

    def __init__(self, cfg: ModelConfig, *, use_moe: bool) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention = Attention(cfg)
        self.attention_norm = build_norm(cfg)
        self.cross_attention: Attention | None = None
        self.cross_attention_norm: nn.Module | None = None
        if use_moe:
            from pretrain.models.moe import MoE

            self.moe: nn.Module | None = MoE(cfg)
            self.feed_forward: FeedForward | None = None
        else:
            self.moe = None
            self.feed_forward = FeedForward(cfg)
        self.ffn_norm = build_norm(cfg)

    def _residual(self, x_BTD: torch.Tensor, norm: nn.Module, fn, *args, **kwargs) -> torch.Tensor:
        if self.pre_norm:
            return x_BTD + self.dropout(fn(norm(x_BTD), *args, **kwargs))
        return norm(x_BTD + self.dropout(fn(x_BTD, *args, **kwargs)))

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        inputs: AttentionInputs,
        memory_BSD: torch.Tensor | None = None,
        memory_inputs: AttentionInputs | None = None,
        token_mask_BT: torch.Tensor | None = None,
        lang_ids_BT: torch.Tensor | None = None,
        attention_cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """``x_BTD -> y_BTD``; ``memory_BSD`` feeds the cross-attention when there is one.

        ``token_mask_BT`` (bool, False at padding) and ``lang_ids_BT`` go to the MoE (padding is
        not routed; languages feed its statistics); a dense feed-forward ignores them.
        ``attention_cache``: the self-attention's generation cache (``Attention.forward``).
        """
        x_BTD = self._residual(
            x_BTD, self.attention_norm, self.attention, inputs=inputs, cache=attention_cache
        )
        if self.cross_attention is not None:
            assert memory_BSD is not None and memory_inputs is not None
            x_BTD = self._residual(
                x_BTD,
                self.cross_attention_norm,
                self.cross_attention,
                inputs=memory_inputs,
                kv_source_BSD=memory_BSD,
            )
        if self.moe is None:
            return self._residual(x_BTD, self.ffn_norm, self.feed_forward)
        return self._residual(
            x_BTD, self.ffn_norm, self.moe, token_mask_BT=token_mask_BT, lang_ids_BT=lang_ids_BT
        )
