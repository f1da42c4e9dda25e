"""Model configuration: the ``model`` section of a run config.

The model owns its config (DESIGN.md: each package owns the dataclass of its part);
``pretrain.config`` composes it into the run tree. Field docstrings are the reference for
every ``model.*`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("decoder", "encoder", "encoder_decoder")
ROUTERS = ("switch", "gshard", "topk")
AUX_LOSS_TYPES = ("topk", "switch")
POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("swiglu", "gelu")
ATTENTIONS = ("sdpa", "flex", "auto")


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (``model.moe.*``). ``num_experts == 0`` means dense."""

    num_experts: int = 0
    """Experts per MoE layer; 0 disables MoE."""
    top_k: int = 2
    """Experts each token is routed to (Switch: 1, GShard: 2)."""
    router: str = "gshard"
    """Router: switch (top-1, gate = softmax prob), gshard (top-2, normalized gates), topk."""
    every: int = 1
    """An MoE feed-forward in every k-th layer (layers k-1, 2k-1, ...); the rest are dense."""
    expert_ffn_hidden_size: int | None = None
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
    aux_loss_type: str = "topk"
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

    family: str = "decoder"
    """decoder (CLM, Llama-shaped) | encoder (MLM, XLM-R-shaped) | encoder_decoder (later)."""
    vocab_size: int = 32000
    """Rows of the embedding table (the tokenizer's vocab size, possibly padded)."""
    hidden_size: int = 256
    """Model width d."""
    num_layers: int = 4
    """Transformer blocks (per stack for encoder_decoder)."""
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads."""
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    ffn_hidden_size: int = 1024
    """Hidden width of the dense feed-forward."""
    max_seq_len: int = 2048
    """Longest sequence (size of learned position tables, RoPE cache)."""
    position: str = "rope"
    """Positions: rope | learned (absolute, XLM-R style)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "rmsnorm"
    """rmsnorm | layernorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    norm_position: str = "pre"
    """pre (Llama) | post (BERT/XLM-R) normalisation."""
    mlp: str = "swiglu"
    """Dense feed-forward: swiglu | gelu."""
    bias: bool = False
    """Biases on the linear layers (XLM-R: true)."""
    qk_norm: bool = False
    """Normalise queries and keys per head before attention."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection (must be false with
    parallel.pp > 1: the two are on different pipeline stages)."""
    num_languages: int = 0
    """Size of the XLM-style language-embedding table; 0 disables language embeddings."""
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
    attention: str = "sdpa"
    """Kernel for document-masked attention: ``sdpa`` (a dense boolean mask; SDPA then uses its
    memory-efficient or math kernel, not flash), ``flex`` (FlexAttention with a block-sparse
    mask: blocks outside every document are skipped; compiled; no dropout; CUDA for training,
    FlexAttention has no CPU backward), ``auto`` (flex on CUDA without dropout, else sdpa).
    Without document masking attention is SDPA's causal/full kernel (flash) either way."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings."""


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} ({value!r}) must be one of {', '.join(choices)}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key} ({value}) must be > 0")


def validate_model(cfg: ModelConfig) -> None:
    """Check the ``model`` section on its own.

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    _check_choice("model.family", cfg.family, FAMILIES)
    _check_choice("model.position", cfg.position, POSITIONS)
    _check_choice("model.norm", cfg.norm, NORMS)
    _check_choice("model.norm_position", cfg.norm_position, NORM_POSITIONS)
    _check_choice("model.mlp", cfg.mlp, MLPS)
    _check_choice("model.attention", cfg.attention, ATTENTIONS)
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
    kv_heads = cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_heads
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
        head_dim = cfg.hidden_size // cfg.num_heads
    else:
        head_dim = cfg.head_dim
        _check_positive("model.head_dim", head_dim)
    if cfg.position == "rope" and head_dim % 2 != 0:
        raise ValueError(f"model.head_dim ({head_dim}) must be even with model.position=rope")

    moe = cfg.moe
    if moe.num_experts < 0:
        raise ValueError(f"model.moe.num_experts ({moe.num_experts}) must be >= 0")
    if moe.num_experts == 0:
        return
    _check_choice("model.moe.router", moe.router, ROUTERS)
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
    _check_choice("model.moe.aux_loss_type", moe.aux_loss_type, AUX_LOSS_TYPES)
    if not moe.dropless:
        _check_positive("model.moe.capacity_factor", moe.capacity_factor)
        if moe.eval_capacity_factor is not None:
            _check_positive("model.moe.eval_capacity_factor", moe.eval_capacity_factor)
    for key in ("aux_loss_coef", "z_loss_coef", "jitter"):
        if getattr(moe, key) < 0:
            raise ValueError(f"model.moe.{key} ({getattr(moe, key)}) must be >= 0")
    if moe.random_second_expert and moe.router != "gshard":
        raise ValueError(
            "model.moe.random_second_expert (True) requires model.moe.router=gshard "
            f"(got {moe.router!r})"
        )
