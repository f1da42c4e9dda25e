"""Objective classes and the registry that names them; the run's mix from its config.

What to call: ``objective_weights(cfg.objective, family=cfg.model.family)`` for the mix a config
asks for (``{name: weight}``, deprecated keys resolved), ``OBJECTIVES[name]`` for an objective's
class, ``register(cls)`` to add one (adding an objective touches this package and a loader
transform in ``data_pipeline.transforms``, nothing else).

An objective states what it needs and owns, as class data the trainer and the validation read:

- ``families``: the model families it trains (config validation asks each objective);
- ``transform``: the loader's batch kind it asks for (``data_pipeline.loader``: ``clm`` packed
  causal rows, ``mlm`` BERT-masked rows with a share of TLM pair rows); the objectives of one run
  share one transform (one batch feeds them all);
- ``rows``: which rows of such a batch are its own: ``any``, ``mono`` (one language per row) or
  ``pair`` (a parallel pair, two languages): how a batch's targets are split per objective;
- ``shift_targets``: position t predicts token t + 1 (CLM) or the label at t (masked objectives);
- ``sparse_targets``: few positions carry a target (~15%): only those are projected;
- ``loader_options(share)``: what the loader needs from its share of the mix (TLM: the share of
  pair rows).

The loss of these objectives is one cross-entropy over their targets
(``pretrain.objectives.mix.ObjectiveMix``); objectives with their own heads and losses add a
method of the same shape.

The mix is ``objective.weights`` (``{mlm: 3, tlm: 1}``: for objectives sharing a batch transform,
each weight is its share of the batch's rows). ``objective.name`` and ``objective.tlm_share`` are
deprecated spellings of the same fact: when given they set the weights (``name: x`` ->
``{x: 1}``; ``tlm_share: s`` -> ``{mlm: 1 - s, tlm: s}``), with a ``FutureWarning`` naming the
weights to write instead. Empty weights mean the family's default objective (decoder: CLM,
encoder: MLM).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar


class Objective:
    """One pre-training objective (class data: see the module docstring)."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    transform: ClassVar[str]
    rows: ClassVar[str] = "any"
    shift_targets: ClassVar[bool] = False
    sparse_targets: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def loader_options(self, share: float) -> dict[str, Any]:
        """Loader masking options for this objective's ``share`` of the mix (none by default)."""
        return {}


OBJECTIVES: dict[str, type[Objective]] = {}
"""Objective name (an ``objective.weights`` key) -> its class, in registration order."""
DEFAULT_OBJECTIVE: dict[str, str] = {"decoder": "clm", "encoder": "mlm"}
"""The objective of a family whose config names none."""


def register(cls: type[Objective]) -> type[Objective]:
    """Add ``cls`` to :data:`OBJECTIVES` under ``cls.name`` (a class decorator)."""
    if cls.rows not in ("any", "mono", "pair"):
        raise ValueError(f"objective {cls.name!r}: rows ({cls.rows!r}) must be any, mono or pair")
    OBJECTIVES[cls.name] = cls
    return cls


@register
class CausalLM(Objective):
    """Causal language modelling: every position predicts the next token (GPT)."""

    name = "clm"
    families = ("decoder",)
    transform = "clm"
    rows = "any"
    shift_targets = True
    description = "causal LM (decoder)"


@register
class MaskedLM(Objective):
    """Masked language modelling on monolingual rows: BERT's 80/10/10 (optionally whole-word)
    masking, loss at the selected positions."""

    name = "mlm"
    families = ("encoder",)
    transform = "mlm"
    rows = "mono"
    sparse_targets = True
    description = "masked LM, BERT 80/10/10 (encoder)"


@register
class TranslationLM(Objective):
    """Translation language modelling (XLM): masked LM on a parallel pair packed as one row
    (``src </s> tgt </s>``, positions restarting at the target, per-token language ids)."""

    name = "tlm"
    families = ("encoder",)
    transform = "mlm"
    rows = "pair"
    sparse_targets = True
    description = "translation LM on parallel pairs, XLM (encoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"tlm_share": share}


@register
class SpanMasking(Objective):
    """SpanBERT span masking on monolingual rows: whole-word spans with Geometric(0.2) lengths
    clipped at 10 words until ``objective.mask_prob`` of the tokens are selected, one 80/10/10
    choice per span (``objective.mask_replace_prob`` / ``mask_random_prob``); the loss is the
    masked LM loss at the selected positions (the span-boundary objective is not built)."""

    name = "span"
    families = ("encoder",)
    transform = "span"
    rows = "mono"
    sparse_targets = True
    description = "span masking, SpanBERT (encoder)"


def objective_weights(objective: Any, *, family: str) -> tuple[dict[str, float], str]:
    """The mix a config's ``objective`` section asks for, and the key that said it.

    Args:
        objective: a ``pretrain.config.ObjectiveConfig`` (or anything with ``weights``, ``name``
            and ``tlm_share`` attributes).
        family: ``model.family`` (for the default objective).

    Returns:
        ``({name: weight}, key)``: key is ``objective.weights``, ``objective.name`` (deprecated,
        the mix came from it) or ``objective.weights`` for a family default. Names are not
        checked here (``pretrain.config`` validation does that, naming ``key``).
    """
    weights = {str(k): float(v) for k, v in dict(objective.weights or {}).items()}
    key = "objective.weights"
    name = getattr(objective, "name", None)
    share = getattr(objective, "tlm_share", None)
    if name is not None:
        if weights and weights.keys() != {name}:
            raise ValueError(
                f"objective.name ({name!r}) and objective.weights ({weights}) both set the "
                f"objectives; objective.name is deprecated: set objective.weights only"
            )
        weights, key = {name: weights.get(name, 1.0)}, "objective.name"
    if share is not None:
        if not weights:
            weights = {DEFAULT_OBJECTIVE.get(family, "mlm"): 1.0}
        if not set(weights) <= {"mlm", "tlm"}:
            raise ValueError(
                f"objective.tlm_share ({share}) splits MLM and TLM rows; objective.weights "
                f"({weights}) names other objectives: set objective.weights only"
            )
        share = float(share)
        weights = {k: v for k, v in (("mlm", 1.0 - share), ("tlm", share)) if v > 0}
    deprecated = [k for k, v in (("name", name), ("tlm_share", share)) if v is not None]
    if deprecated:
        spelled = ", ".join(f"{k}: {v:g}" for k, v in weights.items())
        said = " and ".join(f"objective.{k}" for k in deprecated)
        verb = "is" if len(deprecated) == 1 else "are"
        warnings.warn(
            f"{said} {verb} deprecated: write objective.weights={{{spelled}}} instead",
            FutureWarning,
            stacklevel=2,
        )
    if not weights:
        weights = {DEFAULT_OBJECTIVE.get(family, "clm"): 1.0}
    return weights, key
