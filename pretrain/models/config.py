"""Model configuration: the ``model`` section of a run config.

What to call: :class:`ModelConfig` / :class:`MoEConfig` (the ``model`` section),
``validate_model(cfg)`` (one-line ``ValueError`` naming key and rule), ``architecture_keys()``
(the keys that must match on resume, derived from field metadata).

The model owns its config (DESIGN.md: each package owns the dataclass of its part);
``pretrain.config`` composes it into the run tree. Field docstrings are the reference for
every ``model.*`` key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.config import check_choices

# Fields that fix a model's parameters and their meaning carry this in their metadata: a
# checkpoint resumes only into a model that agrees on every one (``architecture_keys``).
ARCHITECTURE = {"architecture": True}


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (``model.moe.*``). ``num_experts == 0`` means dense."""

    num_experts: int = field(default=0, metadata=ARCHITECTURE)
    """Experts per MoE layer; 0 disables MoE."""
    offset: int | None = field(default=None, metadata=ARCHITECTURE)
    """encoder_decoder only: MoE in the layers i with ``i % every == offset``; None: every - 1
    (the ``every`` rule). Switch Transformers: 1 (its ``i % step == 1``; 0 when every is 1)."""
    top_k: int = field(default=2, metadata=ARCHITECTURE)
    """Experts each token is routed to (Switch: 1, GShard: 2)."""
    router: Literal["switch", "gshard", "topk"] = field(default="gshard", metadata=ARCHITECTURE)
    """Router: switch (top-1, gate = softmax prob), gshard (top-2, normalized gates), topk."""
    every: int = field(default=1, metadata=ARCHITECTURE)
    """An MoE feed-forward in every k-th layer (layers k-1, 2k-1, ...); the rest are dense."""
    expert_ffn_hidden_size: int | None = field(default=None, metadata=ARCHITECTURE)
    """Hidden size of each expert's FFN; None takes model.ffn_hidden_size."""
    capacity_factor: float = 1.25
    """Expert capacity = capacity_factor * tokens * top_k / num_experts (ignored when dropless)."""
    eval_capacity_factor: float | None = None
    """capacity_factor in eval mode (Switch uses 2.0); None: dropless at eval, as the exported
    Mixtral/Qwen3-MoE models run (ignored when dropless)."""
    dropless: bool = False
    """Route every token (no capacity limit, no dropping)."""
    normalize_gates: bool | None = None
    """Renormalize the top-k gates to sum to 1; None: true for gshard/topk, false for switch."""
    random_second_expert: bool = False
    """GShard: send to the second expert with probability proportional to its gate."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss E * sum_i f_i * P_i."""
    aux_loss_type: Literal["topk", "switch"] = "topk"
    """f_i of the load-balancing loss: ``topk`` (default), the fraction of all k choices that
    go to expert i (Mixtral / transformers' load_balancing_loss_func, up to its factor k);
    ``switch``, the fraction of tokens whose first choice is expert i (Switch eq. 4-6, GShard).
    Top-1 routers give the same value. Default topk: every choice loads an expert, it is what
    the exported models compute, and earlier runs' numerics stay."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    jitter: float = 0.0
    """Multiplicative input jitter eps for the router in training (x * U(1-eps, 1+eps))."""


@dataclass
class ModelConfig:
    """Transformer shape and flavour (``model.*``)."""

    family: Literal["decoder", "encoder", "encoder_decoder"] = field(
        default="decoder", metadata=ARCHITECTURE
    )
    """decoder (CLM, Llama-shaped) | encoder (MLM, XLM-R-shaped) | encoder_decoder (mT5/mBART/
    Switch-shaped, ``pretrain.models.encoder_decoder``)."""
    vocab_size: int = field(default=32000, metadata=ARCHITECTURE)
    """Rows of the embedding table (the tokenizer's vocab size, possibly padded)."""
    hidden_size: int = field(default=256, metadata=ARCHITECTURE)
    """Model width d."""
    num_layers: int = field(default=4, metadata=ARCHITECTURE)
    """Transformer blocks (the encoder stack's for encoder_decoder)."""
    num_decoder_layers: int | None = field(default=None, metadata=ARCHITECTURE)
    """encoder_decoder: decoder blocks; None means num_layers."""
    num_heads: int = field(default=4, metadata=ARCHITECTURE)
    """Attention (query) heads."""
    num_kv_heads: int | None = field(default=None, metadata=ARCHITECTURE)
    """Key/value heads for grouped-query attention; None means num_heads."""
    head_dim: int | None = field(default=None, metadata=ARCHITECTURE)
    """Per-head width; None means hidden_size // num_heads."""
    ffn_hidden_size: int = field(default=1024, metadata=ARCHITECTURE)
    """Hidden width of the dense feed-forward."""
    max_seq_len: int = 2048
    """Longest sequence (size of learned position tables, RoPE cache)."""
    position: Literal["rope", "learned", "relative", "sinusoidal"] = field(
        default="rope", metadata=ARCHITECTURE
    )
    """Positions: rope | learned (absolute, XLM-R / mBART style) | relative (T5 bucketed
    attention bias, encoder_decoder only) | sinusoidal (fairseq's fixed sin/cos table, numbered
    from pad_token_id + 1 as NLLB/M2M100 do; encoder_decoder only)."""
    relative_attention_num_buckets: int = field(default=32, metadata=ARCHITECTURE)
    """position=relative: buckets of the relative-position bias table."""
    relative_attention_max_distance: int = field(default=128, metadata=ARCHITECTURE)
    """position=relative: distance from which all relative positions share the last bucket."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: Literal["rmsnorm", "layernorm"] = field(default="rmsnorm", metadata=ARCHITECTURE)
    """rmsnorm | layernorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    norm_position: Literal["pre", "post"] = field(default="pre", metadata=ARCHITECTURE)
    """pre (Llama) | post (BERT/XLM-R) normalisation."""
    mlp: Literal["swiglu", "gelu", "gated_gelu", "relu"] = field(
        default="swiglu", metadata=ARCHITECTURE
    )
    """Dense feed-forward: swiglu | gelu (exact) | gated_gelu (tanh GELU gate, T5 v1.1/mT5;
    encoder_decoder only) | relu (T5 v1.0/Switch; encoder_decoder only). MoE experts take
    swiglu, gelu or relu."""
    bias: bool = field(default=False, metadata=ARCHITECTURE)
    """Biases on the linear layers (XLM-R: true)."""
    qk_norm: bool = field(default=False, metadata=ARCHITECTURE)
    """Normalise queries and keys per head before attention."""
    tie_embeddings: bool = field(default=False, metadata=ARCHITECTURE)
    """Share the input embedding with the output projection (must be false with
    parallel.pp > 1: the two are on different pipeline stages)."""
    scale_attention: bool = field(default=True, metadata=ARCHITECTURE)
    """Divide attention scores by sqrt(head_dim); false for T5/mT5/Switch (encoder_decoder only;
    their initialisation compensates)."""
    scale_embeddings: bool = field(default=False, metadata=ARCHITECTURE)
    """encoder_decoder: multiply token embeddings by sqrt(hidden_size) (mBART's
    scale_embedding)."""
    embedding_norm: bool = field(default=False, metadata=ARCHITECTURE)
    """encoder_decoder: a norm after the embeddings of each stack (mBART's
    layernorm_embedding)."""
    final_logits_bias: bool = field(default=False, metadata=ARCHITECTURE)
    """encoder_decoder: a bias on the output projection (mBART's final_logits_bias)."""
    scale_output: bool = field(default=False, metadata=ARCHITECTURE)
    """encoder_decoder: multiply the decoder output by hidden_size^-0.5 before the output
    projection (mesh-tensorflow's rescale of a tied head: T5 v1.0, Switch Transformers)."""
    num_languages: int = field(default=0, metadata=ARCHITECTURE)
    """Size of the XLM-style language-embedding table; 0 disables language embeddings."""
    type_vocab_size: int = field(default=0, metadata=ARCHITECTURE)
    """encoder: rows of BERT's segment (token type) embedding table, added to the token
    embeddings (2 for NSP/SOP segment pairs); 0: none (XLM-R)."""
    pair_head: bool = field(default=False, metadata=ARCHITECTURE)
    """encoder: BERT's pooler (dense + tanh on the first position's state) and a 2-way
    classifier over it (``seq_relationship``: NSP, SOP)."""
    span_boundary_positions: int = field(default=0, metadata=ARCHITECTURE)
    """encoder: SpanBERT's span-boundary head with this many relative positions (a span's
    tokens past the last share it); 0: none."""
    generator_fraction: float = field(default=0.0, metadata=ARCHITECTURE)
    """encoder: ELECTRA's generator beside the model (the discriminator), this fraction of its
    width (Google's ``generator_hidden_size``; ELECTRA: 0.25): hidden size
    ``round(fraction * hidden_size)``, heads of the model's head width (at least one), FFN
    ``round(fraction * ffn_hidden_size)``, as many dense layers; it shares the token, position
    and segment embeddings and their norm (``generator_config``); 0: none."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    pad_token_id: int | None = None
    """Padding token id: its embedding row starts at zero (encoder) and the XLM-R export uses it as
    padding_idx (position ids start at pad_token_id + 1 there); None: 1 on export, as in XLM-R."""
    document_masking: bool = True
    """Attention stays inside each packed document (block-causal for the decoder, block-diagonal
    for the encoder; padding isolated), from the loader's per-token document ids."""
    attention: Literal["sdpa", "flex", "auto"] = "sdpa"
    """Kernel for document-masked attention: ``sdpa`` (a dense boolean mask; SDPA then uses its
    memory-efficient or math kernel, not flash), ``flex`` (FlexAttention with a block-sparse
    mask: blocks outside every document are skipped; compiled; no dropout; CUDA for training,
    FlexAttention has no CPU backward), ``auto`` (flex on CUDA without dropout, else sdpa).
    Without document masking attention is SDPA's causal/full kernel (flash) either way."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings."""

    # Derived values: the fields above keep what the user set (None allowed); these are the one
    # place the defaults are resolved. Properties are not dataclass fields, so they never reach
    # the saved config.

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: ``head_dim``, or ``hidden_size // num_heads`` when it is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_kv_heads``, or ``num_heads`` when it is None."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def expert_ffn_width(self) -> int:
        """Hidden width of each expert's FFN: ``moe.expert_ffn_hidden_size``, or
        ``ffn_hidden_size`` when it is None."""
        width = self.moe.expert_ffn_hidden_size
        return width if width is not None else self.ffn_hidden_size


def architecture_keys(cls: type = ModelConfig, prefix: str = "") -> tuple[str, ...]:
    """The ``model.*`` keys (without ``model.``, dotted below it: ``moe.top_k``) whose fields
    carry ``ARCHITECTURE`` in their metadata, in field order, nested sections in place.

    These are the keys a checkpoint and the run resuming it must agree on
    (``pretrain.checkpoint.check_compatible``).
    """
    keys: list[str] = []
    for spec in dataclasses.fields(cls):
        if spec.metadata.get("architecture"):
            keys.append(f"{prefix}{spec.name}")
        elif spec.default_factory is not dataclasses.MISSING:
            made = spec.default_factory()
            if dataclasses.is_dataclass(made):
                keys.extend(architecture_keys(type(made), f"{prefix}{spec.name}."))
    return tuple(keys)


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key} ({value}) must be > 0")


