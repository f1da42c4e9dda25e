"""The run's objectives together: loader settings, targets, losses and loss groups of one batch.

What to call::

    mix = ObjectiveMix.from_config(cfg)              # cfg: pretrain.config.RunConfig
    transform, masking = mix.loader_settings(cfg.objective)
    batch = mix.prepare(batch, logits_at)            # BTMLM: placeholders filled by the model
    labels_BT = mix.targets(batch_labels_BT)         # device, int64; shifted for CLM
    groups_BT = mix.target_groups(lang_ids_BT, tokens_mask_BT, num_languages=L)
    # seq2seq batches: the decoder side's language ids and mask, and pair_rows_B=pair_rows
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

from pretrain.objectives.registry import OBJECTIVES, Objective, TokenPrediction, objective_weights


class ObjectiveMix:
    """The objectives of one run and their weights (``objective.weights``, resolved)."""

    def __init__(
        self, weights: dict[str, float], *, chunk_tokens: int = 4096, objective_cfg: Any = None
    ) -> None:
        """Args:
            weights: ``{objective name: weight}`` (registered names, weights >= 0, positive sum).
            chunk_tokens: tokens per chunk of the output projection + cross-entropy.
            objective_cfg: the ``objective`` section, for each objective's own settings
                (``Objective.configure``; None: their defaults).

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
        if objective_cfg is not None:
            for objective in self.objectives:
                objective.configure(objective_cfg)
        transforms = sorted({objective.transform for objective in self.objectives})
        layouts = {objective.layout or objective.transform for objective in self.objectives}
        if len(layouts) > 1:
            raise ValueError(
                f"objective.weights ({', '.join(self.names)}) ask for different batch "
                f"transforms ({', '.join(transforms)}); one run's objectives share one"
            )
        # the masked layout: one mlm batch whose monolingual rows mix their objectives' kinds
        self.mono_kinds = None
        self.transform = transforms[0]
        if layouts == {"masked"}:
            self.transform = "mlm"
            self.mono_kinds = {
                o.row_kind: self.weights[o.name]
                for o in self.objectives
                if o.rows == "mono" and self.weights[o.name] > 0
            }
        # One batch, one loss: the objectives sharing it must place and score targets alike.
        first = self.objectives[0]
        if not isinstance(first, TokenPrediction) or any(
            getattr(type(o), "loss", None) is not type(first).loss
            or (o.shift_targets, o.sparse_targets) != (first.shift_targets, first.sparse_targets)
            for o in self.objectives
        ):
            raise ValueError(
                f"objective.weights ({', '.join(self.names)}) score one batch differently; "
                "one run's objectives share one loss"
            )
        self.loss_owner: TokenPrediction = first
        # A batch's rows are its mono and pair rows: one objective of each kind at most, but
        # for the masked layout's monolingual rows (their objectives mix row by row).
        for kind in ("mono", "pair"):
            taking = [o.name for o in self.objectives if o.rows == kind and self.weights[o.name]]
            if kind == "mono" and self.mono_kinds is not None:
                taking = taking[:1]
            if len(taking) > 1:
                raise ValueError(
                    f"objective.weights ({', '.join(taking)}) all take the {kind} rows of a "
                    "batch; one run's batch has one objective per kind of row: keep one"
                )
        self.chunk_tokens = chunk_tokens
        self.preparing = [o for o in self.objectives if o.prepare is not None]
        # targets predicted again from their span's boundaries (SpanBERT's SBO): one objective
        self.boundary = [o for o in self.objectives if o.span_boundary]
        # a loss beside the token loss over rows or tokens (NSP / SOP, ELECTRA, SimCSE / XLCo)
        scorers = [o for o in self.objectives if o.row_scorer]
        if len(scorers) > 1:
            names = ", ".join(sorted(o.name for o in scorers))
            raise ValueError(
                f"objective.weights ({names}) each score a loss of their own beside the token "
                "loss; one run takes one of them"
            )
        self.scorer: Objective | None = scorers[0] if scorers else None
        self.group = None  # the data-parallel process group of the scorer (set by the trainer)
        for objective in self.objectives:
            if objective.mixes_with is None:
                continue
            others = [name for name in self.names if name not in objective.mixes_with]
            if others:
                allowed = [n for n in objective.mixes_with if n != objective.name]
                raise ValueError(
                    f"objective.weights: {objective.name} mixes with {', '.join(allowed[:-1])} "
                    f"and {allowed[-1]} ({objective.mixes_with_why}), not with "
                    f"{', '.join(others)} (their model outputs are others)"
                )
        kinds = [o.row_kind for o in self.objectives if o.row_kind and self.weights[o.name]]
        for kind in set(kinds):
            same = [o.name for o in self.objectives if o.row_kind == kind and self.weights[o.name]]
            if len(same) > 1:
                raise ValueError(
                    f"objective.weights ({', '.join(self.names)}) name two objectives of one row "
                    f"kind ({', '.join(same)}): keep one"
                )
        # The objective index of mono and pair rows, and of each row transform of a batch's
        # row_transform (data_pipeline.transforms.ROW_TRANSFORMS).
        self._row_index = {kind: self._owner(kind) for kind in ("mono", "pair")}
        from data_pipeline.transforms import ROW_TRANSFORMS

        owner = {"pair": self._row_index["pair"]}
        for kind in ROW_TRANSFORMS[1:]:
            named = [i for i, o in enumerate(self.objectives) if o.row_kind == kind]
            owner[kind] = named[0] if named else self._row_index["mono"]
        self._transform_owner = torch.tensor([owner[k] for k in ROW_TRANSFORMS])

    @classmethod
    def from_config(cls, cfg: Any) -> ObjectiveMix:
        """The mix of a run config (``objective.*`` and ``model.family``)."""
        weights, _ = objective_weights(cfg.objective, family=cfg.model.family)
        return cls(
            weights, chunk_tokens=cfg.objective.loss_chunk_tokens, objective_cfg=cfg.objective
        )

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
        if self.mono_kinds and set(self.mono_kinds) != {"mlm"}:
            options["mono_kinds"] = tuple(self.mono_kinds.items())
        return self.transform, replace(masking, **options)

    # -- a step before the loss --------------------------------------------------------------

    def prepare(self, batch: dict[str, Any], logits_at: Callable[..., torch.Tensor]):
        """The batch after each objective's own step before the loss (``Objective.prepare``:
        BTMLM fills its placeholders with ``logits_at``); the batch itself when none has one."""
        for objective in self.preparing:
            batch = objective.prepare(batch, logits_at)
        return batch

    @property
    def pipeline(self) -> bool:
        """Whether every objective of the mix runs under pipeline parallel."""
        return all(o.pipeline for o in self.objectives)

    # -- targets and groups ------------------------------------------------------------------

    def num_groups(self, num_languages: int) -> int:
        """Token groups (objectives x languages), then two per sentence objective (its
        summed loss and its correct rows, each over its rows) or ELECTRA (the discriminator's
        summed loss and correct tokens, each over the real tokens), one for SpanBERT's
        boundary predictions."""
        scored = 2 if self.scorer is not None else 0
        return len(self.objectives) * num_languages + scored + len(self.boundary)

    @property
    def scores_rows(self) -> bool:
        """Whether a loss beside the token loss scores the batch's rows or tokens
        (:meth:`row_loss`: the run's ``row_scorer`` objective)."""
        return self.scorer is not None

    # -- sentence-level outputs ------------------------------------------------------------

    def model_options(
        self, batch: dict[str, Any] | None = None, device: torch.device | None = None
    ) -> dict[str, Any]:
        """Keyword arguments asking the model for the outputs the objectives score beside the
        token states: the row scorer's (``Objective.model_options``: NSP / SOP's pair logits,
        ELECTRA's labels and sampler, the contrastive objectives' pooled states); for SpanBERT
        the batch's
        span-boundary targets ``span_targets_N4`` (row, left, right, offset of each target of a
        span-masked row, in row-major order), on ``device``."""
        if self.scorer is not None:
            return self.scorer.model_options(batch, device)
        if self.boundary and batch is not None:
            at_N2 = (batch["span_left"] >= 0).nonzero()
            row_N, col_N = at_N2[:, 0], at_N2[:, 1]
            targets_N4 = torch.stack(
                [row_N, batch["span_left"][row_N, col_N].long(),
                 batch["span_right"][row_N, col_N].long(),
                 batch["span_offset"][row_N, col_N].long()], dim=1,
            )  # fmt: skip
            return {"span_targets_N4": targets_N4 if device is None else targets_N4.to(device)}
        return {}

    def extend_targets(
        self,
        labels_BT: torch.Tensor,
        groups_BT: torch.Tensor,
        batch: dict[str, Any],
        *,
        num_groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """With SpanBERT the targets and groups of the outputs the model appends for the
        span-boundary targets (``model_options``): ``[1, B * T + N]``, the appended ones in the
        last of ``num_groups``; else the arguments."""
        if not self.boundary:
            return labels_BT, groups_BT
        at_BT = (batch["span_left"] >= 0).to(labels_BT.device)
        labels_N = labels_BT[at_BT]
        groups_N = torch.full_like(groups_BT[at_BT], num_groups - 1)
        labels = torch.cat([labels_BT.reshape(-1), labels_N])[None]
        return labels, torch.cat([groups_BT.reshape(-1), groups_N])[None]

    def split_outputs(self, outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(token output, the outputs :meth:`row_loss` scores or None)`` of a model call
        made with :meth:`model_options`: the sentence logits (NSP, SOP), the discriminator's
        ``(logits_BT, replaced_BT)`` (ELECTRA)."""
        if self.scores_rows:
            return outputs[0], outputs[1]
        return outputs, None

    def num_rows(self, batch: dict[str, Any]) -> torch.Tensor:
        """What :meth:`row_loss` averages over in a batch (an int64 CPU scalar; 0 without
        such a loss): the row scorer's ``num_rows`` (NSP's rows, ELECTRA's scored tokens,
        the contrastive objectives' examples)."""
        if self.scorer is None:
            return torch.zeros((), dtype=torch.int64)
        return self.scorer.num_rows(batch)

    def row_loss(
        self, scored: Any, batch: dict[str, Any], sums_G: torch.Tensor, counts_G: torch.Tensor
    ) -> torch.Tensor:
        """The row scorer's summed loss of the outputs ``scored`` (:meth:`split_outputs`),
        its metric sum and correct count added in place to the last two groups of ``sums_G``
        and its count to the last two of ``counts_G``."""
        loss, metric, correct, count = self.scorer.row_loss(scored, batch, group=self.group)
        sums_G[-2] += metric
        sums_G[-1] += correct
        counts_G[-2:] += count
        return loss

    def targets(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """The batch's targets (its objectives' shared ``TokenPrediction.targets``)."""
        return self.loss_owner.targets(labels_BT)

    def num_targets(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """The batch's predicted-token count from its CPU labels (no device sync)."""
        return self.loss_owner.num_targets(labels_BT)

    def target_groups(
        self,
        lang_ids_BT: torch.Tensor,
        tokens_mask_BT: torch.Tensor,
        *,
        num_languages: int,
        pair_rows_B: torch.Tensor | None = None,
        row_transform_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, T]`` int64 loss group of every position's target: objective index x languages
        + the target token's language. A row's objective: the one of its transform when
        ``row_transform_B`` gives it (the loader's encoder batches), else by its kind: a pair
        row when ``pair_rows_B`` says so (the loader's ``seq2seq`` batches: a translation
        target is one language), else when its real tokens hold two languages (a TLM row)."""
        if row_transform_B is not None:
            owner_R = self._transform_owner.to(row_transform_B.device)
            objective_B = owner_R[row_transform_B.long()]
            if self.loss_owner.shift_targets:
                lang_ids_BT = torch.cat([lang_ids_BT[:, 1:], lang_ids_BT[:, -1:]], dim=1)
            return objective_B[:, None] * num_languages + lang_ids_BT.long()
        if pair_rows_B is not None:
            is_pair_B = pair_rows_B.bool()
        else:
            tokens_mask_BT = tokens_mask_BT.bool()
            is_pair_B = ((lang_ids_BT != lang_ids_BT[:, :1]) & tokens_mask_BT).any(dim=1)
        if self.loss_owner.shift_targets:
            lang_ids_BT = torch.cat([lang_ids_BT[:, 1:], lang_ids_BT[:, -1:]], dim=1)
        mono, pair = self._row_index["mono"], self._row_index["pair"]
        if mono == pair:
            objective_B = torch.full_like(is_pair_B, mono, dtype=torch.long)
        else:
            objective_B = torch.where(is_pair_B, pair, mono).long()
        return objective_B[:, None] * num_languages + lang_ids_BT.long()

    # -- losses ------------------------------------------------------------------------------

    def token_losses(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Per-token losses ``[B * T]`` (the pipeline's last stage; ``TokenPrediction``)."""
        return self.loss_owner.token_losses(logits_BTV, labels_BT)

    def loss_from_logits(self, logits_BTV, labels_BT, groups_BT, *, num_groups, local=None):
        """``(summed loss, sums_G, counts_G)`` from whole logits (``TokenPrediction``)."""
        kwargs = {} if local is None else {"local": local}
        return self.loss_owner.loss_from_logits(
            logits_BTV, labels_BT, groups_BT, num_groups=num_groups, **kwargs
        )

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
        projection, chunked by ``objective.loss_chunk_tokens`` (``TokenPrediction.loss``)."""
        return self.loss_owner.loss(
            hidden_BTD,
            weight_VD,
            bias_V,
            labels_BT,
            groups_BT,
            num_groups=num_groups,
            chunk_tokens=self.chunk_tokens,
            autocast=autocast,
        )

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
        if self.boundary and float(counts_G[-1]) > 0:
            out["span_boundary_loss"] = {
                self.boundary[0].name: float(sums_G[-1]) / float(counts_G[-1])
            }
        if self.scorer is not None:
            name, kind = self.scorer.name, self.scorer.row_scorer
            scored = float(counts_G[-1])
            if scored > 0:
                out[f"{kind}_loss"] = {name: float(sums_G[-2]) / scored}
                out[f"{kind}_accuracy"] = {name: float(sums_G[-1]) / scored}
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
