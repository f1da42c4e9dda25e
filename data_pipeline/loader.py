"""The streaming loader: language-mixed CLM / MLM / TLM / encoder-decoder batches from a shard
manifest, resumable.

What to call: ``build_loader(cfg.data, dp_rank=r, dp_world_size=n, objective=..., masking=...,
seed=train.seed)`` (``cfg.data`` a ``data_pipeline.config.DataConfig``) gives rank ``r``'s
:class:`StreamingLoader`; iterate it for batches (the contract below), and save / restore it
with ``state_dict()`` / ``load_state_dict()``. ``StreamingDataset`` takes the same settings as
keyword arguments, for tests and benchmarks.

Guarantees: every batch follows the contract below; every global batch (all dp ranks' batches
of one step) mixes languages by p_l within about one row, whatever the dp size; a resume with
the rank's own state gives, bit for bit, the batches an uninterrupted run gives; an elastic
resume (new dp size or worker count) neither loses nor repeats a document of the current pass.
The sections below argue each point.

Shape legend: ``B`` sequences per batch (``batch_size``), ``T`` tokens per sequence (``seq_len``),
``L`` languages (``dataset.languages``: the run's language index, the tokenizer's language list,
so that a training and a validation manifest of one tokenizer map every language alike).

Batch contract (every objective; a dict of CPU torch tensors)::

    input_ids       [B, T]  int32  model input: CLM the packed ids; MLM/TLM after masking
    labels          [B, T]  int32  CLM: the input_ids tensor itself (the model shifts
                                   internally; CLM rows have no padding); MLM/TLM: the
                                   original id at masked positions, -100 elsewhere
    position_ids    [B, T]  int32  CLM/MLM: 0..T-1, or restarting at each document when
                                   reset_position_ids (and at 0 of every row); TLM: restarting
                                   at the source and at the target of every pair; 0 on padding
    doc_ids         [B, T]  int32  0, 1, 2, ... per document (TLM: per pair) within each row,
                                   for per-document attention masks (equal id = same
                                   document); -1 on padding
    lang_ids        [B, T]  int32  index into dataset.languages of each token's language (XLM
                                   language embeddings; TLM: source and target languages)
    attention_mask  [B, T]  bool   True on tokens, False on padding (CLM and mono MLM rows have
                                   no padding)
    tokens_per_lang [L]     int64  non-padding tokens of each language in this batch (this
                                   rank's: the global step's count is the sum over dp ranks)
    row_transform   [B]     int32  encoder rows (``mlm``, ``span``, ``btmlm``): each row's
                                   transform, an index into ``transforms.ROW_TRANSFORMS``
                                   (pair = TLM, mlm, span, btmlm)
    span_left, span_right, span_offset
                    [B, T]  int32  with ``masking.span_boundary``: at a span-masked target,
                                   the positions just outside its span and its offset in it
                                   (SpanBERT's span-boundary objective); -1 elsewhere
    docs_per_lang   [L]     int64  documents starting in this batch per language (TLM: pairs,
                                   counted under the source language)

Encoder-decoder batches (objective ``seq2seq``) hold a source side of ``S = seq_len`` positions
and a decoder side of ``G`` positions (``Seq2SeqConfig.lengths``: T5's targets length for span
corruption alone, else ``S``; ``objective.decoder_len`` sets it)::

    input_ids              [B, S]  int32  source ids (pad after the row's tokens)
    doc_ids                [B, S]  int32  per row: 0 for a monolingual row, k for the k-th
                                          pair of a translation row; -1 on padding
    lang_ids               [B, S]  int32  language of each source token
    attention_mask         [B, S]  bool   True on source tokens
    decoder_input_ids      [B, G]  int32  the labels shifted right behind the decoder start:
                                          pad (T5 rows), ``<lang:xx>`` of the target language
                                          (translation, mBART rows), eos (BART rows)
    labels                 [B, G]  int32  aligned with decoder_input_ids (no shift); -100 on
                                          padding
    decoder_doc_ids        [B, G]  int32  the source's document id of each target token
                                          (pairs a packed source with its target); -1 padding
    decoder_lang_ids       [B, G]  int32  language of each target token
    decoder_attention_mask [B, G]  bool   True on target tokens
    pair_rows              [B]     bool   the translation rows (the first ones)
    tokens_per_lang, docs_per_lang        as above: the raw text tokens read per language (a
                                          monolingual row's raw tokens; both sides of a pair)

ERNIE-M BTMLM batches (objective ``btmlm``) are monolingual rows laid out by
``transforms.btmlm_rows``: a raw cut ``R`` of the stream of ``n = (T - 3) // 2`` tokens, then
``</s> <lang:t> <mask> * n </s>`` and padding, ``t`` another language of the manifest's mono
data (drawn per row from the slot's generator); the contract's keys (``input_ids``: ``R``
BERT-masked; ``labels`` on ``R`` only; ``position_ids`` restarting at ``<lang:t>``, as a TLM
target; ``lang_ids`` ``t`` from there on; ``doc_ids`` 0 on the row, -1 on padding), plus::

    btmlm_source_ids     [B, T]  int32  the row before masking (what the model fills from)
    placeholder_mask     [B, T]  bool   the n placeholders the model fills
    placeholder_excluded [K]     int64  ids never filled in (the vocabulary's special ids)

NSP / SOP batches (objectives ``nsp``, ``sop``) are monolingual rows ``<cls> A <sep> B <sep>``
from raw cuts of ``T - 3`` tokens (``transforms.segment_pairs``: the split at a document or
sentence boundary, NSP negatives from another row of the language in the batch, SOP negatives
swapped), BERT-masked; the contract's keys plus::

    token_type_ids  [B, T]  int32  0 on <cls>, A and its <sep>; 1 on B and the last <sep>
    pair_label      [B]     int64  NSP: 0 B follows A, 1 B from elsewhere; SOP: 0 in order,
                                   1 swapped

Rows: translation rows pack whole pairs (a pair's first side, ``side </s>``, in the source
row; the other side in the labels; the direction drawn per pair with ``tlm_swap_prob``, as for
TLM); a monolingual row is a raw cut of the stream (``doc </s> doc ...``) of T5's raw length,
span-corrupted (``transforms.span_corrupt``, sentinels from the tokenizer), or, with
``masking.denoise_share`` > 0, of ``min(S, G) - 1`` tokens (less mBART's language token),
denoised (``transforms.denoise``; eos appended unless the cut ends in one). Translation rows
come first in a batch, ``masking.tlm_share`` of the global rows, scheduled and dealt as TLM rows.

Per-token tensors are int32, half the bytes of int64 to build and to copy (every id, position
and count fits): embedding lookups, RoPE and comparisons take int32 on CPU and CUDA, but
cross-entropy needs int64 targets, so consumers widen ``labels`` with ``.long()`` on their
device, after the copy (``pretrain.trainer`` does). Batch tensors are read-only to consumers:
a CLM batch's ``labels`` is its ``input_ids`` tensor, and every batch without position resets
and padding (CLM and mono MLM by default) carries the same ``position_ids`` and
``attention_mask`` tensors as the slot's other such batches.

Documents are joined with eos (``doc </s> doc </s> ...``: mono samples are stored that way, see
``data_pipeline.shard_format``; older samples are joined on read) and cut into rows of exactly
``T`` tokens: no token is lost, except that a document's remainder shorter than
``min_carry_tokens`` is dropped instead of opening the next row (counted in ``dropped_tokens``).
A row's document starts are the positions after its eos ids (and its first position when a
document starts there).
TLM rows are whole pairs ``src </s> tgt </s>`` packed greedily and padded; a pair longer than
``T`` is cut, both sides keeping their eos (counted in ``truncated_tokens``). Each pair puts its
target side first (``tgt </s> src </s>``: tokens, language ids and positions) with probability
``tlm_swap_prob`` (XLM trains both directions), drawn per pair from ``(seed, source, stream
position)`` alone: a sample read again after a resume, or dealt to another slot, is the same.

Language mixing: every row comes from one source (language, or language pair for TLM) with
p_l = q_l^alpha / sum_k q_k^alpha, q_l = n_l / N, n_l = the source's tokens in the manifest (or
explicit weights), along one *global* row sequence per kind of row (mono rows; pair rows), a
pure function of the p_l (``sampling.RowSchedule``): row m of source l has the key
``(m + 0.5) / p_l`` and the sequence is every (l, m) sorted by key, ties by source order. Any
window of N consecutive rows then holds N p_l rows of source l within about one row (the
argument is in ``RowSchedule``; 28 languages, dp 4, measured: at most 1.24 rows off over any
window), and the sources of any range of rows come in closed form, so no rank needs another's
state or a message. Pair rows are scheduled by rows, not by the tokens they fill (a TLM row is
padded after its last whole pair).

Real and synthetic pairs: a pair set marked ``"synthetic": true`` in the manifest (or whose
shard entries are: the back-translation job's output, kept apart as ``<pair>+synthetic`` when
merged with real shards of the same name, the name ``pair_weights`` and the counters use) is by
default sampled like a real one. With ``synthetic_ratio`` r the pair sources' p are
``(1 - r) p_l`` over the real sets and ``r p_l`` over the synthetic ones, each p_l smoothed (or
weighted) within its pool, so r of the pair rows are synthetic within about one row;
``parallel_upsample`` U instead multiplies the real sets' smoothed weights by U before
normalising (fairseq's ``--upsample-primary``: at alpha 1, real rows / synthetic rows =
U n_real / n_synthetic). The p stay a pure function of the config, so the schedule and exact
resume are unchanged; ``counters["pair_tokens"]`` counts the text tokens read per pair source.

Global steps and dealing: global step k of a generation covers the global rows ``[R0 + k G,
R0 + (k + 1) G)``, G = dp_world_size x B. Pair rows before global row R are
``floor(R * tlm_share)`` (mono rows: the rest), so a step holds exactly its share of TLM rows;
they are the window's first positions. Rank r takes the window positions
``perm[r B : (r + 1) B]``, ``perm`` a pseudo-random permutation of G keyed by
``(seed, R0 + k G)`` (``sampling.permuted_positions``: only the rank's B entries are
computed), sorted, so its TLM rows come first (a rank's TLM row count varies from batch to
batch; the global one does not). The permutation is needed: dealt contiguously, the
sequence's period aligns with the ranks (p = 1/3 each, B = 2, dp = 3: rank 0 gets A, B forever
and never reads C, and the part of C's data its slots own is never read). Every global batch
thus follows p_l, and the ranks emit different sequences. With W slots per rank, rank batch k
comes from local slot k % W, so slot j's n-th batch of the generation is global step
``n W + j``: a function of the slot's own state. A slot plans the sources of its next batches
in one go: one sort of the keys of up to ``PLAN_ROWS`` global rows, or, when that would cover
fewer than ``SPAN_MIN_STEPS`` of its steps (large W G), each of its rows looked up alone from
the closed-form counts, so that the cost per batch is O(B L) whatever the dp size.

Shards, slots and passes: see ``data_pipeline.slot_streams``. A rank with ``num_workers`` W runs W
slots (one per DataLoader worker, or round-robin in process when W = 0 gives one slot), and
batch ``k`` of the rank comes from local slot ``(next_worker + k) % W``: the same batches with
or without worker processes.

State (``state_dict()``, plain Python values, picklable, JSON-able)::

    {"format": "rosetta-loader/2", "seed", "fingerprint" (sha256 of the manifest's shard list),
     "dp_rank", "dp_world_size", "num_workers", "num_slots", "batch_size", "next_worker",
     "slots": [{"slot": global slot id, "generation", "row0" (R0: the generation's first
                global row), "rng" (numpy PCG64 state), "batches" (in the generation),
                "counters": {...}, "streams": {source: {"ranges", "buffer", "partials"}},
                "segments" (nsp only: language -> the last row's B segment)}, ...]}

(``rosetta-loader/1`` states, of the per-slot schedule, are refused with a one-line error.)

Exact resume: ``load_state_dict(own state)`` with the same dp world size and worker count gives
the batches an uninterrupted run gives, bit for bit. Elastic resume: pass the list of every old
rank's state (``load_state_dict([state_rank0, state_rank1, ...])``) to every new rank; the
streams are pooled and dealt over the new slots (``slot_streams.redistribute``) so that no document
of the current pass is lost or repeated, and a new generation starts at ``R0' = R0 + B x (the
old slots' batches in the generation)``: the new layout continues the same global row sequence
after the rows the old one consumed. A new batch size on the same layout does the same from
the rank's own state (the ranks ran in step).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig, check_pair_mix
from data_pipeline.manifest import SYNTHETIC_SUFFIX, load_manifest, manifest_path
from data_pipeline.sampling import (
    RowSchedule,
    check_alpha,
    hashed_u64,
    language_probabilities,
    permuted_positions,
)
from data_pipeline.shard_format import ShardReader
from data_pipeline.slot_streams import Source, StreamState, redistribute, source_seed
from data_pipeline.transforms import (
    ID_DTYPE,
    IGNORE_INDEX,
    ROW_TRANSFORMS,
    DenoisingConfig,
    MaskingConfig,
    Seq2SeqConfig,
    SpanMaskingConfig,
    Vocab,
    boundaries_from_starts,
    btmlm_rows,
    btmlm_source_len,
    decoder_inputs,
    denoise,
    join_mono,
    join_pairs,
    mask_tokens,
    segment_pairs,
    span_corrupt,
    span_mask,
)

log = logging.getLogger(__name__)

# how an ``mlm`` batch's rows of each transform are masked: BERT's rule (TLM pairs, MLM rows,
# ELECTRA's generator rows), SpanBERT's spans, or not at all (SimCSE's sentence rows; XLCo's
# pairs: ``masking.unmasked_pairs``)
MASK_RULE = {"pair": "bert", "mlm": "bert", "electra": "bert", "span": "span", "simcse": "none"}
STATE_FORMAT = "rosetta-loader/2"
PLAN_ROWS = 8192
"""Global rows a slot plans in one go (the sources of its next batches: one sort of the keys)."""
SPAN_MIN_STEPS = 32
"""Fewer of the slot's steps than this in ``PLAN_ROWS`` rows: its rows are looked up alone
(measured per batch, 8 rows a rank, one worker: sorting the span ~5 us at dp 4, ~23 at dp 32,
~45 at dp 64, ~640 at dp 1024; lookups ~17 us at any dp)."""
SPARSE_STEPS = 64
"""Steps a slot plans in one go when its rows are looked up alone."""
OBJECTIVES = ("clm", "mlm", "span", "seq2seq", "btmlm", "nsp", "sop")
"""Batch kinds: ``clm`` packed causal rows; ``mlm`` BERT-masked rows (and TLM pair rows);
``span`` SpanBERT span-masked rows (``transforms.span_mask``: whole-word spans, geometric
lengths, 80/10/10 per span), packed like ``mlm``; ``seq2seq`` encoder-decoder rows (T5 span
corruption or BART denoising of monolingual rows, translation pair rows: see below);
``btmlm`` ERNIE-M back-translation masked LM rows; ``nsp`` / ``sop`` BERT / ALBERT segment pairs
(see below)."""
BAD_SHARD_POLICIES = ("skip", "raise")
SPAN_BOUNDARY_KEYS = ("left_BT", "right_BT", "offset_BT")
"""``transforms.span_mask``'s span-boundary tables, as the batch's span_left / span_right /
span_offset."""
COUNTER_KEYS = ("dropped_tokens", "truncated_tokens", "bad_samples")


def _fresh_counters(languages: list[str], pairs: list[str] = ()) -> dict:
    return {
        "tokens": dict.fromkeys(languages, 0),
        "documents": dict.fromkeys(languages, 0),
        # text tokens read per pair set (TLM / translation rows; states before it lack the key)
        "pair_tokens": dict.fromkeys(pairs, 0),
        **dict.fromkeys(COUNTER_KEYS, 0),
    }


def _add_counters(into: dict, other: dict) -> None:
    for key in ("tokens", "documents", "pair_tokens"):
        for lang, n in other.get(key, {}).items():
            into[key][lang] = into[key].get(lang, 0) + n
    for key in COUNTER_KEYS:
        into[key] += other[key]


def _probabilities(
    tokens: Mapping[str, int], *, alpha: float, weights: Mapping[str, float], what: str
) -> dict[str, float]:
    if not tokens:
        return {}
    if weights:
        for name, w in weights.items():
            if name not in tokens:
                raise ValueError(
                    f"data.{what}.{name} ({w}) names no {what.split('_')[0]} of the manifest"
                )
        total = float(sum(weights.get(name, 0.0) for name in tokens))
        if total <= 0:
            raise ValueError(f"data.{what} ({dict(weights)}) must have a positive sum")
        return {name: weights.get(name, 0.0) / total for name in tokens}
    return language_probabilities(tokens, alpha=alpha)


def _pair_sources(manifest: dict) -> dict[int, tuple[str, bool]]:
    """Shard index -> ``(source name, synthetic)`` for every pair shard of ``manifest``.

    A shard is synthetic when its entry says ``"synthetic": true``; an entry without the key
    takes its pair set's flag (``manifest["pairs"][name]["synthetic"]``) when no shard of that
    set carries the key (after a merge the set's flag is the first part's, so it is trusted only
    then). The source name is the pair name, or ``name + SYNTHETIC_SUFFIX`` for the synthetic
    shards of a set that also has real ones."""
    entries = [(i, e) for i, e in enumerate(manifest["shards"]) if e["kind"] != "mono"]
    keyed = {e["pair"] for _, e in entries if "synthetic" in e}
    pairs = manifest.get("pairs", {})
    flags = {}
    for i, e in entries:
        name = e["pair"]
        if "synthetic" in e:
            flags[i] = bool(e["synthetic"])
        else:
            flags[i] = name not in keyed and bool(pairs.get(name, {}).get("synthetic", False))
    kinds: dict[str, set[bool]] = {}
    for i, e in entries:
        kinds.setdefault(e["pair"], set()).add(flags[i])
    return {
        i: (
            e["pair"] + SYNTHETIC_SUFFIX if flags[i] and len(kinds[e["pair"]]) == 2 else e["pair"],
            flags[i],
        )
        for i, e in entries
    }


def _pair_probabilities(
    tokens: Mapping[str, int],
    *,
    synthetic: set[str],
    alpha: float,
    weights: Mapping[str, float],
    synthetic_ratio: float | None,
    parallel_upsample: float | None,
    where: str,
) -> dict[str, float]:
    """p of each pair source (in ``tokens`` order): alpha smoothing (or ``weights``) over all of
    them when ``synthetic_ratio`` is None, real sets' weights times ``parallel_upsample`` when
    set (fairseq's ``--upsample-primary``); with a ratio r, two pools, real ``1 - r`` and
    synthetic ``r``, each smoothed (or weighted) within itself.

    Raises:
        ValueError: a ratio > 0 without a synthetic pair set, a ratio without a real one, as
            :func:`_probabilities` (one line each).
    """
    if synthetic_ratio is None:
        p = _probabilities(tokens, alpha=alpha, weights=weights, what="pair_weights")
        if parallel_upsample is None or parallel_upsample == 1.0 or not p:
            return p  # exactly the mix without the options
        w = {k: v * parallel_upsample if k not in synthetic else v for k, v in p.items()}
        total = sum(w.values())
        return {k: v / total for k, v in w.items()}
    r = float(synthetic_ratio)
    fake = {k: n for k, n in tokens.items() if k in synthetic}
    real = {k: n for k, n in tokens.items() if k not in synthetic}
    if r > 0 and not fake:
        raise ValueError(
            f"data.synthetic_ratio ({synthetic_ratio}) needs a synthetic pair set; manifest "
            f'{where!r} has none (pair sets marked "synthetic": true)'
        )
    if not real:
        raise ValueError(
            f"data.synthetic_ratio ({synthetic_ratio}) leaves {1 - r:g} of pair rows to real pair "
            f"sets; manifest {where!r} has none"
        )
    _probabilities(tokens, alpha=alpha, weights=weights, what="pair_weights")  # checks names
    out = dict.fromkeys(tokens, 0.0)
    for pool, share in ((real, 1.0 - r), (fake, r)):
        if share > 0:
            within = {k: w for k, w in weights.items() if k in pool}
            if weights and sum(within.values()) <= 0:
                raise ValueError(
                    f"data.pair_weights ({dict(weights)}) must give the "
                    f"{'synthetic' if pool is fake else 'real'} pair sets a positive sum "
                    f"(data.synthetic_ratio {synthetic_ratio})"
                )
            p = _probabilities(pool, alpha=alpha, weights=within, what="pair_weights")
            for k, v in p.items():
                out[k] = share * v
    return out


def _tokenizer_languages(root: Path, manifest: dict) -> list[str] | None:
    """The language list of the manifest's tokenizer (its sidecar's ``"languages"``), or None
    when the manifest has no tokenizer sidecar (synthetic shards) or the sidecar no list."""
    from data_pipeline.tokenizer import SIDECAR_FILE

    sidecar = root / manifest.get("tokenizer", {}).get("dir", "tokenizer") / SIDECAR_FILE
    if not sidecar.is_file():
        return None
    try:
        languages = json.loads(sidecar.read_text(encoding="utf-8")).get("languages")
    except ValueError as err:
        raise ValueError(f"tokenizer sidecar {str(sidecar)!r} is not valid JSON ({err})") from None
    return None if languages is None else [str(lang) for lang in languages]


class StreamingDataset(IterableDataset):
    """Endless batches of one dp rank: a torch IterableDataset yielding whole batches.

    Iterated in process, it runs its slots round-robin and keeps its state itself; inside
    DataLoader workers (use :class:`StreamingLoader`), each worker runs one slot and yields
    ``(batch, slot state)``.

    Args:
        manifest: a shard directory's manifest.json, or the directory.
        dp_rank, dp_world_size: this rank and the data-parallel world size.
        seq_len: T. batch_size: B.
        objective: ``clm`` (packed causal LM), ``span`` (SpanBERT span masking, packed as
            ``mlm``), ``mlm`` (BERT masking, plus TLM rows from
            pair shards per ``masking.tlm_share``) or ``seq2seq`` (encoder-decoder rows:
            ``masking.tlm_share`` translation rows, the rest span-corrupted, or denoised when
            ``masking.denoise_share`` > 0; settings ``masking.seq2seq``).
        vocab: special ids (and word starts); None reads the manifest's tokenizer directory.
        masking: MLM settings (default :class:`MaskingConfig`); ignored for clm.
        alpha: smoothing exponent for languages and language pairs.
        language_weights, pair_weights: explicit weights replacing alpha smoothing.
        seed: data order seed (pass orders, shuffle buffers, masking).
        num_workers: DataLoader workers of this rank (slots per rank = max(1, num_workers)).
        shuffle_buffer: sample references per source in each slot's shuffle buffer (capped
            at the source's samples per pass).
        reset_position_ids: restart position ids at each document (CLM/MLM rows).
        min_carry_tokens: drop a document remainder shorter than this instead of starting a
            row with it (0 loses no token).
        on_bad_shard: ``skip`` (log the shard by name, count, go on) or ``raise``.
        track_docs: record every document start as ``(source, file, doc ordinal, pass)`` in
            ``self.doc_log`` (tests and audits; in process only).
        languages: the run's language index (``lang_ids``, ``tokens_per_lang``,
            ``docs_per_lang``); None takes the manifest's tokenizer's language list (its
            sidecar's ``"languages"``), or, for a manifest without a tokenizer sidecar
            (synthetic shards), the manifest's own languages, sorted.
        tlm_swap_prob: probability that a TLM pair puts its target side first (drawn per
            pair; XLM trains both directions).
        synthetic_ratio: share of pair rows drawn from synthetic pair sets (``"synthetic":
            true`` in the manifest), in [0, 1): real sets get ``1 - r``, each pool mixed by
            alpha (or ``pair_weights``) within itself; None mixes all pair sets alike.
        parallel_upsample: real pair sets' weight multiplied by it (>= 1; fairseq's
            ``--upsample-primary``), only without ``synthetic_ratio``; None: 1. Both are
            range-checked always, and applied (and checked against the manifest) only when
            pair rows are drawn (``mlm`` / ``seq2seq`` with ``masking.tlm_share`` > 0).

    Raises:
        ValueError: a bad argument, a manifest naming a missing shard, weights naming unknown
            languages, a manifest language missing from ``languages`` (or the tokenizer's),
            an objective without data, seq2seq rows without the sentinels or ``<lang:xx>``
            tokens they need, a bad ``synthetic_ratio`` / ``parallel_upsample`` or a ratio the
            manifest's pair sets cannot meet (one line each).
        FileNotFoundError: no manifest.
    """

    def __init__(
        self,
        manifest: str | Path,
        *,
        dp_rank: int,
        dp_world_size: int,
        seq_len: int,
        batch_size: int,
        objective: str = "clm",
        vocab: Vocab | None = None,
        masking: MaskingConfig | None = None,
        alpha: float = 0.3,
        language_weights: Mapping[str, float] | None = None,
        pair_weights: Mapping[str, float] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        reset_position_ids: bool = False,
        min_carry_tokens: int = 0,
        on_bad_shard: str = "skip",
        track_docs: bool = False,
        languages: list[str] | None = None,
        tlm_swap_prob: float = 0.5,
        synthetic_ratio: float | None = None,
        parallel_upsample: float | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_world_size={dp_world_size})")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} ({value}) must be >= 1")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective ({objective!r}) must be one of {', '.join(OBJECTIVES)}")
        if on_bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"data.on_bad_shard ({on_bad_shard!r}) must be skip or raise")
        if num_workers < 0 or shuffle_buffer < 1 or min_carry_tokens < 0:
            raise ValueError(
                f"num_workers ({num_workers}) must be >= 0, shuffle_buffer ({shuffle_buffer}) "
                f">= 1 and min_carry_tokens ({min_carry_tokens}) >= 0"
            )
        check_alpha(alpha, name="data.alpha")
        if not 0.0 <= tlm_swap_prob <= 1.0:
            raise ValueError(f"data.tlm_swap_prob ({tlm_swap_prob}) must be in [0, 1]")
        self.tlm_swap_prob = float(tlm_swap_prob)
        self.masking = masking or MaskingConfig()
        self.masking.check()
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.objective, self.seed = objective, seed
        self.num_workers = num_workers
        self.slots_per_rank = max(1, num_workers)
        self.num_slots = dp_world_size * self.slots_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.reset_position_ids = reset_position_ids
        self.min_carry_tokens = min_carry_tokens
        self.on_bad_shard = on_bad_shard
        self.track_docs = track_docs
        self.doc_log: list[tuple] = []

        file = manifest_path(manifest)
        data = load_manifest(file)
        root = file.parent
        self.fingerprint = hashlib.sha256(
            json.dumps([[e["path"], e["sha256"]] for e in data["shards"]]).encode()
        ).hexdigest()
        sources: dict[str, Source] = {}
        pair_sources = _pair_sources(data)
        # the pair sources of synthetic (back-translated) shards
        self.synthetic_pairs = sorted({n for n, fake in pair_sources.values() if fake})
        for index, entry in enumerate(data["shards"]):
            path = root / entry["path"]
            if not path.is_file():
                raise ValueError(
                    f"manifest {str(file)!r} names shard {entry['path']!r}, which is missing "
                    "(every listed shard must exist)"
                )
            name = entry["lang"] if entry["kind"] == "mono" else pair_sources[index][0]
            src = sources.setdefault(name, Source(name, entry["kind"], [], [], 0))
            if entry.get("samples", 0) > 0:
                src.paths.append(str(path))
                src.samples_per_shard.append(int(entry["samples"]))
                src.tokens += int(entry.get("tokens", 0))
        sources = {k: v for k, v in sources.items() if v.num_samples > 0}
        self.sources = dict(sorted(sources.items()))
        mono = {k: s.tokens for k, s in self.sources.items() if s.kind == "mono"}
        pairs = {k: s.tokens for k, s in self.sources.items() if s.kind == "pair"}
        self.synthetic_pairs = [k for k in self.synthetic_pairs if k in pairs]
        self.pair_langs = {}
        for k in pairs:
            base = k.removesuffix(SYNTHETIC_SUFFIX) if k in self.synthetic_pairs else k
            stats = data.get("pairs", {}).get(base)
            self.pair_langs[k] = (
                (stats["src"], stats["tgt"]) if stats is not None else tuple(base.split("-", 1))
            )
        in_manifest = sorted(set(mono) | {x for p in self.pair_langs.values() for x in p})
        if languages is None:
            languages = _tokenizer_languages(root, data)
        if languages is None:  # no tokenizer sidecar (synthetic shards): the manifest's own
            languages = in_manifest
        if len(set(languages)) != len(languages):
            raise ValueError(f"languages ({languages}) must not repeat a language")
        for lang in in_manifest:
            if lang not in languages:
                raise ValueError(
                    f"manifest {str(file)!r} has language {lang!r}, which is not in the run's "
                    f"language index ({', '.join(languages)}: the tokenizer's languages)"
                )
        self.languages = list(languages)
        self.lang_index = {lang: i for i, lang in enumerate(self.languages)}
        self.mono_p = _probabilities(
            mono, alpha=alpha, weights=language_weights or {}, what="language_weights"
        )
        check_pair_mix(synthetic_ratio, parallel_upsample)
        # the real / synthetic mix is applied, and checked against the manifest, only when pair
        # rows are drawn (a validation loader of mono rows shares the run's data section)
        if objective not in ("mlm", "seq2seq") or self.masking.tlm_share <= 0.0:
            synthetic_ratio = parallel_upsample = None
        self.synthetic_ratio, self.parallel_upsample = synthetic_ratio, parallel_upsample
        self.pair_p = _pair_probabilities(
            pairs,
            synthetic=set(self.synthetic_pairs),
            alpha=alpha,
            weights=pair_weights or {},
            synthetic_ratio=synthetic_ratio,
            parallel_upsample=parallel_upsample,
            where=str(file),
        )
        tlm_share = self.masking.tlm_share if objective in ("mlm", "seq2seq") else 0.0
        # the monolingual rows' transforms and their shares (several: an mlm batch mixes them)
        kinds = self.masking.mono_kinds if objective == "mlm" else None
        kinds = [(k, float(w)) for k, w in (kinds or ((objective, 1.0),)) if w > 0]
        total = sum(w for _, w in kinds)
        self.mono_kinds = [(k, w / total) for k, w in kinds]
        self.kind_names = [k for k, _ in self.mono_kinds]
        if "span" in self.kind_names:
            self.span_masking = SpanMaskingConfig(
                mask_prob=self.masking.mask_prob,
                replace_prob=self.masking.replace_prob,
                random_prob=self.masking.random_prob,
                max_word_pieces=self.masking.max_word_pieces,
            )
            self.span_masking.check()
        self.tlm_share = tlm_share
        if tlm_share < 1.0 and not any(self.mono_p.values()):
            raise ValueError(f"manifest {str(file)!r} has no monolingual data for {objective}")
        if tlm_share > 0.0 and not any(self.pair_p.values()):
            raise ValueError(
                f"masking.tlm_share ({tlm_share}) needs parallel data; manifest {str(file)!r} "
                "has no pair shards"
            )
        if vocab is None:
            vocab = Vocab.from_tokenizer(str(root / data["tokenizer"]["dir"]))
        self.vocab = vocab
        self.decoder_len = 0  # target positions of a seq2seq row (none for the other objectives)
        if objective == "seq2seq":
            self._init_seq2seq(tlm_share)
        if objective == "btmlm":
            self._init_btmlm()
        if objective in ("nsp", "sop"):
            if seq_len < 5:
                raise ValueError(f"data.seq_len ({seq_len}) must be >= 5 for {objective} rows")
            if self.vocab.cls_id is None or self.vocab.sep_id is None:
                raise ValueError(f"{objective} rows need the tokenizer's <cls> and <sep> ids")
        self._slots = [
            self._fresh_slot(dp_rank * self.slots_per_rank + j, generation=0)
            for j in range(self.slots_per_rank)
        ]
        self.next_worker = 0
        self._live: list[_SlotRunner] | None = None

    def _init_seq2seq(self, tlm_share: float) -> None:
        """Settings of ``seq2seq`` batches: row lengths, and the tokens they need."""
        cfg = self.masking.seq2seq or Seq2SeqConfig()
        cfg.check()
        self.seq2seq = cfg
        self.denoising = self.masking.denoise_share > 0.0
        self.prefix_lm = self.masking.prefix_lm
        mono = tlm_share < 1.0
        self.mono_raw_len, self.decoder_len = cfg.lengths(
            self.seq_len, denoise=self.denoising, mono=mono, pairs=tlm_share > 0.0,
            prefix=self.prefix_lm,
        )  # fmt: skip
        vocab = self.vocab
        if mono and not self.denoising and not self.prefix_lm:
            spans = int(round(round(self.mono_raw_len * cfg.noise_density) / cfg.mean_span))
            if len(vocab.sentinel_ids) < spans:
                raise ValueError(
                    f"span corruption of {self.mono_raw_len}-token rows needs {spans} sentinel "
                    f"tokens; the tokenizer has {len(vocab.sentinel_ids)} (<extra_id_N>)"
                )
        if mono and self.denoising and cfg.denoising.permute_ratio > 0.0:
            if vocab.sentence_end_V is None:
                raise ValueError(
                    "denoising.permute_ratio > 0 needs the tokenizer's sentence ends (a vocab "
                    "with sentence_end_V)"
                )
        tagged = [lang for lang in self.mono_p if mono and self.denoising and cfg.language_token]
        tagged += [lang for pair in self.pair_langs.values() for lang in pair if tlm_share > 0.0]
        missing = sorted({lang for lang in tagged if lang not in (vocab.lang_token_ids or {})})
        if missing:
            raise ValueError(
                f"language {missing[0]!r} has no <lang:{missing[0]}> token in the tokenizer "
                "(translation rows and mBART denoising start the decoder with it)"
            )

    def _init_btmlm(self) -> None:
        """Settings of ``btmlm`` batches: the raw row length and the target languages (the
        manifest's mono languages with a ``<lang:xx>`` token, whatever their weights, so that a
        one-language validation loader has the run's targets; each row's language needs
        another one)."""
        self.btmlm_len = btmlm_source_len(self.seq_len)
        if self.btmlm_len < 1:
            raise ValueError(f"data.seq_len ({self.seq_len}) must be >= 5 for btmlm rows")
        tags = self.vocab.lang_token_ids or {}
        langs = list(self.mono_p)
        self.btmlm_targets = np.array(
            sorted(self.lang_index[lang] for lang in langs if lang in tags), dtype=np.int64
        )
        for lang in (lang for lang, p in self.mono_p.items() if p > 0):
            others = [i for i in self.btmlm_targets.tolist() if i != self.lang_index[lang]]
            if not others:
                raise ValueError(
                    f"btmlm rows of {lang!r} need another language with a <lang:xx> token in "
                    f"the tokenizer and mono data in the manifest (have: {', '.join(langs)})"
                )

    # --- state ---------------------------------------------------------------------------------

    def _fresh_slot(self, slot: int, *, generation: int, row0: int = 0) -> dict:
        return {
            "slot": slot,
            "generation": generation,
            "row0": row0,
            "rng": np.random.default_rng([self.seed, slot, generation]).bit_generator.state,
            "batches": 0,
            "counters": _fresh_counters(self.languages, list(self.pair_p)),
            "streams": {
                name: StreamState.fresh(slot=slot, num_slots=self.num_slots).to_dict()
                for name in self.sources
            },
        }

    def state_dict(self) -> dict:
        """This rank's loader state (a deep copy; layout in the module docstring)."""
        self._sync()
        return json.loads(json.dumps(self._state()))

    def _sync(self) -> None:
        # in process, slot states are snapshot from the live runners only when asked for
        for local, runner in enumerate(self._live or ()):
            self._slots[local] = runner.state()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}

    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "num_workers": self.num_workers,
            "num_slots": self.num_slots,
            "batch_size": self.batch_size,
            "next_worker": self.next_worker,
            "slots": self._slots,
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's own state, or from every old rank's state (elastic).

        Args:
            state: a ``state_dict()`` of this rank from a run with the same dp world size and
                worker count (exact resume); or the list of every old rank's state, in any
                order (exact resume when the layout is unchanged, else elastic re-dealing).

        Raises:
            ValueError: another manifest or seed, or a changed layout given fewer than every
                old rank's state.
        """
        self._live = None
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("loader state: empty list of rank states")
        for s in states:
            if s.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"loader state format ({s.get('format')!r}) must be {STATE_FORMAT} (states "
                    "of the per-slot language schedule, rosetta-loader/1, cannot be resumed)"
                )
            if s["fingerprint"] != self.fingerprint or s["seed"] != self.seed:
                raise ValueError(
                    f"loader state of rank {s['dp_rank']} was saved for another manifest or seed "
                    f"(seed {s['seed']}, this run {self.seed}): resume needs the same shards and "
                    "seed"
                )
        states = json.loads(json.dumps(states))  # own copies
        same_layout = (states[0]["dp_world_size"], states[0]["num_workers"]) == (
            self.dp_world_size,
            self.num_workers,
        )
        mine = [s for s in states if s["dp_rank"] == self.dp_rank]
        if same_layout and mine:
            self._slots = mine[0]["slots"]
            self.next_worker = mine[0]["next_worker"]
            old_batch = mine[0]["batch_size"]
            if old_batch != self.batch_size:
                # a new batch size: a new generation of the global schedule after the rows
                # consumed (the ranks ran in step: dp ranks x this rank's batches)
                row0 = self._slots[0]["row0"] + old_batch * self.dp_world_size * sum(
                    x["batches"] for x in self._slots
                )
                for x in self._slots:
                    x["row0"], x["batches"] = row0, 0
                self.next_worker = 0
            return
        old_slots = sorted((x for s in states for x in s["slots"]), key=lambda x: x["slot"])
        old_num = states[0]["num_slots"]
        if [x["slot"] for x in old_slots] != list(range(old_num)):
            ranks = sorted(s["dp_rank"] for s in states)
            raise ValueError(
                f"loader state covers ranks {ranks} of dp world size {states[0]['dp_world_size']}: "
                f"resuming on a new layout ({self.dp_world_size} ranks x {self.slots_per_rank} "
                "slots) needs every old rank's state"
            )
        streams = redistribute(
            [x["streams"] for x in old_slots],
            num_slots=self.num_slots,
            samples={name: s.num_samples for name, s in self.sources.items()},
        )
        if len({(x["generation"], x["row0"]) for x in old_slots}) != 1:
            raise ValueError(
                "loader states disagree on the schedule generation: they are not of one checkpoint"
            )
        generation = old_slots[0]["generation"] + 1
        # the new layout continues the global row sequence after every row the old one consumed
        row0 = old_slots[0]["row0"] + states[0]["batch_size"] * sum(x["batches"] for x in old_slots)
        self._slots = []
        for j in range(self.slots_per_rank):
            slot = self.dp_rank * self.slots_per_rank + j
            new = self._fresh_slot(slot, generation=generation, row0=row0)
            new["streams"] = streams[slot]
            for old in old_slots:
                if old["slot"] % self.num_slots == slot:
                    _add_counters(new["counters"], old["counters"])
            self._slots.append(new)
        self.next_worker = 0

    @property
    def counters(self) -> dict:
        """Totals of this rank so far: tokens and documents per language, dropped and
        truncated tokens, bad samples skipped (read off the live runners in process: no state
        snapshot, so a per-log-step read stays cheap)."""
        live = self._live
        out = _fresh_counters(self.languages, list(self.pair_p))
        for local, slot in enumerate(self._slots):
            _add_counters(out, live[local].counters if live else slot["counters"])
        return out

    # --- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.slots_per_rank:
                raise ValueError(
                    f"DataLoader has {info.num_workers} workers, dataset num_workers is "
                    f"{self.num_workers}"
                )
            local = (self.next_worker + info.id) % self.slots_per_rank
            runner = _SlotRunner(self, self._slots[local])
            while True:
                batch = runner.next_batch()
                yield batch, runner.state()
        self._sync()
        runners = [_SlotRunner(self, slot) for slot in self._slots]
        self._live = runners
        while True:
            local = self.next_worker
            batch = runners[local].next_batch()
            self.next_worker = (local + 1) % self.slots_per_rank
            yield batch


class StreamingLoader:
    """A rank's batch iterator: the dataset in process, or over DataLoader worker processes.

    Worker state comes back with every batch, so ``state_dict()`` always describes exactly the
    batches handed out so far (prefetched ones are produced again after a resume).
    """

    def __init__(self, dataset: StreamingDataset, *, prefetch_factor: int = 2) -> None:
        self.dataset = dataset
        self.prefetch_factor = prefetch_factor

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        if ds.num_workers == 0:
            yield from ds
            return
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=ds.num_workers,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
        )
        for batch, slot_state in loader:
            local = ds.next_worker
            assert slot_state["slot"] == ds._slots[local]["slot"], "worker order broken"
            ds._slots[local] = slot_state
            ds.next_worker = (local + 1) % ds.slots_per_rank
            yield batch

    def state_dict(self) -> dict:
        """See :meth:`StreamingDataset.state_dict`."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """See :meth:`StreamingDataset.load_state_dict`; call before iterating."""
        self.dataset.load_state_dict(state)

    @property
    def counters(self) -> dict:
        """See :attr:`StreamingDataset.counters`."""
        return self.dataset.counters


class _SlotRunner:
    """Builds the batches of one slot from its state; ``state()`` snapshots it."""

    def __init__(self, ds: StreamingDataset, state: dict) -> None:
        self.ds = ds
        self.slot = state["slot"]
        self.generation = state["generation"]
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.batches = state["batches"]
        self.row0 = state["row0"]
        self.local = self.slot - ds.dp_rank * ds.slots_per_rank  # the rank's batch k % W
        self.plan: list[tuple[list[str], list[str]]] = []  # next batches' row sources, reversed
        self.counters = json.loads(json.dumps(state["counters"]))
        self.counters.setdefault("pair_tokens", dict.fromkeys(ds.pair_p, 0))
        self.streams = {k: StreamState.from_dict(v) for k, v in state["streams"].items()}
        # nsp: the last B segment of each language (its negatives when a batch has one row)
        self.segments: dict[str, list[int]] = dict(state.get("segments", {}))
        self.reader = ShardReader()
        self.joined: dict[str, tuple] = {}  # source -> (position, joined arrays, meta)
        self.bad_shards: set[str] = set()
        self.special_V = ds.vocab.special_mask_V()
        self.normal_ids = np.flatnonzero(~self.special_V)
        self.min_carry, self.track_docs = ds.min_carry_tokens, ds.track_docs
        # rows are cut at eos ids; the document offsets are read only for min carry and the
        # document log (and to join samples stored without eos), and checked only then
        self.check = True if self.min_carry or self.track_docs else "stream"
        self.eos = ds.vocab.eos_id
        self.pair_lang_index = {
            name: (ds.lang_index[src], ds.lang_index[tgt])
            for name, (src, tgt) in ds.pair_langs.items()
        }
        self.mono_names, self.pair_names = list(ds.mono_p), list(ds.pair_p)
        self.mono_schedule = RowSchedule(list(ds.mono_p.values()))
        self.pair_schedule = RowSchedule(list(ds.pair_p.values()))
        B, T = ds.batch_size, ds.seq_len
        self.arange_BT = np.broadcast_to(np.arange(T, dtype=ID_DTYPE), (B, T)).copy()
        # position_ids and attention_mask of every batch without position resets and padding
        # (all CLM and mono MLM batches by default): one tensor each, shared by those batches
        self.positions_BT = torch.from_numpy(self.arange_BT.copy())
        self.all_tokens_BT = torch.ones((B, T), dtype=torch.bool)
        tags = ds.vocab.lang_token_ids or {}
        # seq2seq: the <lang:xx> id of each language index (-1: none; checked where needed)
        self.lang_tags = np.array([tags.get(lang, -1) for lang in ds.languages], dtype=np.int64)
        # mixed monolingual rows: the j-th row of a source has the transform of row
        # j + offset(source) of the kinds' own schedule (per source, so that no language is
        # tied to one transform by the two schedules' periods)
        self.kind_schedule = None
        if len(ds.mono_kinds) > 1:
            self.kind_schedule = RowSchedule([w for _, w in ds.mono_kinds])
            names = np.array([source_seed(name) for name in self.mono_names])
            self.kind_offset = (hashed_u64(ds.seed, names, 1)[:, 0] >> np.uint64(44)).astype(
                np.int64
            )
        self.row_kind_ids = np.array(
            [ROW_TRANSFORMS.index(k) if k in ROW_TRANSFORMS else -1 for k in ds.kind_names]
        )
        # btmlm: the ids the model never fills a placeholder with
        self.placeholder_excluded = torch.tensor(ds.vocab.special_ids, dtype=torch.int64)

    def state(self) -> dict:
        return {
            "slot": self.slot,
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
            "batches": self.batches,
            "row0": self.row0,
            "counters": json.loads(json.dumps(self.counters)),
            "streams": {k: v.to_dict() for k, v in self.streams.items()},
            **({"segments": dict(self.segments)} if self.segments else {}),
        }

    # --- samples -------------------------------------------------------------------------------

    def _current(self, name: str) -> tuple:
        """``(partial [g, cursor], joined)`` of the sample being consumed, loading one if needed."""
        stream = self.streams[name]
        source = self.ds.sources[name]
        failures = 0
        while True:
            if not stream.partials:
                g = stream.next_position(
                    capacity=min(self.ds.shuffle_buffer, source.num_samples), rng=self.rng
                )
                stream.partials.append([g, 0])
            partial = stream.partials[0]
            hit = self.joined.get(name)
            if hit is not None and hit[0] == partial[0]:
                return partial, hit[1]
            joined = self._load(source, partial[0])
            if joined is not None:
                self.joined[name] = (partial[0], joined)
                return partial, joined
            stream.partials.pop(0)
            failures += 1
            if failures > 2 * source.num_samples and len(self.bad_shards) >= len(source.paths):
                raise ValueError(f"every shard of {source.kind} source {name} failed to read")

    def _load(self, source: Source, g: int) -> dict | None:
        shard, index = source.locate(g, seed=self.ds.seed)
        path = source.paths[shard]
        if path in self.bad_shards:
            self.counters["bad_samples"] += 1
            return None
        eos = self.eos
        try:
            sample = self.reader.read(path, index, check=self.check)
            if sample.get("eos", eos) != eos:
                raise ValueError(f"sample {index}: eos {sample['eos']} != the tokenizer's {eos}")
        except (OSError, ValueError) as err:
            if self.ds.on_bad_shard == "raise":
                raise ValueError(f"shard {Path(path).name}: {err}") from None
            log.warning("skipping shard %s: %s", Path(path).name, err)
            self.bad_shards.add(path)
            self.counters["bad_samples"] += 1
            return None
        meta = (sample["source"], int(sample["first_doc"]), g // source.num_samples)
        if source.kind == "mono":
            # stored as the stream rows are cut from: documents each followed by eos
            ids, offsets = sample["tokens"], sample["doc_offsets"]
            if "eos" not in sample:  # written before the sharding job stored eos
                ids, offsets = join_mono(ids, offsets, eos_id=eos)
            return {"ids": ids, "offsets": offsets, "meta": meta}
        src_lang, tgt_lang = self.ds.pair_langs[source.name]
        src_len = np.diff(sample["src_offsets"].astype(np.int64)) + 1
        swap = self._swaps(source, g, len(src_len))
        ids, lang, pos, seg = join_pairs(
            sample["src_tokens"],
            sample["src_offsets"],
            sample["tgt_tokens"],
            sample["tgt_offsets"],
            eos_id=eos,
            src_lang=self.ds.lang_index[src_lang],
            tgt_lang=self.ds.lang_index[tgt_lang],
            swap_D=swap,
        )
        src_cum = np.zeros(len(src_len) + 1, dtype=np.int64)  # source tokens before each pair
        np.cumsum(src_len, out=src_cum[1:])
        first_len = src_len
        if swap is not None:
            first_len = np.where(swap, np.diff(seg) - src_len, src_len)
        return {
            "ids": ids,
            "lang": lang,
            "pos": pos,
            "seg": seg,
            "src_len": first_len,  # the first side's length (the target's where swapped)
            "src_cum": src_cum,  # tokens of the source language, whatever the order
            "swap": swap,
            "meta": meta,
        }

    def _swaps(self, source: Source, g: int, num_pairs: int) -> np.ndarray | None:
        """Which pairs of the sample at stream position ``g`` put their target first: drawn
        per pair with ``tlm_swap_prob`` from ``(seed, source, g)`` alone, so that a sample
        joined again (resume, or dealt to another slot) is the same; None: no pair swaps."""
        prob = self.ds.tlm_swap_prob
        if prob == 0.0 or num_pairs == 0:
            return None
        if prob == 1.0:
            return np.ones(num_pairs, dtype=bool)
        seed = (self.ds.seed << 32) ^ source_seed(source.name)
        bits = hashed_u64(seed, np.array([g]), num_pairs)[0]
        swap = (bits >> np.uint64(11)) * (1.0 / (1 << 53)) < prob
        return swap if swap.any() else None

    def _log_docs(self, name: str, joined: dict, first: int, last: int) -> None:
        source_file, first_doc, pass_index = joined["meta"]
        for d in range(first, last):
            self.ds.doc_log.append((name, source_file, first_doc + d, pass_index))

    # --- rows ----------------------------------------------------------------------------------

    def _plan_batches(self) -> None:
        """Plan the slot's next batches: the source of each of their rows, from the global
        schedule (module docstring: global steps and dealing); a pure function of ``row0``,
        ``batches`` and the layout, so nothing of it is saved."""
        ds = self.ds
        B, W, world = ds.batch_size, ds.slots_per_rank, ds.dp_world_size
        G = world * B
        # this slot's next K global steps span K W G rows of the sequence: sorted in one go,
        # or, past PLAN_ROWS rows per step, the step's own rows are looked up one by one
        K = min(1024, PLAN_ROWS // (W * G))
        sparse = K < SPAN_MIN_STEPS
        if sparse:
            K = SPARSE_STEPS
        step_K = (self.batches + np.arange(K, dtype=np.int64)) * W + self.local
        first_K = self.row0 + step_K * G
        share = ds.tlm_share
        pair_before_K = np.floor(first_K * share).astype(np.int64)
        num_pair_K = np.floor((first_K + G) * share).astype(np.int64) - pair_before_K
        if world == 1:
            pos_KB = np.broadcast_to(np.arange(B), (K, B))
        else:  # rank r's rows: positions perm[r B : (r + 1) B] of the step's window
            mine = np.arange(ds.dp_rank * B, (ds.dp_rank + 1) * B)
            pos_KB = np.sort(permuted_positions(ds.seed, first_K, G, mine), axis=1)
        is_pair_KB = pos_KB < num_pair_K[:, None]
        # a window's TLM rows are its first num_pair positions (pair rows pair_before ...)
        pair_at = (pair_before_K[:, None] + pos_KB)[is_pair_KB]
        mono_at = (first_K - pair_before_K - num_pair_K)[:, None] + pos_KB
        mono_at = mono_at[~is_pair_KB]
        if sparse:
            pair_rows = self.pair_schedule.sources_at(pair_at).tolist()
            mono_src = self.mono_schedule.sources_at(mono_at)
            mono_rows = mono_src.tolist()
        else:  # the K windows lie in one span of the pair sequence and one of the mono one
            span_first, span_end = int(first_K[0]), int(first_K[-1]) + G
            pair_first = int(pair_before_K[0])
            pair_end = int(np.floor(span_end * share)) if share else 0
            mono_first = span_first - pair_first
            pair_src = self.pair_schedule.sources(pair_first, pair_end)
            mono_src = self.mono_schedule.sources(mono_first, span_end - pair_end)
            pair_rows = pair_src[pair_at - pair_first].tolist()
            mono_src = mono_src[mono_at - mono_first]
            mono_rows = mono_src.tolist()
        kinds = self._mono_kinds(mono_at, mono_src)
        num_tlm_K = is_pair_KB.sum(axis=1).tolist()
        plan, p, m = [], 0, 0
        for num_tlm in num_tlm_K:
            pairs = [self.pair_names[i] for i in pair_rows[p : p + num_tlm]]
            monos = [self.mono_names[i] for i in mono_rows[m : m + B - num_tlm]]
            plan.append((pairs, monos, None if kinds is None else kinds[m : m + B - num_tlm]))
            p, m = p + num_tlm, m + B - num_tlm
        self.plan = plan[::-1]

    def _mono_kinds(self, mono_at: np.ndarray, mono_src: np.ndarray) -> np.ndarray | None:
        """The transform (index into ``ds.mono_kinds``) of each monolingual row, from its global
        mono row indices and sources; None when the rows have one transform. Row m, the j-th
        row of its source (``RowSchedule.counts``), takes row ``j + offset(source)`` of the
        kinds' schedule: each source's rows follow the shares within a row over any window,
        so the step's rows do within about a row per source."""
        if self.kind_schedule is None:
            return None
        mono_src = np.asarray(mono_src, dtype=np.int64)
        counts = self.mono_schedule.counts(np.asarray(mono_at, dtype=np.int64))
        at = np.searchsorted(self.mono_schedule.index, mono_src)
        j = counts[np.arange(len(mono_src)), at]
        return self.kind_schedule.sources_at(j + self.kind_offset[mono_src])

    def _mono_row(self, name: str, ids_T: np.ndarray) -> int:
        """Fill one row ``ids_T`` from mono source ``name``.

        Returns the correction to "documents starting in the row = positions after an eos in
        it": +1 when a document starts at the first position; -1 for each sample continued
        mid-document after another sample's final eos (partials dealt by an elastic resume).
        """
        partials = self.streams[name].partials
        T = len(ids_T)
        eos = self.eos
        filled, row_start, docs = 0, True, 0
        while filled < T:
            hit = self.joined.get(name)
            if partials and hit is not None and hit[0] == partials[0][0]:
                partial, j = partials[0], hit[1]
            else:
                partial, j = self._current(name)
            cursor = partial[1]
            ids = j["ids"]
            size = len(ids)
            # mid-document: the position before the cursor is not an eos
            if row_start and cursor and self.min_carry and ids[cursor - 1] != eos:
                cursor = self._drop_short_remainder(j, cursor)
            row_start = False
            mid_document = cursor and ids[cursor - 1] != eos
            if not filled and not mid_document:
                docs += 1  # a document starts at the row's first position
            elif filled and mid_document:
                docs -= 1  # after the previous sample's final eos, yet no document start
            end = cursor + T - filled
            if end < size:
                ids_T[filled:] = ids[cursor:end]
                partial[1] = end
            else:
                end = size
                ids_T[filled : filled + end - cursor] = ids[cursor:]
                partials.pop(0)
            if self.track_docs:
                starts = self._starts(j)
                lo, hi = np.searchsorted(starts, (cursor, end)).tolist()
                self._log_docs(name, j, lo, hi)
            filled += end - cursor
        return docs

    @staticmethod
    def _starts(j: dict) -> np.ndarray:
        """Document start positions of a mono sample."""
        return j["offsets"][:-1]

    def _drop_short_remainder(self, j: dict, cursor: int) -> int:
        """The cursor past the current document when fewer than min_carry_tokens remain of it
        (counted in dropped_tokens), else ``cursor``."""
        starts = self._starts(j)
        k = int(np.searchsorted(starts, cursor))
        nxt = int(starts[k]) if k < len(starts) else len(j["ids"])
        if nxt - cursor < self.min_carry:
            self.counters["dropped_tokens"] += nxt - cursor
            return nxt
        return cursor

    def _pair_row(self, name: str, b: int, rows: dict, tokens_L: list[int]) -> tuple[int, int]:
        """Pack whole pairs of source ``name`` into row ``b`` of ``rows`` (ids, lang, pos,
        start); count their tokens per language in ``tokens_L``. Returns ``(pairs, tokens)``:
        the row holds tokens at ``[0, tokens)`` and is padded by the caller."""
        partials = self.streams[name].partials
        src_lang, tgt_lang = self.pair_lang_index[name]
        T = self.ds.seq_len
        ids_T, lang_T, pos_T, start_T = (rows[k][b] for k in ("ids", "lang", "pos", "start"))
        filled, pairs = 0, 0
        while filled < T:
            partial, j = self._current(name)
            cursor = partial[1]
            seg = j["seg"]
            i = int(np.searchsorted(seg, cursor))
            # segments i .. k-1 fit entirely in the room left
            k = int(np.searchsorted(seg, cursor + T - filled, side="right")) - 1
            if k > i:
                end = int(seg[k])
                n = end - cursor
                ids_T[filled : filled + n] = j["ids"][cursor:end]
                lang_T[filled : filled + n] = j["lang"][cursor:end]
                pos_T[filled : filled + n] = j["pos"][cursor:end]
                num_src = int(j["src_cum"][k] - j["src_cum"][i])
            elif filled == 0:  # one pair longer than a row: cut both sides, keep their eos
                src_len = int(j["src_len"][i])
                seg_len = int(seg[i + 1] - seg[i])
                tgt_len = seg_len - src_len
                keep_src = min(src_len, max(T // 2, T - tgt_len))
                keep_tgt = T - keep_src
                idx = np.concatenate(
                    [
                        cursor + np.arange(keep_src - 1),
                        [cursor + src_len - 1],
                        cursor + src_len + np.arange(keep_tgt - 1),
                        [cursor + seg_len - 1],
                    ]
                )
                self.counters["truncated_tokens"] += seg_len - T
                swapped = j["swap"] is not None and j["swap"][i]
                k, n, end = i + 1, T, int(seg[i + 1])
                num_src = keep_tgt if swapped else keep_src  # of the source language
                ids_T[:] = j["ids"][idx]
                lang_T[:] = j["lang"][idx]
                pos_T[:keep_src] = np.arange(keep_src)
                pos_T[keep_src:] = np.arange(keep_tgt)
            else:
                break
            start_T[filled + seg[i:k] - cursor] = True
            tokens_L[src_lang] += num_src
            tokens_L[tgt_lang] += n - num_src
            pairs += k - i
            if self.track_docs:
                self._log_docs(name, j, i, k)
            filled += n
            if k < len(seg) - 1:  # pair k does not fit: the row is done
                partial[1] = end
                break
            partials.pop(0)
        return pairs, filled

    # --- seq2seq rows -------------------------------------------------------------------------

    def _translation_row(self, name: str, b: int, rows: dict, tokens_L: list[int]) -> int:
        """Pack whole pairs of source ``name`` into row ``b`` of ``rows``: each pair's first
        side (``side </s>``) into the source row, its second side into the labels, the decoder
        input being the second side behind its language's ``<lang:xx>`` tag; pair ``k`` of the
        row has document id ``k`` on both sides. A pair longer than an empty row is cut, each
        side keeping its eos (counted in ``truncated_tokens``). Returns the pairs packed."""
        ds = self.ds
        S, T = ds.seq_len, ds.decoder_len
        partials = self.streams[name].partials
        src_lang, tgt_lang = self.pair_lang_index[name]
        s_fill = t_fill = pairs = 0
        while True:
            partial, j = self._current(name)
            seg, first_len_D, swap, ids = j["seg"], j["src_len"], j["swap"], j["ids"]
            num_pairs = len(seg) - 1
            i = int(np.searchsorted(seg, partial[1]))
            while i < num_pairs:
                start, end = int(seg[i]), int(seg[i + 1])
                n_src = int(first_len_D[i])
                n_tgt = end - start - n_src
                fits = s_fill + n_src <= S and t_fill + n_tgt <= T
                if not fits and pairs:
                    partial[1] = start  # the row is full: this pair opens the next one
                    return pairs
                keep_s, keep_t = (n_src, n_tgt) if fits else (min(n_src, S), min(n_tgt, T))
                self.counters["truncated_tokens"] += n_src - keep_s + n_tgt - keep_t
                first, second = ids[start : start + n_src], ids[start + n_src : end]
                src = np.concatenate([first[: keep_s - 1], first[-1:]])
                tgt = np.concatenate([second[: keep_t - 1], second[-1:]])
                swapped = swap is not None and bool(swap[i])
                a_lang, b_lang = (tgt_lang, src_lang) if swapped else (src_lang, tgt_lang)
                s_end, t_end = s_fill + keep_s, t_fill + keep_t
                rows["src"][b, s_fill:s_end] = src
                rows["src_doc"][b, s_fill:s_end] = pairs
                rows["src_lang"][b, s_fill:s_end] = a_lang
                rows["labels"][b, t_fill:t_end] = tgt
                rows["dec"][b, t_fill] = self.lang_tags[b_lang]
                rows["dec"][b, t_fill + 1 : t_end] = tgt[:-1]
                rows["dec_doc"][b, t_fill:t_end] = pairs
                rows["dec_lang"][b, t_fill:t_end] = b_lang
                tokens_L[a_lang] += keep_s
                tokens_L[b_lang] += keep_t
                if self.track_docs:
                    self._log_docs(name, j, i, i + 1)
                s_fill, t_fill, pairs, i = s_end, t_end, pairs + 1, i + 1
            partials.pop(0)
            if s_fill >= S or t_fill >= T:
                return pairs

    def _span_corrupt_rows(self, raw_MR: np.ndarray, lang_M: np.ndarray, rows: dict, at: int):
        """T5 span corruption of the raw rows ``raw_MR`` into rows ``at, at + 1, ...``: the
        inputs fill the source row, the targets (sentinel, span, ..., eos) the labels; the
        decoder input is the targets behind pad (T5's decoder start)."""
        ds = self.ds
        cfg, vocab = ds.seq2seq, ds.vocab
        inputs_MI, targets_MG = span_corrupt(
            raw_MR,
            rng=self.rng,
            sentinel_ids=np.asarray(vocab.sentinel_ids, dtype=np.int64),
            noise_density=cfg.noise_density,
            mean_span=cfg.mean_span,
            eos_id=vocab.eos_id,
        )
        num_inputs, num_targets = inputs_MI.shape[1], targets_MG.shape[1]
        assert num_inputs <= ds.seq_len and num_targets <= ds.decoder_len, "T5 lengths broken"
        rows_M = slice(at, at + len(raw_MR))
        rows["src"][rows_M, :num_inputs] = inputs_MI
        rows["src_doc"][rows_M, :num_inputs] = 0
        rows["src_lang"][rows_M] = lang_M[:, None]
        rows["labels"][rows_M, :num_targets] = targets_MG
        rows["dec"][rows_M, 0] = vocab.pad_id
        rows["dec"][rows_M, 1:num_targets] = targets_MG[:, :-1]
        rows["dec_doc"][rows_M, :num_targets] = 0
        rows["dec_lang"][rows_M] = lang_M[:, None]

    def _prefix_rows(self, raw_MR: np.ndarray, lang_M: np.ndarray, rows: dict, at: int):
        """Prefix-LM rows (T5's prefix language modelling) from the raw rows ``raw_MR`` into
        rows ``at, at + 1, ...``: each raw row of L tokens split at a point k drawn uniformly
        from 1..L-1, ``raw[:k] eos`` the source and ``raw[k:] eos`` the target, behind pad
        (T5's decoder start)."""
        ds = self.ds
        vocab = ds.vocab
        length = raw_MR.shape[1]
        splits_M = self.rng.integers(1, length, size=len(raw_MR))
        for m, (raw_R, k) in enumerate(zip(raw_MR, splits_M.tolist())):
            b = at + m
            source = np.append(raw_R[:k], vocab.eos_id)
            target = np.append(raw_R[k:], vocab.eos_id)
            rows["src"][b, : len(source)] = source
            rows["src_doc"][b, : len(source)] = 0
            rows["src_lang"][b] = lang_M[m]
            rows["labels"][b, : len(target)] = target
            rows["dec"][b, 0] = vocab.pad_id
            rows["dec"][b, 1 : len(target)] = target[:-1]
            rows["dec_doc"][b, : len(target)] = 0
            rows["dec_lang"][b] = lang_M[m]

    def _denoise_rows(self, raw_MR: np.ndarray, names: list[str], rows: dict, at: int) -> None:
        """BART / mBART denoising of each raw row (``transforms.denoise``; eos appended when
        the row does not end in one) into rows ``at, at + 1, ...``: the noised source (cut to
        the row, keeping its last eos and language token; counted in ``truncated_tokens``)
        and the target behind its decoder start (mBART: the language token; BART: eos)."""
        ds = self.ds
        cfg, vocab = ds.seq2seq, ds.vocab
        S = ds.seq_len
        eos = vocab.eos_id
        tail = 1 + int(cfg.language_token)
        for m, (raw_R, name) in enumerate(zip(raw_MR, names)):
            b = at + m
            doc_N = raw_R if raw_R[-1] == eos else np.append(raw_R, eos).astype(raw_R.dtype)
            tag = vocab.lang_token_ids[name] if cfg.language_token else None
            source, target = denoise(
                doc_N,
                vocab=vocab,
                cfg=cfg.denoising,
                rng=self.rng,
                sentence_end_V=vocab.sentence_end_V,
                lang_id=tag,
                special_V=self.special_V,
                normal_ids=self.normal_ids,
            )
            if len(source) > S:
                self.counters["truncated_tokens"] += len(source) - S
                source = np.concatenate([source[: S - tail], source[-tail:]])
            lang = ds.lang_index[name]
            n, g = len(source), len(target)
            rows["src"][b, :n] = source
            rows["src_doc"][b, :n] = 0
            rows["src_lang"][b] = lang
            rows["labels"][b, :g] = target
            rows["dec"][b, :g] = decoder_inputs(target, start_id=eos if tag is None else tag)
            rows["dec_doc"][b, :g] = 0
            rows["dec_lang"][b] = lang

    def _seq2seq_batch(self, pair_rows: list[str], mono_rows: list[str]) -> dict:
        """A ``seq2seq`` batch (contract in the module docstring): translation rows first,
        then span-corrupted or denoised monolingual rows."""
        ds = self.ds
        vocab = ds.vocab
        B, S, T = ds.batch_size, ds.seq_len, ds.decoder_len
        num_langs = len(ds.languages)
        rows = {
            "src": np.full((B, S), vocab.pad_id, dtype=ID_DTYPE),
            "src_doc": np.full((B, S), -1, dtype=ID_DTYPE),
            "src_lang": np.zeros((B, S), dtype=ID_DTYPE),
            "dec": np.full((B, T), vocab.pad_id, dtype=ID_DTYPE),
            "labels": np.full((B, T), IGNORE_INDEX, dtype=ID_DTYPE),
            "dec_doc": np.full((B, T), -1, dtype=ID_DTYPE),
            "dec_lang": np.zeros((B, T), dtype=ID_DTYPE),
        }
        tokens_L, docs_L = [0] * num_langs, [0] * num_langs
        for b, name in enumerate(pair_rows):
            before = sum(tokens_L)
            pairs = self._translation_row(name, b, rows, tokens_L)
            docs_L[self.pair_lang_index[name][0]] += pairs
            self.counters["pair_tokens"][name] += sum(tokens_L) - before
        if mono_rows:
            raw_MR = np.empty((len(mono_rows), ds.mono_raw_len), dtype=ID_DTYPE)
            lang_M = np.array([ds.lang_index[name] for name in mono_rows], dtype=ID_DTYPE)
            for m, name in enumerate(mono_rows):
                # documents starting in the row: after each eos but the last token, corrected
                docs = self._mono_row(name, raw_MR[m])
                docs_L[lang_M[m]] += docs + int(np.count_nonzero(raw_MR[m, :-1] == self.eos))
                tokens_L[lang_M[m]] += ds.mono_raw_len
            if ds.prefix_lm:
                self._prefix_rows(raw_MR, lang_M, rows, len(pair_rows))
            elif ds.denoising:
                self._denoise_rows(raw_MR, mono_rows, rows, len(pair_rows))
            else:
                self._span_corrupt_rows(raw_MR, lang_M, rows, len(pair_rows))
        counted_tokens, counted_docs = self.counters["tokens"], self.counters["documents"]
        for i, lang in enumerate(ds.languages):
            counted_tokens[lang] += tokens_L[i]
            counted_docs[lang] += docs_L[i]
        pair_rows_B = np.zeros(B, dtype=bool)
        pair_rows_B[: len(pair_rows)] = True
        return {
            "input_ids": torch.from_numpy(rows["src"]),
            "doc_ids": torch.from_numpy(rows["src_doc"]),
            "lang_ids": torch.from_numpy(rows["src_lang"]),
            "attention_mask": torch.from_numpy(rows["src_doc"] >= 0),
            "decoder_input_ids": torch.from_numpy(rows["dec"]),
            "labels": torch.from_numpy(rows["labels"]),
            "decoder_doc_ids": torch.from_numpy(rows["dec_doc"]),
            "decoder_lang_ids": torch.from_numpy(rows["dec_lang"]),
            "decoder_attention_mask": torch.from_numpy(rows["dec_doc"] >= 0),
            "pair_rows": torch.from_numpy(pair_rows_B),
            "tokens_per_lang": torch.from_numpy(np.array(tokens_L, dtype=np.int64)),
            "docs_per_lang": torch.from_numpy(np.array(docs_L, dtype=np.int64)),
        }

    def _raw_rows(
        self, mono_rows: list[str], length: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
        """``([M, length] raw cuts, [M] language index, {tokens_per_lang, docs_per_lang})`` of
        the monolingual rows, their tokens and documents counted."""
        ds = self.ds
        num_langs = len(ds.languages)
        raw_MR = np.empty((len(mono_rows), length), dtype=ID_DTYPE)
        lang_M = np.array([ds.lang_index[name] for name in mono_rows], dtype=np.int64)
        tokens, documents = self.counters["tokens"], self.counters["documents"]
        docs_L = np.zeros(num_langs, dtype=np.int64)
        for m, name in enumerate(mono_rows):
            # documents starting in the row: after each eos but the last token, corrected
            docs = self._mono_row(name, raw_MR[m])
            docs += int(np.count_nonzero(raw_MR[m, :-1] == self.eos))
            documents[name] += docs
            docs_L[lang_M[m]] += docs
            tokens[name] += length
        tokens_L = np.bincount(lang_M, minlength=num_langs).astype(np.int64) * length
        per_lang = {
            "tokens_per_lang": torch.from_numpy(tokens_L),
            "docs_per_lang": torch.from_numpy(docs_L),
        }
        return raw_MR, lang_M, per_lang

    def _masking_args(self) -> dict:
        """The BERT-masking arguments of the transforms: vocabulary, ``masking`` settings, the
        slot's generator and the cached special / normal id tables."""
        return {
            "vocab": self.ds.vocab,
            "cfg": self.ds.masking,
            "rng": self.rng,
            "special_V": self.special_V,
            "normal_ids": self.normal_ids,
        }

    def _segment_batch(self, mono_rows: list[str]) -> dict:
        """An ``nsp`` / ``sop`` batch (module docstring): raw rows, then
        ``transforms.segment_pairs``."""
        ds = self.ds
        raw_MR, lang_M, per_lang = self._raw_rows(mono_rows, ds.seq_len - 3)
        index = ds.lang_index
        previous = {index[k]: np.asarray(v, dtype=ID_DTYPE) for k, v in self.segments.items()}
        rows = segment_pairs(
            raw_MR, lang_M, task=ds.objective, seq_len=ds.seq_len, previous=previous,
            **self._masking_args(),
        )  # fmt: skip
        for lang, segment in rows["last_B"].items():
            self.segments[ds.languages[lang]] = segment.tolist()
        batch = {
            key: torch.from_numpy(rows[key])
            for key in ("input_ids", "labels", "position_ids", "doc_ids", "token_type_ids")
            + ("attention_mask", "pair_label")
        }
        batch["lang_ids"] = torch.from_numpy(
            np.repeat(lang_M[:, None], ds.seq_len, axis=1).astype(ID_DTYPE)
        )
        return {**batch, **per_lang}

    def _btmlm_batch(self, mono_rows: list[str]) -> dict:
        """A ``btmlm`` batch (module docstring): raw rows, then ``transforms.btmlm_rows``."""
        ds = self.ds
        raw_MR, lang_M, per_lang = self._raw_rows(mono_rows, ds.btmlm_len)
        rows = btmlm_rows(
            raw_MR, lang_M, seq_len=ds.seq_len, lang_tag_L=self.lang_tags,
            targets=ds.btmlm_targets, **self._masking_args(),
        )  # fmt: skip
        batch = {
            key: torch.from_numpy(rows[key])
            for key in ("input_ids", "labels", "position_ids", "doc_ids", "lang_ids")
            + ("attention_mask", "placeholder_mask")
        }
        batch["btmlm_source_ids"] = torch.from_numpy(rows["source_ids"])
        batch["placeholder_excluded"] = self.placeholder_excluded
        batch["row_transform"] = torch.full(
            (len(mono_rows),), ROW_TRANSFORMS.index("btmlm"), dtype=torch.int32
        )
        return {**batch, **per_lang}

    def _mask_rule(self, kind: str) -> str:
        """``bert``, ``span`` or ``none``: how rows of transform ``kind`` are masked
        (``keep``: a batch kind that is not masked, its labels the inputs: CLM)."""
        if kind == "pair" and self.ds.masking.unmasked_pairs:
            return "none"
        return MASK_RULE.get(kind, "keep")

    def _mask_mixed(
        self,
        ids_BT: np.ndarray,
        valid_BT: np.ndarray | None,
        row_transform_B: np.ndarray,
        bounds: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` of an ``mlm`` batch whose rows mix masking rules
        (:meth:`_mask_rule`): BERT masking of its rows in one call, then span masking of the
        span rows (in that order, each over its rows only: the slot's generator is their one
        randomness), the rest left unmasked; the span rows' span-boundary inputs into
        ``bounds`` (``[B, T]`` tables, -1 filled)."""
        ds = self.ds
        inputs_BT, labels_BT = ids_BT.copy(), np.full_like(ids_BT, IGNORE_INDEX)
        rule_B = np.array([self._mask_rule(ROW_TRANSFORMS[k]) for k in row_transform_B.tolist()])
        for rows_B, mask in ((rule_B == "bert", mask_tokens), (rule_B == "span", span_mask)):
            rows = np.flatnonzero(rows_B)
            if not len(rows):
                continue
            cfg = ds.masking if mask is mask_tokens else ds.span_masking
            extra = {"with_boundaries": True} if mask is span_mask and bounds is not None else {}
            out = mask(
                ids_BT[rows],
                vocab=ds.vocab,
                cfg=cfg,
                rng=self.rng,
                valid_BT=None if valid_BT is None else valid_BT[rows],
                special_V=self.special_V,
                normal_ids=self.normal_ids,
                **extra,
            )
            inputs_BT[rows], labels_BT[rows] = out[0], out[1]
            if extra:
                for key, table in out[2].items():
                    bounds[key][rows] = table
        return inputs_BT, labels_BT

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The slot's next batch (contract in the module docstring)."""
        ds = self.ds
        B, T = ds.batch_size, ds.seq_len
        if not self.plan:
            self._plan_batches()
        pair_rows, mono_rows, kinds = self.plan.pop()
        if ds.objective == "seq2seq":
            self.batches += 1
            return self._seq2seq_batch(pair_rows, mono_rows)
        if ds.objective == "btmlm":
            self.batches += 1
            return self._btmlm_batch(mono_rows)
        if ds.objective in ("nsp", "sop"):
            self.batches += 1
            return self._segment_batch(mono_rows)
        num_tlm = len(pair_rows)
        self.batches += 1
        num_langs = len(ds.languages)
        lang_index = ds.lang_index
        ids_BT = np.empty((B, T), dtype=ID_DTYPE)
        lang_BT = np.empty((B, T), dtype=ID_DTYPE)
        start_BT = np.empty((B, T), dtype=bool)  # True at document starts (all set below)
        tokens_L = [0] * num_langs
        docs_L = [0] * num_langs
        fill_R = []  # tokens in each TLM row (the rest is padding)
        if num_tlm:
            start_BT[:num_tlm] = False
            pair_pos_RT = np.zeros((num_tlm, T), dtype=ID_DTYPE)
            rows = {"ids": ids_BT, "lang": lang_BT, "pos": pair_pos_RT, "start": start_BT}
            for b, name in enumerate(pair_rows):
                pairs, filled = self._pair_row(name, b, rows, tokens_L)
                docs_L[self.pair_lang_index[name][0]] += pairs
                self.counters["pair_tokens"][name] += filled
                fill_R.append(filled)
                # padding carries its row's first language, so that lang_ids stay valid indices
                ids_BT[b, filled:] = ds.vocab.pad_id
                lang_BT[b, filled:] = lang_BT[b, 0]
        row_lang, docs_R = [], []
        for b, name in enumerate(mono_rows, start=num_tlm):
            docs_R.append(self._mono_row(name, ids_BT[b]))
            lang = lang_index[name]
            lang_BT[b] = lang
            row_lang.append(lang)
            tokens_L[lang] += T
        if row_lang:
            # a document starts after each eos (column 0 is set below; docs_R counts it);
            # compared whole and then shifted: a ufunc over strided views is ~10x slower
            start_BT[num_tlm:, 1:] = np.equal(ids_BT[num_tlm:], self.eos)[:, :-1]

        if ds.reset_position_ids:
            position_BT, doc_ids_BT = boundaries_from_starts(start_BT)
        else:  # continuous positions: only the document numbering is needed
            start_BT[:, 0] = False  # the row's first document is number 0 whatever starts there
            doc_ids_BT = start_BT.astype(ID_DTYPE)  # then summed in place: ~30% less than
            np.add.accumulate(doc_ids_BT, axis=1, out=doc_ids_BT)  # np.cumsum's casting pass
            position_BT = self.arange_BT.copy() if num_tlm else None  # None: the shared one
        if row_lang:
            # a mono row's documents: one per start after t = 0 (its last doc id), corrected
            for lang, last, docs in zip(row_lang, doc_ids_BT[num_tlm:, -1].tolist(), docs_R):
                docs_L[lang] += last + docs
        valid_BT = None
        if num_tlm:
            position_BT[:num_tlm] = pair_pos_RT
            for b, filled in enumerate(fill_R):
                doc_ids_BT[b, filled:] = -1
            valid_BT = np.ones((B, T), dtype=bool)
            valid_BT[:num_tlm] = self.arange_BT[0] < np.array(fill_R)[:, None]
        row_transform = None
        if ds.objective in ("mlm", "span"):
            row_transform = np.zeros(B, dtype=ID_DTYPE)  # TLM rows first: "pair"
            row_transform[num_tlm:] = (
                self.row_kind_ids[0] if kinds is None else self.row_kind_ids[kinds]
            )
        only = ds.kind_names[0]  # the rows' one transform when they have one
        bounds = None  # SpanBERT's span-boundary inputs (masking.span_boundary)
        if ds.masking.span_boundary and "span" in ds.kind_names:
            bounds = {k: np.full((B, T), -1, dtype=ID_DTYPE) for k in SPAN_BOUNDARY_KEYS}
        # one rule for every row: one call over the batch; else row by row
        rules = {self._mask_rule(only)} | ({self._mask_rule("pair")} if num_tlm else set())
        if kinds is not None or bounds is not None or len(rules) > 1:
            input_BT, labels_BT = self._mask_mixed(ids_BT, valid_BT, row_transform, bounds)
        elif rules == {"span"}:
            input_BT, labels_BT = span_mask(
                ids_BT,
                vocab=ds.vocab,
                cfg=ds.span_masking,
                rng=self.rng,
                valid_BT=valid_BT,
                special_V=self.special_V,
                normal_ids=self.normal_ids,
            )
        elif rules == {"bert"}:
            input_BT, labels_BT = mask_tokens(
                ids_BT,
                vocab=ds.vocab,
                cfg=ds.masking,
                rng=self.rng,
                valid_BT=valid_BT,
                special_V=self.special_V,
                normal_ids=self.normal_ids,
            )
        elif rules == {"none"}:  # sentence rows: no token targets
            input_BT, labels_BT = ids_BT, np.full_like(ids_BT, IGNORE_INDEX)
        else:
            input_BT = labels_BT = ids_BT
        counted_tokens, counted_docs = self.counters["tokens"], self.counters["documents"]
        for i, lang in enumerate(ds.languages):
            if tokens_L[i]:
                counted_tokens[lang] += tokens_L[i]
            if docs_L[i]:
                counted_docs[lang] += docs_L[i]
        input_ids = torch.from_numpy(input_BT)
        extra = {}
        if row_transform is not None:
            extra["row_transform"] = torch.from_numpy(row_transform)
        if bounds is not None:
            for key, name in zip(SPAN_BOUNDARY_KEYS, ("span_left", "span_right", "span_offset")):
                extra[name] = torch.from_numpy(bounds[key])
        return {
            **extra,
            "input_ids": input_ids,
            # CLM: the input tensor itself (the values are equal; batches are read-only)
            "labels": input_ids if labels_BT is input_BT else torch.from_numpy(labels_BT),
            "position_ids": (
                self.positions_BT if position_BT is None else torch.from_numpy(position_BT)
            ),
            "doc_ids": torch.from_numpy(doc_ids_BT),
            "lang_ids": torch.from_numpy(lang_BT),
            "attention_mask": (
                self.all_tokens_BT if valid_BT is None else torch.from_numpy(valid_BT)
            ),
            "tokens_per_lang": torch.from_numpy(np.array(tokens_L, dtype=np.int64)),
            "docs_per_lang": torch.from_numpy(np.array(docs_L, dtype=np.int64)),
        }


def masking_from_objective(objective: object) -> MaskingConfig:
    """Map an object with ``mask_prob, mask_replace_prob, mask_random_prob, whole_word,
    max_word_pieces, tlm_share`` attributes (``pretrain.config.ObjectiveConfig``) onto
    :class:`MaskingConfig` (``max_word_pieces`` defaults to MaskingConfig's when absent), and
    its ``span_corruption``, ``denoising`` and ``decoder_len`` (when present) onto the
    :class:`~data_pipeline.transforms.Seq2SeqConfig` of ``seq2seq`` batches."""
    return MaskingConfig(
        mask_prob=objective.mask_prob,
        replace_prob=objective.mask_replace_prob,
        random_prob=objective.mask_random_prob,
        whole_word=objective.whole_word,
        max_word_pieces=getattr(objective, "max_word_pieces", MaskingConfig.max_word_pieces),
        tlm_share=getattr(objective, "tlm_share", None) or 0.0,
        seq2seq=seq2seq_from_objective(objective),
    )


def seq2seq_from_objective(objective: object) -> Seq2SeqConfig:
    """The :class:`~data_pipeline.transforms.Seq2SeqConfig` of an object with optional
    ``span_corruption`` (``noise_density``, ``mean_span``), ``denoising`` (``mask_ratio``,
    ``poisson_lambda``, ``random_ratio``, ``permute_ratio``, ``rotate_prob``,
    ``language_token``) and ``decoder_len`` attributes (``pretrain.config.ObjectiveConfig``);
    what is absent keeps its default."""
    base = Seq2SeqConfig()
    span = getattr(objective, "t5", None)
    noising = getattr(objective, "bart", None)
    denoising = base.denoising
    if noising is not None:
        denoising = DenoisingConfig(
            **{
                key: getattr(noising, key, getattr(denoising, key))
                for key in ("mask_ratio", "poisson_lambda", "random_ratio", "permute_ratio")
                + ("rotate_prob", "max_word_pieces")
            }
        )
    return Seq2SeqConfig(
        noise_density=getattr(span, "noise_density", base.noise_density),
        mean_span=getattr(span, "mean_span", base.mean_span),
        denoising=denoising,
        language_token=bool(getattr(noising, "language_token", base.language_token)),
        decoder_len=int(getattr(objective, "decoder_len", base.decoder_len)),
    )


def build_loader(
    cfg: DataConfig,
    *,
    dp_rank: int,
    dp_world_size: int,
    objective: str = "clm",
    masking: MaskingConfig | None = None,
    seed: int = 0,
    vocab: Vocab | None = None,
    languages: list[str] | None = None,
) -> StreamingLoader:
    """A rank's :class:`StreamingLoader` from the ``data`` section of a run config.

    ``seed`` is used when ``cfg.seed`` is None (the trainer passes ``train.seed``).
    ``languages``: the run's language index (default: the manifest's tokenizer's languages);
    pass the training loader's ``dataset.languages`` to a validation loader to be explicit.

    Raises:
        TypeError: ``cfg`` is not a :class:`~data_pipeline.config.DataConfig`.
        ValueError, FileNotFoundError: as :class:`StreamingDataset`.
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_loader: cfg ({type(cfg).__name__}) must be a DataConfig")
    ds = StreamingDataset(
        cfg.manifest,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        objective=objective,
        vocab=vocab,
        masking=masking,
        alpha=cfg.alpha,
        language_weights=dict(cfg.language_weights),
        pair_weights=dict(cfg.pair_weights),
        seed=seed if cfg.seed is None else cfg.seed,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        reset_position_ids=cfg.reset_position_ids,
        min_carry_tokens=cfg.min_carry_tokens,
        on_bad_shard=cfg.on_bad_shard,
        languages=languages,
        tlm_swap_prob=cfg.tlm_swap_prob,
        synthetic_ratio=cfg.synthetic_ratio,
        parallel_upsample=cfg.parallel_upsample,
    )
    return StreamingLoader(ds)


__all__ = [
    "IGNORE_INDEX",
    "MaskingConfig",
    "StreamingDataset",
    "StreamingLoader",
    "Vocab",
    "build_loader",
    "masking_from_objective",
    "seq2seq_from_objective",
]
