"""Streaming-loader configuration: the ``data`` section of a run config.

What to call: :class:`DataConfig` (the ``data`` section, composed into the run config by
``pretrain.config``), ``validate_data(cfg)`` (one-line ``ValueError`` naming key and rule),
``check_pair_mix`` (its part for the real / synthetic pair mix, shared with the loader),
``choices_of`` / ``check_choices`` for ``Literal`` choice fields.

Lives with the loader (DESIGN.md: each package owns the dataclass of its part); it imports nothing
from the other Rosetta packages so that ``data_pipeline`` installs and runs alone.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Where batches come from and how languages are mixed (``data.*``)."""

    manifest: str = ""
    """A shard directory's manifest.json, or the directory holding it."""
    valid_manifest: str = ""
    """Held-out shards for validation loss per language ("" disables validation)."""
    tokenizer: str = ""
    """Tokenizer directory (sentencepiece model + JSON sidecar); "" takes the manifest's."""
    alpha: float = 0.3
    """Language smoothing exponent: p_l = q_l^alpha / sum_k q_k^alpha, q_l = n_l / N."""
    language_weights: dict[str, float] = field(default_factory=dict)
    """Explicit per-language sampling weights; when set they replace alpha smoothing."""
    seq_len: int = 512
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held in each stream's shuffle buffer."""
    seed: int | None = None
    """Data order seed; None takes train.seed."""
    pair_weights: dict[str, float] = field(default_factory=dict)
    """Explicit per-language-pair weights ("en-de": w) for TLM rows; when set they replace alpha."""
    reset_position_ids: bool = False
    """Restart position ids at each packed document (doc_ids are in every batch regardless)."""
    min_carry_tokens: int = 0
    """Drop a document remainder shorter than this instead of opening a row with it (0: none)."""
    on_bad_shard: Literal["skip", "raise"] = "skip"
    """A shard failing to read mid-stream: skip (logged by name and counted) | raise."""
    tlm_swap_prob: float = 0.5
    """Probability that a TLM pair puts its target side first (per pair; XLM trains both
    directions, en-fr and fr-en)."""
    synthetic_ratio: float | None = None
    """Share of pair rows (TLM and translation rows) drawn from synthetic (back-translated) pair
    sets, in [0, 1); real pair sets get the rest; within each pool sets are mixed by alpha (or
    pair_weights) as usual. None: synthetic pair sets are sampled like real ones."""
    parallel_upsample: float | None = None
    """fairseq's --upsample-primary (>= 1): real pair sets' sampling weight multiplied by it
    before normalising; only without synthetic_ratio. None: no upsampling."""


@functools.cache
def choices_of(cls: type) -> dict[str, tuple[Any, ...]]:
    """The choice fields of config dataclass ``cls``: field name -> the allowed values of its
    ``Literal[...]`` type, in the order written."""
    hints = typing.get_type_hints(cls)
    return {
        spec.name: typing.get_args(hints[spec.name])
        for spec in dataclasses.fields(cls)
        if typing.get_origin(hints[spec.name]) is Literal
    }


def check_choices(cfg: Any, section: str) -> None:
    """Check every ``Literal[...]``-typed field of config dataclass ``cfg`` (not its nested
    sections) against its allowed values: the one choice check of every config section (this
    module imports nothing from the other packages, so each of them can use it).

    Raises:
        ValueError: ``"{section}.{key} ({value!r}) must be one of a, b, c"`` for the first field,
            in field order, whose value is not one of its choices.
    """
    for name, choices in choices_of(type(cfg)).items():
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(
                f"{section}.{name} ({value!r}) must be one of {', '.join(map(str, choices))}"
            )


def validate_data(cfg: DataConfig) -> None:
    """Check the data section on its own.

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    check_choices(cfg, "data")
    if cfg.alpha <= 0 or cfg.alpha > 1:
        raise ValueError(f"data.alpha ({cfg.alpha}) must be in (0, 1]")
    for lang, weight in cfg.language_weights.items():
        if weight < 0:
            raise ValueError(f"data.language_weights.{lang} ({weight}) must be >= 0")
    if cfg.language_weights and sum(cfg.language_weights.values()) <= 0:
        raise ValueError(
            f"data.language_weights ({dict(cfg.language_weights)}) must have a positive sum"
        )
    for key in ("seq_len", "batch_size", "shuffle_buffer"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"data.{key} ({getattr(cfg, key)}) must be >= 1")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers ({cfg.num_workers}) must be >= 0")
    for pair, weight in cfg.pair_weights.items():
        if weight < 0:
            raise ValueError(f"data.pair_weights.{pair} ({weight}) must be >= 0")
    if cfg.min_carry_tokens < 0:
        raise ValueError(f"data.min_carry_tokens ({cfg.min_carry_tokens}) must be >= 0")
    if not 0.0 <= cfg.tlm_swap_prob <= 1.0:
        raise ValueError(f"data.tlm_swap_prob ({cfg.tlm_swap_prob}) must be in [0, 1]")
    check_pair_mix(cfg.synthetic_ratio, cfg.parallel_upsample)


def check_pair_mix(synthetic_ratio: float | None, parallel_upsample: float | None) -> None:
    """Check ``data.synthetic_ratio`` and ``data.parallel_upsample`` on their own (the manifest
    side, a synthetic pair set for a ratio > 0, is the loader's check).

    Raises:
        ValueError: a ratio outside [0, 1), an upsample factor below 1 (or not finite), or both
            set (one line naming the key and the rule).
    """
    if synthetic_ratio is not None and not 0.0 <= synthetic_ratio < 1.0:
        raise ValueError(f"data.synthetic_ratio ({synthetic_ratio}) must be in [0, 1) or null")
    if parallel_upsample is not None and not 1.0 <= parallel_upsample < float("inf"):
        raise ValueError(
            f"data.parallel_upsample ({parallel_upsample}) must be a finite number >= 1 or null"
        )
    if synthetic_ratio is not None and parallel_upsample is not None:
        raise ValueError(
            f"data.synthetic_ratio ({synthetic_ratio}) and data.parallel_upsample "
            f"({parallel_upsample}) must not both be set (upsampling applies only without a ratio)"
        )
