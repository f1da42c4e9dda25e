"""The Transformer stack shared by the decoder and encoder families.

What to call: ``model(inputs, ...)`` -> logits (``forward``), ``model(inputs,
return_hidden=True)`` -> the hidden states entering the output projection, and
``model.output_projection()`` -> its ``(weight_VD, bias_V)`` for the chunked losses.

Submodule names (what TP plans and pipeline splits address):
    tok_embeddings, pos_embeddings (learned positions), lang_embeddings (XLM), type_embeddings
    (BERT segments), embed_norm (post-norm only), layers.{i} (``Block``s in an
    ``nn.ModuleDict``), norm (pre-norm only), head (encoder MLM transform), pooler and
    pair_classifier (encoder ``model.pair_head``), span_boundary (encoder SpanBERT head),
    sentence_pool (encoder, no parameters: the contrastive objectives' mean of the states),
    generator and discriminator (encoder ELECTRA, ``model.generator_fraction``), and
    the output head, a module that computes the logits: output (untied: an ``nn.Linear``,
    parameters ``output.weight`` / ``output.bias``) or tied_output (tied: a ``TiedOutput``
    without parameters that applies ``tok_embeddings.weight`` and the model's own
    ``output_bias``). The logits always come from calling that module, so a parallel style on it
    (vocabulary-parallel output) sees them.

Pipeline stages are made by deleting what a stage does not own (set the attribute to None, delete
entries of ``layers``): a stage without ``tok_embeddings`` takes hidden states ``x_BTD`` as its
input, and a stage without an output projection returns hidden states.

Shape legend:
    B batch, T sequence, D model width, V vocabulary, Hd head width.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.blocks import (
    AttentionInputs,
    Block,
    RMSNorm,
    attention_mask,
    build_norm,
    causal_mask,
    document_block_mask,
    document_positions,
    rope_cos_sin,
)
from pretrain.models.config import ModelConfig
from pretrain.models.kv_cache import KVCache
from pretrain.models.moe import MoE, MoEMetrics, MoEStats

# Wrapper segments that parallel/ may add to parameter names (activation checkpointing,
# torch.compile, FSDP); seeds are taken from the name without them.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def is_moe_layer(cfg: ModelConfig, *, layer: int) -> bool:
    """Whether layer ``layer`` (0-based) has an MoE feed-forward: every ``moe.every``-th layer,
    i.e. layers every-1, 2*every-1, ... (Qwen3-MoE's ``decoder_sparse_step`` convention)."""
    return cfg.moe.num_experts > 0 and (layer + 1) % cfg.moe.every == 0


def canonical_name(name: str) -> str:
    """``name`` without the wrapper segments parallel/ may insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def param_seed(seed: int, *, name: str) -> int:
    """Seed of one parameter: the run seed mixed with its canonical name, so that a parameter's
    initial value does not depend on which other parameters a pipeline stage holds."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(canonical_name(name).encode())) % (2**63)


def _rows_of_logits(logits_BTV: torch.Tensor, at_BT: torch.Tensor) -> torch.Tensor:
    """The whole-vocabulary rows ``[M, V]`` of ``logits_BTV`` at the True positions of
    ``at_BT``; a vocabulary-sharded DTensor (tensor parallel) is gathered for those rows only."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits_BTV, DTensor):
        return logits_BTV[at_BT]
    rows_MV = logits_BTV.to_local()[at_BT]
    return DTensor.from_local(rows_MV, logits_BTV.device_mesh, [Shard(1)]).full_tensor()


class TiedOutput(nn.Module):
    """The tied output head: ``forward(x_BTD, weight_VD, bias_V) -> logits_BTV`` with the
    embedding table as ``weight_VD``. No parameters of its own: the table stays one parameter
    (``tok_embeddings.weight``; a shared Parameter would come apart in ``to_empty()``) and the
    bias keeps its name ``output_bias``. Positional arguments, so that a parallel style's input
    hook sees them all."""

    def forward(
        self, x_BTD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x_BTD @ weight_VD^T (+ bias_V)``."""
        return F.linear(x_BTD, weight_VD, bias_V)


class Transformer(nn.Module):
    """Embeddings, a stack of ``Block``s, a final norm and an output projection.

    Subclasses set ``causal`` and may add an MLM ``head``. Use ``build_model`` to construct.
    """

    causal: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, dim)
        self.pos_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.max_seq_len, dim) if cfg.position == "learned" else None
        )
        self.lang_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.num_languages, dim) if cfg.num_languages > 0 else None
        )
        self.type_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.type_vocab_size, dim) if cfg.type_vocab_size > 0 else None
        )
        post_norm = cfg.norm_position == "post"
        self.embed_norm: nn.Module | None = build_norm(cfg) if post_norm else None
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, use_moe=is_moe_layer(cfg, layer=i)) for i in range(cfg.num_layers)}
        )
        self.norm: nn.Module | None = None if post_norm else build_norm(cfg)
        self.head: nn.Module | None = None
        # sentence-level head (encoder model.pair_head): set by the family
        self.pooler: nn.Module | None = None
        self.pair_classifier: nn.Linear | None = None
        self.span_boundary: nn.Module | None = None  # encoder model.span_boundary_positions
        # mean of the final states for contrastive objectives (no parameters)
        self.sentence_pool: nn.Module | None = None
        # ELECTRA (encoder model.generator_fraction): the generator beside the stack and the
        # discriminator's head on it; set by the family
        self.generator: nn.Module | None = None
        self.discriminator: nn.Module | None = None
        if cfg.tie_embeddings:
            # Tied: the head reads tok_embeddings.weight at call time (a shared Parameter would
            # come apart in to_empty()); only a bias of its own remains.
            self.output: nn.Linear | None = None
            self.tied_output: TiedOutput | None = TiedOutput()
            self.output_bias: nn.Parameter | None = (
                nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.bias else None
            )
        else:
            self.output = nn.Linear(dim, cfg.vocab_size, bias=cfg.bias)
            self.tied_output = None
            self.output_bias = None

    # ----------------------------------------------------------------------------------------
    # forward

    def embed(
        self,
        tokens_BT: torch.Tensor,
        *,
        position_ids_BT: torch.Tensor,
        lang_ids_BT: torch.Tensor | None = None,
        token_type_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token (+ learned position, + language, + segment) embeddings, then ``embed_norm``
        if post-norm. Without ``token_type_ids_BT`` a model with segment embeddings adds
        segment 0's row everywhere (BERT's default)."""
        x_BTD = self.tok_embeddings(tokens_BT)
        if self.pos_embeddings is not None:
            x_BTD = x_BTD + self.pos_embeddings(position_ids_BT)
        if self.lang_embeddings is not None and lang_ids_BT is not None:
            x_BTD = x_BTD + self.lang_embeddings(lang_ids_BT)
        if self.type_embeddings is not None:
            if token_type_ids_BT is None:
                token_type_ids_BT = torch.zeros_like(tokens_BT)
            x_BTD = x_BTD + self.type_embeddings(token_type_ids_BT)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)
        return self.embed_dropout(x_BTD)

    def output_projection(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(weight_VD, bias_V)`` of the output projection; weight None on stages without one."""
        if self.output is not None:
            return self.output.weight, self.output.bias
        if self.tied_output is not None and self.tok_embeddings is not None:
            return self.tok_embeddings.weight, self.output_bias
        return None, None

    def project(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """Logits from the hidden states through the output head (None: this stage has none)."""
        if self.output is not None:
            return self.output(x_BTD)
        if self.tied_output is not None and self.tok_embeddings is not None:
            return self.tied_output(x_BTD, self.tok_embeddings.weight, self.output_bias)
        return None

    def _uses_flex_attention(self, device: torch.device) -> bool:
        """Whether document masks go to FlexAttention (``model.attention``)."""
        mode = self.cfg.attention
        return mode == "flex" or (
            mode == "auto" and device.type == "cuda" and self.cfg.dropout == 0.0
        )

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        position_ids_BT: torch.Tensor | None = None,
        document_ids_BT: torch.Tensor | None = None,
        lang_ids_BT: torch.Tensor | None = None,
        token_type_ids_BT: torch.Tensor | None = None,
        return_hidden: bool = False,
        return_pair_logits: bool = False,
        span_targets_N4: torch.Tensor | None = None,
        rtd_labels_BT: torch.Tensor | None = None,
        rtd_sample: Callable[[torch.Tensor], torch.Tensor] | None = None,
        return_discriminator: bool = False,
        return_pooled_BT: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run the stack.

        Args:
            inputs: token ids ``tokens_BT`` (int64), or hidden states ``x_BTD`` on a pipeline
                stage without ``tok_embeddings``.
            position_ids_BT: positions for RoPE / learned positions; default: positions within
                each document when ``document_ids_BT`` is given, else 0..T-1.
            document_ids_BT: per-token document ids of packed sequences; attention stays inside
                a document (contiguous runs of one id). Padding has id -1: MoE layers do not
                route it (``document_ids_BT >= 0`` is their token mask; without document ids
                every token is routed).
            lang_ids_BT: per-token language ids for the XLM language embeddings (ignored
                without ``model.num_languages``) and the MoE per-language load
                (``track_moe_languages``).
            token_type_ids_BT: BERT segment ids (``model.type_vocab_size``).
            return_hidden: return the hidden states that enter the output projection (after the
                final norm / MLM head), for the chunked losses of ``pretrain.objectives``.
            return_pair_logits: also return the sentence-pair logits ``[B, 2]`` of
                ``model.pair_head`` (the pooled first position, before the MLM head).
            span_targets_N4: SpanBERT's span-boundary targets, ``[N, 4]`` (row, left,
                right, offset; ``model.span_boundary_positions``): their outputs (hidden
                states or logits, as the main ones) follow the main outputs along one
                sequence, ``[1, B * T + N, ...]``.
            rtd_labels_BT: ELECTRA (``model.generator_fraction``): the original ids at the
                masked positions of ``inputs``, negative elsewhere. The generator's outputs
                (hidden states or logits, as without it) come first; ``rtd_sample`` turns its
                logits ``[M, V]`` at the masked positions (no grad, the whole vocabulary even
                when tp shards it) into sampled ids ``[M]``; the stack (the discriminator)
                then reads ``inputs`` with those ids at the masked positions, and the second
                output is ``(logits_BT, replaced_BT)``: the discriminator's logit per
                position and whether its token differs from the original.
            return_discriminator: ELECTRA: the discriminator's logits ``[B, T]`` of
                ``inputs`` (no generator pass).
            return_pooled_BT: also return the mean of the final states (after the final
                norm, before the MLM head) over the True positions of each row, ``[B, D]``
                (the contrastive objectives' sentence embeddings).
            cache: generation (causal models): ``inputs`` are the new tokens after the
                ``cache.length`` cached ones, ``document_ids_BT`` (if given) covers all of
                them; the cache grows by the new tokens (``pretrain.models.kv_cache``).

        Returns:
            ``logits_BTV``, or ``hidden_BTD`` with ``return_hidden`` or on a stage without an
            output projection; with ``return_pair_logits`` the pair ``(that, logits_B2)``
            (``return_pooled_BT``: ``(that, pooled_BD)``); an
            ELECTRA model: the generator's outputs (``rtd_labels_BT``: and the
            discriminator's pair), or with ``return_discriminator`` its logits.
        """
        batch, seq = inputs.shape[:2]
        if cache is not None and not self.causal:
            raise ValueError("a key/value cache needs a causal model (the decoder family)")
        past = 0 if cache is None else cache.length
        if position_ids_BT is None:
            if document_ids_BT is not None:
                position_ids_BT = document_positions(document_ids_BT)[:, past:]
            else:
                position_ids_BT = torch.arange(past, past + seq, device=inputs.device).expand(
                    batch, seq
                )
        if return_pair_logits and self.pair_classifier is None:
            raise ValueError("return_pair_logits needs model.pair_head (an encoder's pooler)")
        embed_kwargs = {
            "position_ids_BT": position_ids_BT,
            "lang_ids_BT": lang_ids_BT,
            "token_type_ids_BT": token_type_ids_BT,
        }
        x_BTD = self.embed(inputs, **embed_kwargs) if self.tok_embeddings is not None else inputs
        rope = None
        if self.cfg.position == "rope":
            rope = rope_cos_sin(
                position_ids_BT,
                head_dim=self.cfg.resolved_head_dim,
                theta=self.cfg.rope_theta,
                dtype=x_BTD.dtype,
            )
        mask_B1TS = block_mask = None
        if cache is not None:
            # The new tokens' rows of the whole (cached + new) causal / document mask.
            if document_ids_BT is not None:
                mask_B1TS = attention_mask(document_ids_BT, causal=True, past=past)
            elif seq > 1:
                mask_B1TS = causal_mask(seq, past=past, device=x_BTD.device)
        elif document_ids_BT is not None:
            if self._uses_flex_attention(document_ids_BT.device):
                block_mask = document_block_mask(document_ids_BT, causal=self.causal)
            else:
                mask_B1TS = attention_mask(document_ids_BT, causal=self.causal)
        block_kwargs = {
            "inputs": AttentionInputs(
                rope=rope,
                mask_B1TS=mask_B1TS,
                is_causal=self.causal and cache is None,
                block_mask=block_mask,
            ),
            "token_mask_BT": None if document_ids_BT is None else document_ids_BT[:, past:] >= 0,
            "lang_ids_BT": lang_ids_BT,
        }
        if self.generator is not None:
            if return_discriminator:
                return self.discriminator(self._stack(x_BTD, block_kwargs))
            return self._electra(
                x_BTD,
                inputs,
                block_kwargs,
                embed_kwargs,
                rtd_labels_BT=rtd_labels_BT,
                rtd_sample=rtd_sample,
                return_hidden=return_hidden,
            )
        if return_discriminator or rtd_labels_BT is not None:
            raise ValueError("return_discriminator and rtd_labels_BT need model.generator_fraction")
        for key, layer in self.layers.items():
            x_BTD = layer(
                x_BTD,
                **block_kwargs,
                attention_cache=None if cache is None else cache.slot(f"layers.{key}.attention"),
            )
        if cache is not None:
            cache.length += seq
        if self.norm is not None:
            x_BTD = self.norm(x_BTD)
        second = None  # the pair logits [B, 2] or the pooled states [B, D]
        if return_pair_logits:
            second = self.pair_classifier(self.pooler(x_BTD))
        elif return_pooled_BT is not None:
            if self.sentence_pool is None:
                raise ValueError("return_pooled_BT needs an encoder (its sentence_pool)")
            second = self.sentence_pool(x_BTD, real_BT=return_pooled_BT)
        boundary_1ND = None
        if span_targets_N4 is not None:
            if self.span_boundary is None:
                raise ValueError("span_targets_N4 needs model.span_boundary_positions > 0")
            boundary_1ND = self.span_boundary(x_BTD, span_targets_N4=span_targets_N4)[None]
        if self.head is not None:
            x_BTD = self.head(x_BTD)
        out = x_BTD if return_hidden else self.project(x_BTD)
        out = x_BTD if out is None else out
        if boundary_1ND is not None:  # the span-boundary outputs after the main ones
            extra = boundary_1ND if return_hidden else self.project(boundary_1ND)
            out = torch.cat([out.reshape(1, -1, out.shape[-1]), extra], dim=1)
        return out if second is None else (out, second)

    def _stack(self, x_BTD: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
        """The blocks and the final norm over embedded inputs (no cache)."""
        for layer in self.layers.values():
            x_BTD = layer(x_BTD, **block_kwargs)
        return x_BTD if self.norm is None else self.norm(x_BTD)

    def _electra(
        self,
        x_BTD: torch.Tensor,
        tokens_BT: torch.Tensor,
        block_kwargs: dict[str, Any],
        embed_kwargs: dict[str, Any],
        *,
        rtd_labels_BT: torch.Tensor | None,
        rtd_sample: Callable[[torch.Tensor], torch.Tensor] | None,
        return_hidden: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """ELECTRA's two passes (``forward``'s ``rtd_labels_BT``): the generator over the
        embedded ``x_BTD``, then the discriminator over the corrupted tokens."""
        gen_BTD = self.generator(x_BTD, **block_kwargs)
        gen_out = gen_BTD if return_hidden else self.project(gen_BTD)
        if rtd_labels_BT is None:
            return gen_out
        if rtd_sample is None:
            raise ValueError("rtd_labels_BT needs rtd_sample (the generator's sampler)")
        at_BT = rtd_labels_BT >= 0
        with torch.no_grad():
            if return_hidden:
                weight_VD, bias_V = self.output_projection()
                logits_MV = F.linear(gen_BTD[at_BT], weight_VD, bias_V)
            else:
                logits_MV = _rows_of_logits(gen_out, at_BT)
            sampled_M = rtd_sample(logits_MV.float())
        corrupted_BT = tokens_BT.clone()
        corrupted_BT[at_BT] = sampled_M.to(corrupted_BT.dtype)
        original_BT = torch.where(at_BT, rtd_labels_BT.to(tokens_BT.dtype), tokens_BT)
        replaced_BT = corrupted_BT != original_BT
        hidden_BTD = self._stack(self.embed(corrupted_BT, **embed_kwargs), block_kwargs)
        return gen_out, (self.discriminator(hidden_BTD), replaced_BT)

    # ----------------------------------------------------------------------------------------
    # MoE reporting

    def moe_layers(self) -> dict[str, MoE]:
        """``{"layers.{i}.moe": MoE}`` for the MoE layers this (possibly pruned) model holds."""
        return {
            f"layers.{key}.moe": layer.moe
            for key, layer in self.layers.items()
            if layer.moe is not None
        }

    def moe_metrics(self) -> dict[str, MoEMetrics]:
        """Each MoE layer's ``MoEMetrics`` from the last forward (detached; no host sync)."""
        return {
            name: moe.metrics for name, moe in self.moe_layers().items() if moe.metrics is not None
        }

    def moe_stats(self, reset: bool = True) -> dict[str, MoEStats]:
        """Each MoE layer's ``MoEStats`` summed over the training forwards (every micro-batch)
        since the last reset, keyed ``layers.{i}.moe`` (global layer index: pipeline stages give
        disjoint keys); layers without a training forward since are left out. Detached device
        tensors, no host sync. ``reset`` starts new sums."""
        out = {}
        for name, moe in self.moe_layers().items():
            stats = moe.stats(reset=reset)
            if stats is not None:
                out[name] = stats
        return out

    def track_moe_languages(self, num_languages: int) -> None:
        """Keep routed assignments per language x expert (``MoEStats.load_by_lang_LE``, L =
        ``num_languages``) from the ``lang_ids_BT`` given to forward; 0 stops it.

        Raises:
            ValueError: ``num_languages`` < 0.
        """
        if num_languages < 0:
            raise ValueError(f"num_languages ({num_languages}) must be >= 0")
        for moe in self.moe_layers().values():
            moe.num_tracked_languages = num_languages

    def set_moe_aux_loss_scale(self, scale: float) -> None:
        """Scale of the auxiliary-loss gradient in every MoE layer (match the main loss's)."""
        for moe in self.moe_layers().values():
            moe.aux_loss_scale = scale

    # ----------------------------------------------------------------------------------------
    # initialisation

    def _init_rule(self, module: nn.Module, param_name: str) -> str:
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            return "ones" if param_name == "weight" else "zeros"
        if param_name in ("bias", "b1", "b2", "output_bias"):
            return "zeros"
        return "normal"

    def _zero_rows(self, name: str) -> int | None:
        # Reference-family detail: BERT/XLM-R start the padding row of the embedding at zero.
        if (
            self.cfg.family == "encoder"
            and self.cfg.pad_token_id is not None
            and canonical_name(name) == "tok_embeddings.weight"
        ):
            return self.cfg.pad_token_id
        return None

    @torch.no_grad()
    def init_weights(self, seed_or_generator: int | torch.Generator | None = None) -> None:
        """Initialise every parameter in place, as the reference family does: weights and
        embeddings ~ N(0, model.init_std), biases 0, norm weights 1 (Llama; XLM-R/BERT with
        init_std 0.02 and a zero padding row). Works after ``to_empty()``; the model holds no
        buffers that need filling (RoPE tables are computed on the fly).

        Args:
            seed_or_generator:
                int: each parameter is drawn on the CPU from its own generator seeded with
                    ``param_seed(seed, name=name)``; values do not depend on the device, on which
                    other parameters are present (pipeline stages) or on sharding (DTensor
                    parameters get the local part of the same full tensor).
                torch.Generator: parameters drawn in ``named_parameters`` order from it.
                None: the global RNG of each parameter's device (DTensor's RNG tracker).
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        std = self.cfg.init_std
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                rule = self._init_rule(module, param_name)
                zero_row = self._zero_rows(name)
                if rule == "ones":
                    param.fill_(1.0)
                elif rule == "zeros":
                    param.zero_()
                elif isinstance(seed_or_generator, int):
                    gen = torch.Generator(device="cpu").manual_seed(
                        param_seed(seed_or_generator, name=name)
                    )
                    full = torch.empty(param.shape, dtype=torch.float32)
                    full.normal_(0.0, std, generator=gen)
                    if zero_row is not None:
                        full[zero_row] = 0.0
                    full = full.to(device=param.device, dtype=param.dtype)
                    if isinstance(param, DTensor):
                        local = distribute_tensor(
                            full, param.device_mesh, param.placements, src_data_rank=None
                        ).to_local()
                        param.to_local().copy_(local)
                    else:
                        param.copy_(full)
                else:
                    param.normal_(0.0, std, generator=seed_or_generator)
                    if zero_row is not None and not isinstance(param, DTensor):
                        param[zero_row] = 0.0
