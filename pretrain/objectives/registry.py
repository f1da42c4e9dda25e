"""Objective classes and the registry that names them; the run's mix from its config.

What to call: ``objective_weights(cfg.objective, family=cfg.model.family)`` for the mix a config
asks for (``{name: weight}``, deprecated keys resolved), ``OBJECTIVES[name]`` for an objective's
class, ``register(cls)`` to add one (adding an objective touches this package and a loader
transform in ``data_pipeline.transforms``, nothing else).

An objective states what it needs and owns, as class data the trainer and the validation read:

- ``families``: the model families it trains (config validation asks each objective);
- ``transform``: the loader's batch kind it asks for (``data_pipeline.loader``: ``clm`` packed
  causal rows, ``mlm`` BERT-masked rows with a share of TLM pair rows, ``span`` span-masked
  rows, ``seq2seq`` encoder-decoder rows); the objectives of one run share one transform (one
  batch feeds them all);
- ``rows``: which rows of such a batch are its own: ``any``, ``mono`` (one language per row) or
  ``pair`` (a parallel pair, two languages): how a batch's targets are split per objective;
- ``layout`` and ``row_kind``: objectives of one layout mix in one batch, row by row
  (``masked``: MLM, TLM and span masking in the loader's ``mlm`` batch, each row's transform
  named by ``row_kind`` in the batch's ``row_transform``); empty: the transform alone;
- ``shift_targets``: position t predicts token t + 1 (CLM) or the label at t (masked objectives);
- ``sparse_targets``: few positions carry a target (~15%): only those are projected;
- ``loader_options(share)``: what the loader needs from its share of the mix (TLM and
  translation: the share of pair rows; bart: that its rows are denoised);
- ``pipeline``: whether it runs under pipeline parallel (BTMLM's model pass over the whole
  model does not);
- ``prepare(batch, logits_at)``: a step of its own before the loss, given no-grad logits of
  the model at chosen positions (BTMLM fills its placeholders there); none by default;
- ``row_scorer``: the metric name (``sentence``: NSP / SOP, ``rtd``: ELECTRA,
  ``contrastive``: SimCSE / XLCo) of a loss it scores beside the token loss, over rows or
  tokens; such an objective has ``model_options(batch, device)`` (what it asks the model
  for), ``num_rows(batch)`` (what its loss averages over) and ``row_loss(scored, batch,
  group=)`` (the loss and its metric sums); one per run; ``mixes_with``: the only objectives
  it mixes with (None: any of its layout); ``span_boundary``: its targets
  are predicted a second time by SpanBERT's span-boundary head; ``model_settings``: the
  ``model.*`` values it needs (set when left at their defaults);
- ``configure(objective_cfg)``: reads its own ``objective.<name>.*`` settings (none by
  default).

Each objective owns its targets and loss: the token-predicting ones (:class:`TokenPrediction`:
CLM, MLM, TLM, span masking; the encoder-decoder ones, :class:`SequenceToSequence`: T5 span
corruption, BART denoising, translation, whose labels sit on the decoder positions) the
cross-entropy of their targets, summed and binned per loss group; objectives sharing a batch
share that loss (``pretrain.objectives.mix.ObjectiveMix`` checks it and runs it once per
batch).

The mix is ``objective.weights`` (``{mlm: 3, tlm: 1}``: for objectives sharing a batch transform,
each weight is its share of the batch's rows). ``objective.name`` and ``objective.tlm_share`` are
deprecated spellings of the same fact: when given they set the weights (``name: x`` ->
``{x: 1}``; ``tlm_share: s`` -> ``{mlm: 1 - s, tlm: s}``), with a ``FutureWarning`` naming the
weights to write instead. Empty weights mean the family's default objective (decoder: CLM,
encoder: MLM, encoder_decoder: span corruption).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.objectives.losses import IGNORE_INDEX, chunked_cross_entropy


class Objective:
    """One pre-training objective (class data: see the module docstring)."""

    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]
    transform: ClassVar[str]
    rows: ClassVar[str] = "any"
    shift_targets: ClassVar[bool] = False
    sparse_targets: ClassVar[bool] = False
    layout: ClassVar[str] = ""
    row_kind: ClassVar[str | None] = None
    pipeline: ClassVar[bool] = True
    row_scorer: ClassVar[str | None] = None
    mixes_with: ClassVar[tuple[str, ...] | None] = None
    mixes_with_why: ClassVar[str] = ""
    span_boundary: ClassVar[bool] = False
    model_settings: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""

    def loader_options(self, share: float) -> dict[str, Any]:
        """Loader masking options for this objective's ``share`` of the mix (none by default)."""
        return {}

    def configure(self, objective_cfg: Any) -> None:
        """Take this objective's settings from the ``objective`` section (none by default)."""

    # -- a row scorer's part (``row_scorer`` set) --------------------------------------------

    def model_options(self, batch: dict[str, Any] | None, device: torch.device | None) -> dict:
        """Keyword arguments asking the model for the outputs :meth:`row_loss` scores."""
        raise NotImplementedError

    def num_rows(self, batch: dict[str, Any]) -> torch.Tensor:
        """What :meth:`row_loss` averages over in a (CPU) batch: an int64 CPU scalar."""
        raise NotImplementedError

    def row_loss(self, scored: Any, batch: dict[str, Any], *, group=None) -> tuple:
        """``(summed loss to add, its metric sum, correct, count)`` of the model's outputs
        ``scored``; ``group``: the data-parallel process group (None: one rank)."""
        raise NotImplementedError

    prepare: ClassVar[Callable[..., dict[str, Any]] | None] = None
    """``prepare(batch, logits_at) -> batch``, when the objective has a step before the loss:
    ``logits_at(batch, input_ids_BT, where_BT)`` gives the model's no-grad logits ``[N, V]``
    at the True positions of ``where_BT`` for ``input_ids_BT`` with the batch's other model
    inputs (``pretrain.trainer.Trainer.logits_at``)."""


