"""The streaming loader: language-mixed CLM / MLM / TLM batches from a shard manifest, resumable.

Shape legend: ``B`` sequences per batch (``batch_size``), ``T`` tokens per sequence (``seq_len``),
``L`` languages (``dataset.languages``).

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
    tokens_per_lang [L]     int64  non-padding tokens of each language in this batch
    docs_per_lang   [L]     int64  documents starting in this batch per language (TLM: pairs,
                                   counted under the source language)

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
``T`` is cut, both sides keeping their eos (counted in ``truncated_tokens``).

Language mixing: every row is drawn from one source (language, or language pair for TLM) with
p_l = q_l^alpha / sum_k q_k^alpha, q_l = n_l / N, n_l = the source's tokens in the manifest (or
explicit weights). The draw is stratified (stride scheduling): each slot emits next the source
whose emitted tokens / p_l is smallest, so the realised token share tracks p_l within one row's
tokens at every point of the stream. In MLM batches, ``round`` of ``tlm_share * B`` rows (exact
over consecutive batches) are TLM rows and come first.

Shards, slots and passes: see ``data_pipeline.streams``. A rank with ``num_workers`` W runs W
slots (one per DataLoader worker, or round-robin in process when W = 0 gives one slot), and
batch ``k`` of the rank comes from local slot ``(next_worker + k) % W``: the same batches with
or without worker processes.

State (``state_dict()``, plain Python values, picklable, JSON-able)::

    {"format": "rosetta-loader/1", "seed", "fingerprint" (sha256 of the manifest's shard list),
     "dp_rank", "dp_world_size", "num_workers", "num_slots", "next_worker",
     "slots": [{"slot": global slot id, "generation", "rng" (numpy PCG64 state), "batches",
                "emitted": {source: tokens}, "counters": {...},
                "streams": {source: {"ranges", "buffer", "partials"}}}, ...]}

Exact resume: ``load_state_dict(own state)`` with the same dp world size and worker count gives
the batches an uninterrupted run gives, bit for bit. Elastic resume: pass the list of every old
rank's state (``load_state_dict([state_rank0, state_rank1, ...])``) to every new rank; the
streams are pooled and dealt over the new slots (``streams.redistribute``) so that no document
of the current pass is lost or repeated.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.manifest import load_manifest, manifest_path
from data_pipeline.sampling import check_alpha, language_probabilities
from data_pipeline.streams import ShardReader, Source, StreamState, redistribute
from data_pipeline.transforms import (
    ID_DTYPE,
    IGNORE_INDEX,
    MaskingConfig,
    Vocab,
    boundaries_from_starts,
    join_mono,
    join_pairs,
    mask_tokens,
)

log = logging.getLogger(__name__)

STATE_FORMAT = "rosetta-loader/1"
OBJECTIVES = ("clm", "mlm")
BAD_SHARD_POLICIES = ("skip", "raise")
COUNTER_KEYS = ("dropped_tokens", "truncated_tokens", "bad_samples")


def _fresh_counters(languages: list[str]) -> dict:
    return {
        "tokens": dict.fromkeys(languages, 0),
        "documents": dict.fromkeys(languages, 0),
        **dict.fromkeys(COUNTER_KEYS, 0),
    }


def _add_counters(into: dict, other: dict) -> None:
    for key in ("tokens", "documents"):
        for lang, n in other[key].items():
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


class StreamingDataset(IterableDataset):
    """Endless batches of one dp rank: a torch IterableDataset yielding whole batches.

    Iterated in process, it runs its slots round-robin and keeps its state itself; inside
    DataLoader workers (use :class:`StreamingLoader`), each worker runs one slot and yields
    ``(batch, slot state)``.

    Args:
        manifest: a shard directory's manifest.json, or the directory.
        dp_rank, dp_world_size: this rank and the data-parallel world size.
        seq_len: T. batch_size: B.
        objective: ``clm`` (packed causal LM) or ``mlm`` (BERT masking, plus TLM rows from
            pair shards per ``masking.tlm_share``).
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

    Raises:
        ValueError: a bad argument, a manifest naming a missing shard, weights naming unknown
            languages, an objective without data (one line each).
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
        for entry in data["shards"]:
            path = root / entry["path"]
            if not path.is_file():
                raise ValueError(
                    f"manifest {str(file)!r} names shard {entry['path']!r}, which is missing "
                    "(every listed shard must exist)"
                )
            name = entry["lang"] if entry["kind"] == "mono" else entry["pair"]
            src = sources.setdefault(name, Source(name, entry["kind"], [], [], 0))
            if entry.get("samples", 0) > 0:
                src.paths.append(str(path))
                src.samples_per_shard.append(int(entry["samples"]))
                src.tokens += int(entry.get("tokens", 0))
        sources = {k: v for k, v in sources.items() if v.num_samples > 0}
        self.sources = dict(sorted(sources.items()))
        mono = {k: s.tokens for k, s in self.sources.items() if s.kind == "mono"}
        pairs = {k: s.tokens for k, s in self.sources.items() if s.kind == "pair"}
        self.pair_langs = {
            k: (data["pairs"][k]["src"], data["pairs"][k]["tgt"])
            if k in data.get("pairs", {})
            else tuple(k.split("-", 1))
            for k in pairs
        }
        self.languages = sorted(set(mono) | {x for p in self.pair_langs.values() for x in p})
        self.lang_index = {lang: i for i, lang in enumerate(self.languages)}
        self.mono_p = _probabilities(
            mono, alpha=alpha, weights=language_weights or {}, what="language_weights"
        )
        self.pair_p = _probabilities(
            pairs, alpha=alpha, weights=pair_weights or {}, what="pair_weights"
        )
        tlm_share = self.masking.tlm_share if objective == "mlm" else 0.0
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
        self._slots = [
            self._fresh_slot(dp_rank * self.slots_per_rank + j, generation=0)
            for j in range(self.slots_per_rank)
        ]
        self.next_worker = 0
        self._live: list[_SlotRunner] | None = None

    # --- state ---------------------------------------------------------------------------------

    def _fresh_slot(self, slot: int, *, generation: int) -> dict:
        return {
            "slot": slot,
            "generation": generation,
            "rng": np.random.default_rng([self.seed, slot, generation]).bit_generator.state,
            "batches": 0,
            "emitted": dict.fromkeys(self.sources, 0.0),
            "counters": _fresh_counters(self.languages),
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
                    f"loader state format ({s.get('format')!r}) must be {STATE_FORMAT}"
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
        generation = max(x["generation"] for x in old_slots) + 1
        self._slots = []
        for j in range(self.slots_per_rank):
            slot = self.dp_rank * self.slots_per_rank + j
            new = self._fresh_slot(slot, generation=generation)
            new["streams"] = streams[slot]
            if slot < old_num:  # keep the mixing schedule where a slot survives
                new["emitted"] = old_slots[slot]["emitted"]
                new["batches"] = old_slots[slot]["batches"]
            for old in old_slots:
                if old["slot"] % self.num_slots == slot:
                    _add_counters(new["counters"], old["counters"])
            self._slots.append(new)
        self.next_worker = 0

    @property
    def counters(self) -> dict:
        """Totals of this rank so far: tokens and documents per language, dropped and
        truncated tokens, bad samples skipped."""
        self._sync()
        out = _fresh_counters(self.languages)
        for slot in self._slots:
            _add_counters(out, slot["counters"])
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
        self.emitted = dict(state["emitted"])
        self.counters = json.loads(json.dumps(state["counters"]))
        self.streams = {k: StreamState.from_dict(v) for k, v in state["streams"].items()}
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
        self.mono_queue = self._queue(ds.mono_p)
        self.pair_queue = self._queue(ds.pair_p)
        B, T = ds.batch_size, ds.seq_len
        self.arange_BT = np.broadcast_to(np.arange(T, dtype=ID_DTYPE), (B, T)).copy()
        # position_ids and attention_mask of every batch without position resets and padding
        # (all CLM and mono MLM batches by default): one tensor each, shared by those batches
        self.positions_BT = torch.from_numpy(self.arange_BT.copy())
        self.all_tokens_BT = torch.ones((B, T), dtype=torch.bool)

    def state(self) -> dict:
        return {
            "slot": self.slot,
            "generation": self.generation,
            "rng": self.rng.bit_generator.state,
            "batches": self.batches,
            "emitted": dict(self.emitted),
            "counters": json.loads(json.dumps(self.counters)),
            "streams": {k: v.to_dict() for k, v in self.streams.items()},
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
        ids, lang, pos, seg = join_pairs(
            sample["src_tokens"],
            sample["src_offsets"],
            sample["tgt_tokens"],
            sample["tgt_offsets"],
            eos_id=eos,
            src_lang=self.ds.lang_index[src_lang],
            tgt_lang=self.ds.lang_index[tgt_lang],
        )
        src_len = np.diff(sample["src_offsets"].astype(np.int64)) + 1
        src_cum = np.zeros(len(src_len) + 1, dtype=np.int64)  # source tokens before each pair
        np.cumsum(src_len, out=src_cum[1:])
        return {
            "ids": ids,
            "lang": lang,
            "pos": pos,
            "seg": seg,
            "src_len": src_len,
            "src_cum": src_cum,
            "meta": meta,
        }

    def _log_docs(self, name: str, joined: dict, first: int, last: int) -> None:
        source_file, first_doc, pass_index = joined["meta"]
        for d in range(first, last):
            self.ds.doc_log.append((name, source_file, first_doc + d, pass_index))

    # --- rows ----------------------------------------------------------------------------------

    def _queue(self, probs: Mapping[str, float]) -> list[tuple[float, int, str, float]]:
        """Stride-scheduling queue: a heap of ``(emitted / p, order, source, p)`` over sources
        with p > 0; its head is the source to emit next (the first in order on ties)."""
        queue = [
            (self.emitted[name] / p, i, name, p)
            for i, (name, p) in enumerate(probs.items())
            if p > 0
        ]
        heapq.heapify(queue)
        return queue

    def _emit(self, queue: list, entry: tuple, tokens: float) -> None:
        """Count ``tokens`` emitted by the source of ``entry`` (popped off ``queue``); requeue
        the source."""
        _, i, name, p = entry
        emitted = self.emitted[name] + tokens
        self.emitted[name] = emitted
        heapq.heappush(queue, (emitted / p, i, name, p))

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
                k, n, end, num_src = i + 1, T, int(seg[i + 1]), keep_src
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

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The slot's next batch (contract in the module docstring)."""
        ds = self.ds
        B, T = ds.batch_size, ds.seq_len
        num_tlm = math.floor((self.batches + 1) * ds.tlm_share * B) - math.floor(
            self.batches * ds.tlm_share * B
        )
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
            for b in range(num_tlm):
                entry = heapq.heappop(self.pair_queue)
                name = entry[2]
                pairs, filled = self._pair_row(name, b, rows, tokens_L)
                docs_L[self.pair_lang_index[name][0]] += pairs
                self._emit(self.pair_queue, entry, float(filled))
                fill_R.append(filled)
                # padding carries its row's first language, so that lang_ids stay valid indices
                ids_BT[b, filled:] = ds.vocab.pad_id
                lang_BT[b, filled:] = lang_BT[b, 0]
        queue = self.mono_queue
        row_lang, docs_R = [], []
        for b in range(num_tlm, B):
            entry = heapq.heappop(queue)
            name = entry[2]
            docs_R.append(self._mono_row(name, ids_BT[b]))
            lang = lang_index[name]
            lang_BT[b] = lang
            row_lang.append(lang)
            tokens_L[lang] += T
            self._emit(queue, entry, T)
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
        if ds.objective == "mlm":
            input_BT, labels_BT = mask_tokens(
                ids_BT,
                vocab=ds.vocab,
                cfg=ds.masking,
                rng=self.rng,
                valid_BT=valid_BT,
                special_V=self.special_V,
                normal_ids=self.normal_ids,
            )
        else:
            input_BT = labels_BT = ids_BT
        counted_tokens, counted_docs = self.counters["tokens"], self.counters["documents"]
        for i, lang in enumerate(ds.languages):
            if tokens_L[i]:
                counted_tokens[lang] += tokens_L[i]
            if docs_L[i]:
                counted_docs[lang] += docs_L[i]
        input_ids = torch.from_numpy(input_BT)
        return {
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
    tlm_share`` attributes (``pretrain.config.ObjectiveConfig``) onto :class:`MaskingConfig`."""
    return MaskingConfig(
        mask_prob=objective.mask_prob,
        replace_prob=objective.mask_replace_prob,
        random_prob=objective.mask_random_prob,
        whole_word=objective.whole_word,
        tlm_share=objective.tlm_share,
    )


def build_loader(
    cfg: object,
    *,
    dp_rank: int,
    dp_world_size: int,
    objective: str = "clm",
    masking: MaskingConfig | None = None,
    seed: int = 0,
    vocab: Vocab | None = None,
) -> StreamingLoader:
    """A rank's :class:`StreamingLoader` from a ``DataConfig`` (``data.*``).

    ``seed`` is used when ``cfg.seed`` is None (the trainer passes ``train.seed``).

    Raises:
        ValueError, FileNotFoundError: as :class:`StreamingDataset`.
    """
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
        pair_weights=dict(getattr(cfg, "pair_weights", {}) or {}),
        seed=seed if cfg.seed is None else cfg.seed,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        reset_position_ids=getattr(cfg, "reset_position_ids", False),
        min_carry_tokens=getattr(cfg, "min_carry_tokens", 0),
        on_bad_shard=getattr(cfg, "on_bad_shard", "skip"),
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
]
