"""The run's objectives together: loader settings, targets, losses and loss groups of one batch.

What to call::

    mix = ObjectiveMix.from_config(cfg)              # cfg: pretrain.config.RunConfig
    transform, masking = mix.loader_settings(cfg.objective)
    labels_BT = mix.targets(batch_labels_BT)         # device, int64; shifted for CLM
    groups_BT = mix.target_groups(lang_ids_BT, tokens_mask_BT, num_languages=L)
    loss, sums_G, counts_G = mix.loss(hidden_BTD, weight_VD, bias_V, labels_BT, groups_BT)
    metrics = mix.group_metrics(sums_G, counts_G, languages)

Guarantees: ``loss`` is the summed (not averaged) token loss of the batch's targets, so that the
trainer can normalise by the step's global target count; ``sums_G`` / ``counts_G`` are the loss
sums and target counts per loss group, group = objective index x languages + language index of
the target token, one pass over the tokens and no host sync beyond the one ``sparse_targets``
costs. The same numbers come from logits (``loss_from_logits``: tensor parallel, the logits a
vocabulary-sharded DTensor inside ``loss_parallel``) and from the pipeline's last stage
(``token_losses``).

Each row of a batch belongs to one objective of the mix, by its ``rows`` kind
(``pretrain.objectives.registry``): a row whose real tokens hold more than one language is a pair
row, the rest mono rows; an objective taking ``any`` row takes the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.objectives.losses import IGNORE_INDEX, chunked_cross_entropy
from pretrain.objectives.registry import OBJECTIVES, Objective, objective_weights


class ObjectiveMix:
    """The objectives of one run and their weights (``objective.weights``, resolved)."""

    def __init__(self, weights: dict[str, float], *, chunk_tokens: int = 4096) -> None:
        """Args:
            weights: ``{objective name: weight}`` (registered names, weights >= 0, positive sum).
            chunk_tokens: tokens per chunk of the output projection + cross-entropy.

        Raises:
            ValueError: an unknown name, or objectives that ask for different batch transforms.
        """
        unknown = [name for name in weights if name not in OBJECTIVES]
        if unknown:
            raise ValueError(
                f"objective.weights.{unknown[0]}: unknown objective; must be one of "
                f"{', '.join(OBJECTIVES)}"
            )
        self.weights = dict(weights)
        self.objectives: list[Objective] = [OBJECTIVES[name]() for name in weights]
        self.names = [objective.name for objective in self.objectives]
        transforms = sorted({objective.transform for objective in self.objectives})
        if len(transforms) > 1:
            raise ValueError(
                f"objective.weights ({', '.join(self.names)}) ask for different batch "
                f"transforms ({', '.join(transforms)}); one run's objectives share one"
            )
        self.transform = transforms[0]
        first = self.objectives[0]
        if any(
            (o.shift_targets, o.sparse_targets) != (first.shift_targets, first.sparse_targets)
            for o in self.objectives
        ):
            raise ValueError(f"objective.weights ({', '.join(self.names)}) predict differently")
        self.shift_targets = first.shift_targets
        self.sparse_targets = first.sparse_targets
        self.chunk_tokens = chunk_tokens
        # The objective index of mono and pair rows.
        self._row_index = {kind: self._owner(kind) for kind in ("mono", "pair")}

    @classmethod
    def from_config(cls, cfg: Any) -> ObjectiveMix:
        """The mix of a run config (``objective.*`` and ``model.family``)."""
        weights, _ = objective_weights(cfg.objective, family=cfg.model.family)
        return cls(weights, chunk_tokens=cfg.objective.loss_chunk_tokens)

    def _owner(self, kind: str) -> int:
        for index, objective in enumerate(self.objectives):
            if objective.rows == kind:
                return index
        for index, objective in enumerate(self.objectives):
            if objective.rows == "any":
                return index
        return 0  # a kind this mix never asks the loader for

    # -- loader ----------------------------------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Each objective's share of the mix (weights over their sum)."""
        total = sum(self.weights.values())
        return {name: (w / total if total > 0 else 0.0) for name, w in self.weights.items()}

    def loader_settings(self, objective_cfg: Any) -> tuple[str, Any]:
        """``(transform, masking)`` for ``data_pipeline.loader.build_loader``: the batch kind
        and the ``MaskingConfig`` built from ``objective.*`` plus every objective's
        ``loader_options`` for its share (TLM: ``tlm_share``)."""
        from data_pipeline.loader import masking_from_objective

        masking = replace(masking_from_objective(objective_cfg), tlm_share=0.0)
        options: dict[str, Any] = {}
        for objective, share in zip(self.objectives, self.shares().values()):
            options.update(objective.loader_options(share))
        return self.transform, replace(masking, **options)

    # -- targets and groups ------------------------------------------------------------------

    def num_groups(self, num_languages: int) -> int:
        return len(self.objectives) * num_languages

    def targets(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """Targets of every position, int64 (widened here: the loader's labels are int32, so the
        host moves half the bytes); CLM: position t predicts token t + 1, the last nothing."""
        labels_BT = labels_BT.long()
        if self.shift_targets:
            ignore = torch.full_like(labels_BT[:, :1], IGNORE_INDEX)
            labels_BT = torch.cat([labels_BT[:, 1:], ignore], dim=1)
        return labels_BT

    def num_targets(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """Predicted tokens of a batch from its (CPU, unshifted) labels: an int64 scalar on the
        labels' device (no device sync for CPU labels)."""
        if self.shift_targets:
            labels_BT = labels_BT[:, 1:]
        return (labels_BT != IGNORE_INDEX).sum()

    def target_groups(
        self, lang_ids_BT: torch.Tensor, tokens_mask_BT: torch.Tensor, *, num_languages: int
    ) -> torch.Tensor:
        """``[B, T]`` int64 loss group of every position's target: objective index x languages
        + the target token's language (a pair row holds two languages)."""
        tokens_mask_BT = tokens_mask_BT.bool()
        is_pair_B = ((lang_ids_BT != lang_ids_BT[:, :1]) & tokens_mask_BT).any(dim=1)
        if self.shift_targets:
            lang_ids_BT = torch.cat([lang_ids_BT[:, 1:], lang_ids_BT[:, -1:]], dim=1)
        mono, pair = self._row_index["mono"], self._row_index["pair"]
        if mono == pair:
            objective_B = torch.full_like(is_pair_B, mono, dtype=torch.long)
        else:
            objective_B = torch.where(is_pair_B, pair, mono).long()
        return objective_B[:, None] * num_languages + lang_ids_BT.long()

    # -- losses ------------------------------------------------------------------------------

    def token_losses(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Per-token loss ``[B * T]`` (0 where nothing is predicted). Under tensor parallel the
        logits are a vocabulary-sharded DTensor and this runs inside ``loss_parallel``."""
        return F.cross_entropy(
            logits_BTV.flatten(0, 1).float(),
            labels_BT.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )

    def loss_from_logits(
        self,
        logits_BTV: torch.Tensor,
        labels_BT: torch.Tensor,
        groups_BT: torch.Tensor,
        *,
        num_groups: int,
        local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(summed loss, sums_G, counts_G)`` from whole logits (``local`` turns a DTensor
        into this rank's tensor for the group sums)."""
        group_N = groups_BT.flatten()
        valid_N = labels_BT.flatten() != IGNORE_INDEX
        zeros_G = torch.zeros(num_groups, dtype=torch.float32, device=labels_BT.device)
        loss_N = self.token_losses(logits_BTV, labels_BT)
        sums_G = zeros_G.index_add(0, group_N, local(loss_N.detach()).float())
        counts_G = zeros_G.index_add(0, group_N, valid_N.float())
        return loss_N.sum(), sums_G, counts_G

    def loss(
        self,
        hidden_BTD: torch.Tensor,
        weight_VD: torch.Tensor,
        bias_V: torch.Tensor | None,
        labels_BT: torch.Tensor,
        groups_BT: torch.Tensor,
        *,
        num_groups: int,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(summed loss, sums_G, counts_G)`` from the hidden states entering the output
        projection, chunked (``chunked_cross_entropy``: whole-batch logits never exist). With
        ``sparse_targets`` only the positions with a target are projected (one host sync for
        their count); otherwise every position, ignored ones adding 0 (no sync)."""
        hidden_ND = hidden_BTD.flatten(0, 1)
        labels_N = labels_BT.flatten()
        group_N = groups_BT.flatten()
        valid_N = labels_N != IGNORE_INDEX
        if self.sparse_targets:
            targets_M = valid_N.nonzero().squeeze(1)
            hidden_ND, labels_N = hidden_ND[targets_M], labels_N[targets_M]
            group_N, valid_N = group_N[targets_M], valid_N[targets_M]
        with autocast():
            sums_G = chunked_cross_entropy(
                hidden_ND,
                labels_N,
                weight_VD,
                bias_V=bias_V,
                chunk_tokens=self.chunk_tokens,
                reduction="sum",
                group_N=group_N,
                num_groups=num_groups,
            )
        zeros_G = torch.zeros(num_groups, dtype=torch.float32, device=labels_N.device)
        counts_G = zeros_G.index_add(0, group_N, valid_N.float())
        return sums_G.sum(), sums_G.detach(), counts_G

    # -- metrics -----------------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """The per-objective loss keys this mix reports (``loss_per_objective``)."""
        return sorted(set(self.names))

    def group_metrics(
        self, sums_G: torch.Tensor, counts_G: torch.Tensor, languages: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """``loss_per_lang`` and ``loss_per_objective`` (token-weighted means) from the groups'
        loss sums and target counts (float64 CPU tensors, already summed over ranks)."""
        num_langs = len(languages)
        objectives = self.metric_names()
        rows = torch.zeros(len(objectives), num_langs, 2, dtype=torch.float64)
        for index, name in enumerate(self.names):
            at = objectives.index(name)
            rows[at, :, 0] += sums_G[index * num_langs : (index + 1) * num_langs]
            rows[at, :, 1] += counts_G[index * num_langs : (index + 1) * num_langs]
        out: dict[str, dict[str, float]] = {}
        per_lang = {}
        for i, lang in enumerate(languages):
            loss = sum(float(rows[o, i, 0]) for o in range(len(objectives)))
            count = sum(float(rows[o, i, 1]) for o in range(len(objectives)))
            if count > 0:
                per_lang[lang] = loss / count
        per_objective = {}
        for o, name in enumerate(objectives):
            loss = sum(float(rows[o, i, 0]) for i in range(num_langs))
            count = sum(float(rows[o, i, 1]) for i in range(num_langs))
            if count > 0:
                per_objective[name] = loss / count
        if per_lang:
            out["loss_per_lang"] = per_lang
        if per_objective:
            out["loss_per_objective"] = per_objective
        return out