class TokenPrediction(Objective):
    """An objective whose loss is the cross-entropy of predicted tokens at its target positions
    (CLM: every next token; masked objectives: the selected positions). Owns its targets and
    its loss: summed (not averaged) over the targets, so that the trainer can normalise by the
    step's global target count, and binned per loss group in the same pass."""

    def targets(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """Targets of every position, int64 (widened here: the loader's labels are int32, so the
        host moves half the bytes); with ``shift_targets`` position t predicts token t + 1 and
        the last position nothing."""
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
        chunk_tokens: int = 4096,
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
                chunk_tokens=chunk_tokens,
                reduction="sum",
                group_N=group_N,
                num_groups=num_groups,
            )
        zeros_G = torch.zeros(num_groups, dtype=torch.float32, device=labels_N.device)
        counts_G = zeros_G.index_add(0, group_N, valid_N.float())
        return sums_G.sum(), sums_G.detach(), counts_G


OBJECTIVES: dict[str, type[Objective]] = {}
"""Objective name (an ``objective.weights`` key) -> its class, in registration order."""
DEFAULT_OBJECTIVE: dict[str, str] = {
    "decoder": "clm",
    "encoder": "mlm",
    "encoder_decoder": "t5",
}
"""The objective of a family whose config names none."""


def register(cls: type[Objective]) -> type[Objective]:
    """Add ``cls`` to :data:`OBJECTIVES` under ``cls.name`` (a class decorator)."""
    if cls.rows not in ("any", "mono", "pair"):
        raise ValueError(f"objective {cls.name!r}: rows ({cls.rows!r}) must be any, mono or pair")
    OBJECTIVES[cls.name] = cls
    return cls


@register
class CausalLM(TokenPrediction):
    """Causal language modelling: every position predicts the next token (GPT)."""

    name = "clm"
    families = ("decoder",)
    transform = "clm"
    rows = "any"
    shift_targets = True
    description = "causal LM (decoder)"


@register
class MaskedLM(TokenPrediction):
    """Masked language modelling on monolingual rows: BERT's 80/10/10 (optionally whole-word)
    masking, loss at the selected positions."""

    name = "mlm"
    families = ("encoder",)
    transform = "mlm"
    rows = "mono"
    layout = "masked"
    row_kind = "mlm"
    sparse_targets = True
    description = "masked LM, BERT 80/10/10 (encoder)"