def _validate_encoder_decoder_keys(cfg: ModelConfig) -> None:
    """Keys only the encoder_decoder family reads: refused elsewhere, checked there."""
    if cfg.family != "encoder_decoder":
        for key, default in (
            ("num_decoder_layers", None),
            ("scale_attention", True),
            ("scale_embeddings", False),
            ("embedding_norm", False),
            ("final_logits_bias", False),
            ("scale_output", False),
        ):
            if getattr(cfg, key) != default:
                raise ValueError(
                    f"model.{key} ({getattr(cfg, key)!r}) must be {default!r} with "
                    f"model.family={cfg.family} (encoder_decoder only)"
                )
        if cfg.position in ("relative", "sinusoidal"):
            raise ValueError(
                f"model.position ({cfg.position!r}) requires model.family=encoder_decoder "
                f"(got {cfg.family!r})"
            )
        if cfg.mlp in ("gated_gelu", "relu"):
            raise ValueError(
                f"model.mlp ({cfg.mlp!r}) requires model.family=encoder_decoder "
                f"(got {cfg.family!r})"
            )
        if cfg.moe.offset is not None:
            raise ValueError(
                f"model.moe.offset ({cfg.moe.offset}) requires model.family=encoder_decoder "
                f"(got {cfg.family!r})"
            )
        return
    if cfg.position == "rope":
        raise ValueError(
            "model.position ('rope') must be relative, learned or sinusoidal with "
            "model.family=encoder_decoder"
        )
    if cfg.num_decoder_layers is not None:
        _check_positive("model.num_decoder_layers", cfg.num_decoder_layers)
    if cfg.position == "relative":
        _check_positive("model.relative_attention_num_buckets", cfg.relative_attention_num_buckets)
        _check_positive(
            "model.relative_attention_max_distance", cfg.relative_attention_max_distance
        )
        if cfg.relative_attention_num_buckets % 4 != 0:
            raise ValueError(
                f"model.relative_attention_num_buckets ({cfg.relative_attention_num_buckets}) "
                "must be divisible by 4 (half exact, half log-spaced, per direction)"
            )