@register
class TranslationLM(TokenPrediction):
    """Translation language modelling (XLM): masked LM on a parallel pair packed as one row
    (``src </s> tgt </s>``, positions restarting at the target, per-token language ids)."""

    name = "tlm"
    families = ("encoder",)
    transform = "mlm"
    rows = "pair"
    layout = "masked"
    row_kind = "pair"
    sparse_targets = True
    description = "translation LM on parallel pairs, XLM (encoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"tlm_share": share}


@register
class SpanMasking(TokenPrediction):
    """SpanBERT span masking on monolingual rows: whole-word spans with Geometric(0.2) lengths
    clipped at 10 words until ``objective.mask_prob`` of the tokens are selected, one 80/10/10
    choice per span (``objective.mask_replace_prob`` / ``mask_random_prob``); the loss is the
    masked LM loss at the selected positions (the span-boundary objective is not built)."""

    name = "span"
    families = ("encoder",)
    transform = "span"
    rows = "mono"
    layout = "masked"
    row_kind = "span"
    sparse_targets = True
    description = "span masking, SpanBERT (encoder)"


@register
class BackTranslationMLM(TokenPrediction):
    """ERNIE-M back-translation masked LM (Ouyang et al. 2021) on monolingual rows
    (``transforms.btmlm_rows``: ``R </s> <lang:t> <mask> * n </s>``). First step: the model
    fills the n placeholders of another language from the unmasked row, in one no-grad pass,
    each with its argmax id (special ids excluded): a pseudo translation. Second step: masked
    LM over the BERT-masked ``R`` with that pseudo translation as context; the loss is the
    cross-entropy at the masked positions of ``R`` (none on the pseudo translation). The
    first pass runs the model in eval mode (no dropout, no MoE load statistics); it costs one
    more forward per batch, which the logged MFU does not count. Not under pipeline parallel
    (the pass needs the whole model on one rank)."""

    name = "btmlm"
    families = ("encoder",)
    transform = "btmlm"
    rows = "any"
    row_kind = "btmlm"
    sparse_targets = True
    pipeline = False
    description = "back-translation masked LM, ERNIE-M (encoder)"

    def prepare(self, batch: dict[str, Any], logits_at: Callable[..., torch.Tensor]):
        """The batch with its placeholders filled: ``input_ids`` on the logits' device."""
        where_BT = batch["placeholder_mask"]
        logits_NV = logits_at(batch, batch["btmlm_source_ids"], where_BT)
        device = logits_NV.device
        logits_NV[:, batch["placeholder_excluded"].to(device)] = float("-inf")
        fill_N = logits_NV.argmax(dim=-1)
        input_ids = batch["input_ids"].to(device).clone()
        input_ids[where_BT.to(device)] = fill_N.to(input_ids.dtype)
        return {**batch, "input_ids": input_ids}


class SentencePair(TokenPrediction):
    """A sentence-pair objective on segment-pair rows (``transforms.segment_pairs``): masked LM
    over both segments (the token loss, as MLM) plus the cross-entropy of the model's 2-way
    pair logits (``model.pair_head``: the pooled ``<cls>`` state) against the row's
    ``pair_label``; the loss is their two means added (BERT's pre-training loss). Needs
    segment embeddings and the pair head (set when the model config leaves them at their
    defaults). Not under pipeline parallel (the head reads the last stage's first position)."""

    families = ("encoder",)
    rows = "mono"
    sparse_targets = True
    pipeline = False
    row_scorer = "sentence"
    sentence_label = "pair_label"  # the batch key of each row's label
    model_settings = {"type_vocab_size": 2, "pair_head": True}

    def model_options(self, batch, device):
        return {"return_pair_logits": True}

    def num_rows(self, batch):
        return torch.tensor(batch[self.sentence_label].numel(), dtype=torch.int64)

    def row_loss(self, scored, batch, *, group=None):
        """The summed cross-entropy of the pair logits ``scored`` against the rows' labels;
        its correct rows and the row count."""
        labels_B = batch[self.sentence_label].to(scored.device).long()
        loss = F.cross_entropy(scored.float(), labels_B, reduction="sum")
        correct = (scored.detach().argmax(dim=-1) == labels_B).float().sum()
        return loss, loss.detach(), correct, float(labels_B.numel())


@register
class NextSentencePrediction(SentencePair):
    """BERT's next sentence prediction: label 0 when B follows A in the text, 1 when B comes
    from another row of the language (another document)."""

    name = "nsp"
    transform = "nsp"
    description = "masked LM + next sentence prediction, BERT (encoder)"


@register
class SentenceOrderPrediction(SentencePair):
    """ALBERT's sentence order prediction: two consecutive segments, label 0 in their order,
    1 swapped."""

    name = "sop"
    transform = "sop"
    description = "masked LM + sentence order prediction, ALBERT (encoder)"


@register
class SpanBERT(SpanMasking):
    """SpanBERT entire: span masking plus the span-boundary objective (SBO). Each masked token
    of a span is predicted twice, from its own state (MLM) and from the states just outside its
    span with its offset in it (``model.span_boundary_positions``: the SBO head, set to 32
    when left at 0); the loss is the two cross-entropies summed over the masked tokens, over
    their count (SpanBERT's L = L_MLM + L_SBO per token). The metrics add
    ``span_boundary_loss``. Not under pipeline parallel (the head reads the last stage's
    states)."""

    name = "spanbert"
    span_boundary = True
    pipeline = False
    model_settings = {"span_boundary_positions": 32}
    description = "span masking + span-boundary objective, SpanBERT (encoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"span_boundary": True}