def generator_config(cfg: ModelConfig) -> ModelConfig:
    """The blocks' config of ELECTRA's generator of ``cfg`` (``model.generator_fraction``):
    width ``round(f * hidden_size)``, ``max(1, width // head width)`` heads (Google's ELECTRA:
    ``hidden // 64``), FFN ``round(f * ffn_hidden_size)``, dense, the model's layer count and
    the rest of its block settings."""
    fraction = cfg.generator_fraction
    width = int(round(cfg.hidden_size * fraction))
    heads = max(1, width // cfg.resolved_head_dim)
    return dataclasses.replace(
        cfg,
        hidden_size=width,
        num_heads=heads,
        num_kv_heads=None,
        head_dim=None,
        ffn_hidden_size=max(1, int(round(cfg.ffn_hidden_size * fraction))),
        moe=MoEConfig(),
        generator_fraction=0.0,
        pair_head=False,
        span_boundary_positions=0,
    )


def validate_model(cfg: ModelConfig) -> None:
    """Check the ``model`` section on its own.

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    check_choices(cfg, "model")
    check_choices(cfg.moe, "model.moe")
    for key in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "ffn_hidden_size",
        "max_seq_len",
        "init_std",
        "norm_eps",
        "rope_theta",
    ):
        _check_positive(f"model.{key}", getattr(cfg, key))
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout ({cfg.dropout}) must be in [0, 1)")
    if cfg.attention == "flex" and cfg.dropout > 0:
        raise ValueError(
            f"model.dropout ({cfg.dropout}) must be 0 with model.attention=flex "
            "(FlexAttention has no attention dropout)"
        )
    if cfg.pad_token_id is not None and not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise ValueError(
            f"model.pad_token_id ({cfg.pad_token_id}) must be in [0, model.vocab_size "
            f"({cfg.vocab_size}))"
        )
    if cfg.num_languages < 0:
        raise ValueError(f"model.num_languages ({cfg.num_languages}) must be >= 0")
    if cfg.type_vocab_size < 0:
        raise ValueError(f"model.type_vocab_size ({cfg.type_vocab_size}) must be >= 0")
    if cfg.span_boundary_positions < 0:
        raise ValueError(
            f"model.span_boundary_positions ({cfg.span_boundary_positions}) must be >= 0"
        )
    if not 0.0 <= cfg.generator_fraction <= 1.0:
        raise ValueError(f"model.generator_fraction ({cfg.generator_fraction}) must be in [0, 1]")
    if cfg.generator_fraction:
        gen = generator_config(cfg)
        if gen.hidden_size < 1 or gen.hidden_size % cfg.resolved_head_dim:
            raise ValueError(
                f"model.generator_fraction ({cfg.generator_fraction}) gives a generator width "
                f"({gen.hidden_size}) that is not a multiple of the head width "
                f"({cfg.resolved_head_dim}): choose a fraction whose width is one"
            )
    for key in ("type_vocab_size", "pair_head", "span_boundary_positions", "generator_fraction"):
        if getattr(cfg, key) and cfg.family != "encoder":
            raise ValueError(
                f"model.{key} ({getattr(cfg, key)}) needs model.family encoder (got {cfg.family!r})"
            )
    kv_heads = cfg.kv_heads
    _check_positive("model.num_kv_heads", kv_heads)
    if cfg.num_heads % kv_heads != 0:
        raise ValueError(
            f"model.num_heads ({cfg.num_heads}) must be divisible by "
            f"model.num_kv_heads ({kv_heads})"
        )
    if cfg.head_dim is None:
        if cfg.hidden_size % cfg.num_heads != 0:
            raise ValueError(
                f"model.hidden_size ({cfg.hidden_size}) must be divisible by "
                f"model.num_heads ({cfg.num_heads}) when model.head_dim is not set"
            )
    else:
        _check_positive("model.head_dim", cfg.head_dim)
    head_dim = cfg.resolved_head_dim
    if cfg.position == "rope" and head_dim % 2 != 0:
        raise ValueError(f"model.head_dim ({head_dim}) must be even with model.position=rope")

    _validate_encoder_decoder_keys(cfg)

    moe = cfg.moe
    if moe.num_experts < 0:
        raise ValueError(f"model.moe.num_experts ({moe.num_experts}) must be >= 0")
    if moe.num_experts == 0:
        return
    _check_positive("model.moe.top_k", moe.top_k)
    if moe.top_k > moe.num_experts:
        raise ValueError(
            f"model.moe.top_k ({moe.top_k}) must be <= model.moe.num_experts ({moe.num_experts})"
        )
    if moe.router == "switch" and moe.top_k != 1:
        raise ValueError(f"model.moe.top_k ({moe.top_k}) must be 1 with model.moe.router=switch")
    if moe.router == "gshard" and moe.top_k != 2:
        raise ValueError(f"model.moe.top_k ({moe.top_k}) must be 2 with model.moe.router=gshard")
    _check_positive("model.moe.every", moe.every)
    if moe.every > cfg.num_layers:
        raise ValueError(
            f"model.moe.every ({moe.every}) must be <= model.num_layers ({cfg.num_layers})"
        )
    if moe.expert_ffn_hidden_size is not None:
        _check_positive("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size)
    if not moe.dropless:
        _check_positive("model.moe.capacity_factor", moe.capacity_factor)
        if moe.eval_capacity_factor is not None:
            _check_positive("model.moe.eval_capacity_factor", moe.eval_capacity_factor)
    for key in ("aux_loss_coef", "z_loss_coef", "jitter"):
        if getattr(moe, key) < 0:
            raise ValueError(f"model.moe.{key} ({getattr(moe, key)}) must be >= 0")
    if moe.offset is not None and not 0 <= moe.offset < moe.every:
        raise ValueError(
            f"model.moe.offset ({moe.offset}) must be in [0, model.moe.every ({moe.every}))"
        )
    if cfg.mlp == "gated_gelu":
        raise ValueError(
            f"model.mlp ({cfg.mlp!r}) must be swiglu, gelu or relu with model.moe.num_experts > 0 "
            "(the grouped experts implement those three)"
        )
    if moe.random_second_expert and moe.router != "gshard":
        raise ValueError(
            "model.moe.random_second_expert (True) requires model.moe.router=gshard "
            f"(got {moe.router!r})"
        )