@register
class ReplacedTokenDetection(TokenPrediction):
    """ELECTRA (Clark et al. 2020) on monolingual rows (BERT-masked: row kind ``electra``). The
    generator (``model.generator_fraction``, set to
    0.25 when left at 0: a narrower stack over the shared embeddings) is trained with masked
    LM on the loader's masked rows; a replacement for each masked position is sampled from its
    softmax (``objective.electra.temperature``; no gradient), and the model (the
    discriminator) reads the rows with those replacements and predicts, at every real token,
    whether it differs from the original (a sampled original counts as not replaced). The loss
    is the generator's cross-entropy over the masked tokens, over their count, plus
    ``objective.electra.disc_weight`` (ELECTRA: 50) times the discriminator's binary
    cross-entropy over the real tokens of its rows, over their count. The metrics add
    ``rtd_loss`` and ``rtd_accuracy``. Mixed with ``mlm``, ``span`` or ``tlm`` rows (row by
    row), those train the generator's masked LM only (it is the model's masked-LM head); the
    discriminator scores ELECTRA's rows alone. ELECTRA masks with 85% mask token, 15% kept
    (``mask_replace_prob`` 0.85, ``mask_random_prob`` 0: the presets). Samples are seeded by
    each row's token ids (``sampler``), so parallel layouts draw as one process and a resumed
    run draws the same. Not under pipeline parallel (the second pass needs the whole
    model)."""

    name = "electra"
    families = ("encoder",)
    transform = "mlm"
    rows = "mono"
    layout = "masked"
    row_kind = "electra"
    sparse_targets = True
    pipeline = False
    row_scorer = "rtd"
    mixes_with = ("electra", "mlm", "span", "tlm")
    mixes_with_why = "their rows train its generator"
    model_settings = {"generator_fraction": 0.25}
    description = "replaced token detection, ELECTRA (encoder)"

    disc_weight: float = 50.0
    temperature: float = 1.0

    def configure(self, objective_cfg: Any) -> None:
        options = getattr(objective_cfg, "electra", None)
        if options is not None:
            self.disc_weight = float(options.disc_weight)
            self.temperature = float(options.temperature)

    def sampler(
        self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``sample(logits_MV) -> ids_M`` for the masked positions (``labels_BT >= 0``, in
        row-major order) of a batch: inverse-CDF sampling from the softmax at ``temperature``
        with one uniform number per position, drawn on the CPU from a generator seeded by its
        row's token ids. So a row draws the same whichever batch, rank or micro-batch holds it
        (data and tensor parallel runs match one process; a resumed run draws the same)."""
        ids = input_ids_BT.cpu().numpy()
        masked = (labels_BT.cpu() >= 0).numpy()
        draws = [
            np.random.default_rng(zlib.crc32(row.tobytes())).random(int(at.sum()))
            for row, at in zip(ids, masked)
        ]
        uniform_M = torch.from_numpy(np.concatenate(draws) if draws else np.zeros(0))
        temperature = self.temperature

        def sample(logits_MV: torch.Tensor) -> torch.Tensor:
            if logits_MV.shape[0] != uniform_M.numel():
                raise ValueError(
                    f"ELECTRA's sampler: {logits_MV.shape[0]} masked positions, the batch has "
                    f"{uniform_M.numel()}"
                )
            out = []
            uniform = uniform_M.to(logits_MV.device, torch.float32)
            for start in range(0, logits_MV.shape[0], 1024):  # bounds the [rows, V] CDF
                probs = torch.softmax(logits_MV[start : start + 1024].float() / temperature, -1)
                cdf = probs.cumsum(dim=-1)
                at = uniform[start : start + 1024, None] * cdf[:, -1:]
                out.append(torch.searchsorted(cdf, at).squeeze(1).clamp(max=cdf.shape[1] - 1))
            return torch.cat(out) if out else uniform.long()

        return sample

    def model_options(self, batch, device):
        """The original ids at the masked positions (``rtd_labels_BT``: the batch's labels)
        and the generator's sampler (``rtd_sample``)."""
        if batch is None:
            return {}
        labels_BT = batch["labels"]
        if device is not None:
            labels_BT = labels_BT.to(device, non_blocking=True)
        return {"rtd_labels_BT": labels_BT,
                "rtd_sample": self.sampler(batch["input_ids"], batch["labels"])}  # fmt: skip

    def scored_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B, T]`` bool: the real tokens of the batch's ELECTRA rows (all its rows
        without a ``row_transform``)."""
        from data_pipeline.transforms import ROW_TRANSFORMS

        real = batch.get("attention_mask")
        real_BT = (
            torch.ones(batch["input_ids"].shape, dtype=torch.bool) if real is None else real.bool()
        )
        rows = batch.get("row_transform")
        if rows is not None:
            real_BT = real_BT & (rows == ROW_TRANSFORMS.index(self.row_kind))[:, None].to(
                real_BT.device
            )
        return real_BT

    def num_rows(self, batch):
        return self.scored_tokens(batch).sum()

    def row_loss(self, scored, batch, *, group=None):
        """``disc_weight`` times the discriminator's summed BCE over the scored tokens
        (``scored``: its ``(logits_BT, replaced_BT)``); the unweighted sum, correct tokens and
        their count."""
        logits_BT, replaced_BT = scored
        real = self.scored_tokens(batch).to(replaced_BT.device, non_blocking=True).float()
        loss_BT = F.binary_cross_entropy_with_logits(
            logits_BT.float(), replaced_BT.float(), reduction="none"
        )
        loss = (loss_BT * real).sum()
        correct = (((logits_BT.detach() > 0) == replaced_BT).float() * real).sum()
        return loss * self.disc_weight, loss.detach(), correct, real.sum()


ROW_KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "lang_ids", "attention_mask",
            "row_transform", "token_type_ids")  # fmt: skip
"""The per-row ``[B, ...]`` keys of an encoder batch that a contrastive layout rearranges."""


class SentenceContrast(TokenPrediction):
    """A contrastive sentence objective on rows of a masked-layout batch (mixed row by row with
    the token objectives, which score the other rows): its ``prepare`` lays out two rows per
    example (``contrast_a`` / ``contrast_b`` row indices of the prepared batch); the model's
    mean-pooled final states of those rows (``Transformer.forward``'s ``return_pooled_BT``)
    are contrasted with in-batch negatives gathered over the data-parallel ranks
    (``pretrain.objectives.contrastive``) at ``objective.contrastive.temperature`` (0.05). The
    loss, summed over examples and divided by the step's global count, is added to the token
    loss of the other rows; the metrics add ``contrastive_loss`` and ``contrastive_accuracy``
    (top-1 in-batch retrieval). Not under pipeline parallel (the pooled states are the last
    stage's)."""

    families = ("encoder",)
    transform = "mlm"
    layout = "masked"
    sparse_targets = True
    pipeline = False
    row_scorer = "contrastive"
    temperature: float = 0.05

    def configure(self, objective_cfg: Any) -> None:
        options = getattr(objective_cfg, "contrastive", None)
        if options is not None:
            self.temperature = float(options.temperature)

    def rows_of(self, row_transform_B: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the batch's rows this objective takes."""
        from data_pipeline.transforms import ROW_TRANSFORMS

        return row_transform_B == ROW_TRANSFORMS.index(self.row_kind)

    loss_name: ClassVar[str]  # the loss of pretrain.objectives.contrastive

    def model_options(self, batch, device):
        """The real tokens the model's pooled states average (``return_pooled_BT``)."""
        if batch is None:
            return {}
        real_BT = batch["attention_mask"]
        return {"return_pooled_BT": real_BT if device is None else real_BT.to(device)}

    def num_rows(self, batch):
        return self.rows_of(batch["row_transform"]).sum()

    def row_loss(self, scored, batch, *, group=None):
        """The contrastive loss of the pooled states ``scored`` of the prepared batch's row
        pairs (``contrast_a`` / ``contrast_b``), how many queries retrieve their partner
        first among the gathered keys, and the pair count."""
        from pretrain.objectives import contrastive

        a_ND = scored[batch["contrast_a"].to(scored.device)]
        b_ND = scored[batch["contrast_b"].to(scored.device)]
        loss_fn = getattr(contrastive, self.loss_name)
        loss, correct = loss_fn(a_ND, b_ND, temperature=self.temperature, group=group,
                                return_correct=True)  # fmt: skip
        return loss, loss.detach(), correct, float(a_ND.shape[0])


def _append_rows(batch: dict[str, Any], rows: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``batch`` with ``rows`` (per-row keys, ``[R, ...]``) after its rows."""
    out = dict(batch)
    for key, extra in rows.items():
        out[key] = torch.cat([batch[key], extra.to(batch[key].dtype)])
    return out


@register
class SimCSE(SentenceContrast):
    """Unsupervised SimCSE (Gao et al. 2021) on monolingual rows (row kind ``simcse``, left
    unmasked by the loader): each row is fed twice in one forward (SimCSE's own layout: the
    copies after the batch's rows), so that dropout gives two views; a row's positive is its
    other view, its negatives the other rows' (InfoNCE). Needs ``model.dropout`` > 0."""

    name = "simcse"
    rows = "mono"
    row_kind = "simcse"
    loss_name = "simcse_loss"
    description = "unsupervised SimCSE, two dropout views (encoder)"

    def prepare(self, batch: dict[str, Any], logits_at: Callable[..., torch.Tensor]):
        rows = self.rows_of(batch["row_transform"]).nonzero().squeeze(1)
        size = batch["input_ids"].shape[0]
        copies = {k: batch[k][rows] for k in ROW_KEYS if batch.get(k) is not None}
        out = _append_rows(batch, copies)
        out["contrast_a"] = rows
        out["contrast_b"] = torch.arange(size, size + len(rows))
        return out


@register
class CrossLingualContrast(SentenceContrast):
    """Cross-lingual contrast on parallel pairs (InfoXLM's XLCo with in-batch negatives,
    LaBSE's bidirectional translation ranking): each pair row of the loader (``src </s> tgt
    </s>``, left unmasked: ``MaskingConfig.unmasked_pairs``) is split into a source row and
    a target row encoded apart (the target's positions restart at 0 as in the pair
    row); each side ranks its translation among the other side of every pair of the
    data-parallel batch, both directions summed."""

    name = "xlco"
    rows = "pair"
    row_kind = "pair"
    loss_name = "translation_ranking_loss"
    description = "cross-lingual contrast on parallel pairs, XLCo / LaBSE ranking (encoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"tlm_share": share, "unmasked_pairs": True}

    def prepare(self, batch: dict[str, Any], logits_at: Callable[..., torch.Tensor]):
        rows = self.rows_of(batch["row_transform"]).nonzero().squeeze(1)
        keys = [k for k in ROW_KEYS if batch.get(k) is not None]
        # every per-row key copied: shared loader tensors are read-only
        out = {**batch, **{k: batch[k].clone() for k in keys}}
        size, width = out["input_ids"].shape
        real_RT = out["attention_mask"][rows].bool()
        lang_RT = out["lang_ids"][rows]
        src_RT = real_RT & (lang_RT == lang_RT[:, :1])
        n_tgt_R1 = (real_RT & ~src_RT).sum(dim=1, keepdim=True)
        # the target side moved to the start of a row of its own
        take_RT = (torch.arange(width) + src_RT.sum(dim=1, keepdim=True)).clamp(max=width - 1)
        kept_RT = torch.arange(width) < n_tgt_R1
        targets = {
            k: out[k][rows].gather(1, take_RT) if out[k].dim() == 2 else out[k][rows] for k in keys
        }
        for side, index, mask in ((out, rows, src_RT), (targets, slice(None), kept_RT)):
            side["attention_mask"][index] = mask.to(side["attention_mask"].dtype)
            side["labels"][index] = IGNORE_INDEX
            if "doc_ids" in keys:
                side["doc_ids"][index] = torch.where(mask, 0, -1).to(side["doc_ids"].dtype)
        out = _append_rows(out, targets)
        out["contrast_a"] = rows
        out["contrast_b"] = torch.arange(size, size + len(rows))
        return out


class SequenceToSequence(TokenPrediction):
    """An encoder-decoder objective: the loader's ``seq2seq`` rows (source ids for the encoder;
    decoder inputs and their labels, aligned: position t of the decoder predicts label t, so
    no shift), the cross-entropy of every real target token. Objectives of this kind share
    one batch: at most one of them takes the monolingual rows, translation the pair rows."""

    families = ("encoder_decoder",)
    transform = "seq2seq"
    shift_targets = False
    sparse_targets = False


@register
class SpanCorruption(SequenceToSequence):
    """T5 span corruption on monolingual rows: ``objective.t5.noise_density`` of
    each row's tokens in spans of mean length ``mean_span``, each span one sentinel
    (``<extra_id_k>``) in the source; the target is the spans behind their sentinels, ending
    in eos; the decoder starts with pad (T5's ``decoder_start_token_id``). Rows are cut to
    T5's raw length, so that the sources fill ``data.seq_len``."""

    name = "t5"
    rows = "mono"
    description = "T5 span corruption (encoder_decoder)"


@register
class Denoising(SequenceToSequence):
    """BART / mBART denoising on monolingual rows (``objective.bart.*``: text infilling
    with Poisson span lengths, sentence permutation, optional rotation); the target is the
    row's text. mBART (``objective.bart.language_token``): the row's ``<lang:xx>`` token
    ends source and target and starts the decoder; BART: eos starts it."""

    name = "bart"
    rows = "mono"
    description = "BART / mBART denoising (encoder_decoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"denoise_share": share}


@register
class PrefixLM(SequenceToSequence):
    """Prefix language modelling on monolingual rows (T5's "prefix LM" objective, the
    encoder-decoder's causal LM): each raw cut of ``min(S, T) - 1`` tokens is split at a
    uniform point, the prefix (with eos) read by the encoder, the rest (with eos) predicted by
    the decoder, which starts with pad (T5's ``decoder_start_token_id``)."""

    name = "prefix_lm"
    rows = "mono"
    description = "prefix LM, T5 (encoder_decoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"prefix_lm": True}


@register
class Translation(SequenceToSequence):
    """Translation on parallel pairs, both directions (``data.tlm_swap_prob`` of the pairs
    run target to source): the source side (``side </s>``) for the encoder, the other side as
    the target; the target language's ``<lang:xx>`` token starts the decoder (it is given,
    never predicted), so one model translates into the language it is told."""

    name = "translation"
    rows = "pair"
    description = "translation of parallel pairs, both directions (encoder_decoder)"

    def loader_options(self, share: float) -> dict[str, Any]:
        return {"tlm_share": share}


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
