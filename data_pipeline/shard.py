"""The sharding job: raw text -> token shards (format: ``data_pipeline.shard_format``) + manifest.

What to call: ``run_shard_job(mono, pairs=, tokenizer=, out=, settings=ShardSettings(...))`` ->
the manifest (``python -m data_pipeline shard``); ``build_manifest`` for the manifest of written
shards. Guarantees: the same inputs give the same shard bytes whatever the worker count; every
input document is a written document or a counted reject; a shard is complete or absent.

The main process reads the inputs in order (sorted languages, then sorted pairs; each input's
files sorted) and cuts them, without decoding, into chunks of about ``shard_text_bytes`` that
end at record boundaries (``text_inputs.iter_raw_segments``: C-level searches only, so one process
feeds many workers). Each chunk becomes one shard, parsed, tokenized and written by a worker.
Chunk boundaries depend on the inputs and settings only, and nothing random happens, so the
bytes written are the same for any number of workers.

An input that turns out bad part-way (``text_inputs.InputError``: a truncated or corrupt ``.zst`` or
``.gz`` file, a TSV without tabs, line-aligned files of different lengths) stops the job: the
shards this run wrote for that input are removed and no manifest is written, so nothing made from
the first part of a damaged file passes for the whole.

A shard is written under a temporary name and renamed when complete. Every sample records the
fingerprint of its chunk (its raw input bytes, the tokenizer and the settings); a re-run that
finds a shard under its final name with the same fingerprint keeps it instead of redoing it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipeline.manifest import MANIFEST_FORMAT, write_manifest
from data_pipeline.shard_format import (
    DEFAULT_SAMPLE_TOKENS,
    MONO_EXT,
    PAIR_EXT,
    ShardWriter,
    dtype_name,
    encode_mono_payload,
    encode_pair_payload,
    iter_raw_samples,
    token_dtype,
)
from data_pipeline.text_inputs import (
    DEFAULT_MAX_DOC_BYTES,
    DocBatch,
    InputError,
    MonoInput,
    PairInput,
    Rejects,
    Segment,
    iter_pair_segments,
    iter_raw_segments,
    parse_segment,
    resolve_format,
)
from data_pipeline.tokenizer import MODEL_FILE, SIDECAR_FILE, Tokenizer, load_tokenizer, sha256_file

DEFAULT_SHARD_TEXT_MB = 64
_SEGMENT_BYTES = 4 << 20
SHARD_NAME_RE = re.compile(r"^(mono_[A-Za-z0-9_]+|pair_[A-Za-z0-9_]+-[A-Za-z0-9_]+)_\d{5}\.tar$")
_TMP_RE = re.compile(r"^\.(mono|pair)_.*\.tar\.tmp-\d+$")
_FINGERPRINT_VERSION = 2


def default_workers() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ShardSettings:
    """What, besides the inputs and the tokenizer, decides a shard's bytes."""

    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    """Target tokens per sample (src + tgt for pairs); a longer document is a sample alone."""
    shard_text_bytes: int = DEFAULT_SHARD_TEXT_MB << 20
    """A new shard starts after this many bytes of (decompressed) input text."""
    fmt: str = "auto"
    """Monolingual input format: auto, lines, blank or jsonl (see ``data_pipeline.text_inputs``)."""
    text_field: str = "text"
    """JSONL field holding the document."""
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    """Longer documents (lines) are skipped and counted as ``too_long``."""

    def check(self) -> None:
        """Raises: ValueError naming the first setting out of range."""
        if self.sample_tokens < 1:
            raise ValueError(f"--sample-tokens ({self.sample_tokens}) must be >= 1")
        if self.shard_text_bytes < 1:
            raise ValueError(f"--shard-text-mb ({self.shard_text_bytes / (1 << 20):g}) must be > 0")
        if self.max_doc_bytes < 1:
            raise ValueError(f"--max-doc-bytes ({self.max_doc_bytes}) must be >= 1")
        resolve_format(Path("x"), self.fmt)


@dataclass
class _Task:
    """One chunk of one input: becomes at most one shard (none if nothing in it is usable)."""

    kind: str  # "mono" | "pair"
    name: str  # language, or "src-tgt"
    index: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return f"{self.kind}_{self.name}_{self.index:05d}"


@dataclass
class ShardResult:
    """What one shard holds; ``kept`` when a re-run found it finished, ``path`` "" when the chunk
    had no usable document (no shard; its rejects still count)."""

    path: str
    kind: str
    name: str
    sha256: str
    bytes: int
    samples: int
    documents: int
    src_tokens: int
    tgt_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    kept: bool = False

    @property
    def tokens(self) -> int:
        return self.src_tokens + self.tgt_tokens


@dataclass
class _Worker:
    tokenizer: Tokenizer
    out: Path
    settings: ShardSettings
    dtype: np.dtype = field(init=False)
    buffers: bool = field(init=False)
    """Whether sentencepiece's buffer output can be used (see ``_encode_via_buffers``)."""

    def __post_init__(self) -> None:
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.buffers = _buffers_usable(self.tokenizer.sp)

    def encode(self, texts: list[str], *, eos: bool) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated ids of ``texts`` (``self.dtype``; each ending with eos when ``eos``)
        and cumulative offsets from 0."""
        sp = self.tokenizer.sp
        if self.buffers:
            encoded = _encode_via_buffers(sp, texts, self.dtype, eos=eos)
            if encoded is not None:
                return encoded
        return _encode_via_lists(sp, texts, self.dtype, eos=eos)


_WORKER: _Worker | None = None


def _init_worker(tokenizer_dir: str, out: str, settings: ShardSettings) -> None:
    global _WORKER
    _WORKER = _Worker(load_tokenizer(tokenizer_dir), Path(out), settings)


def _fingerprint(task: _Task, worker: _Worker) -> str:
    """Identifies a chunk's raw input and the settings it is sharded with."""
    digest = hashlib.sha256()
    settings = worker.settings
    head = {
        "v": _FINGERPRINT_VERSION,
        "kind": task.kind,
        "name": task.name,
        "index": task.index,
        "tokenizer": worker.tokenizer.model_sha256,
        "sample_tokens": settings.sample_tokens,
        "max_doc_bytes": settings.max_doc_bytes,
        "text_field": settings.text_field,
        "segments": [
            (s.source, s.first_line, s.fmt, len(s.data), len(s.tgt_data or b""))
            for s in task.segments
        ],
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for segment in task.segments:  # raw bytes: no decoding needed to recognise a chunk
        digest.update(segment.data)
        digest.update(segment.tgt_data or b"")
    return digest.hexdigest()[:16]


def _existing_result(path: Path, task: _Task, chunk: str) -> ShardResult | None:
    """Counts of a finished shard made from the same chunk, or None if it must be redone."""
    samples = documents = src_tokens = tgt_tokens = 0
    rejected: dict[str, int] = {}
    try:
        for _, meta, _, _ in iter_raw_samples(path):
            if meta.get("chunk") != chunk:
                return None
            if samples == 0:
                rejected = dict(meta["rejected"])
            samples += 1
            documents += meta["num_docs"]
            if task.kind == "mono":
                src_tokens += meta["num_tokens"]
            else:
                src_tokens += meta["src_tokens"]
                tgt_tokens += meta["tgt_tokens"]
    except (ValueError, KeyError, TypeError, OSError):
        return None
    if samples == 0:
        return None
    return ShardResult(
        path=path.name,
        kind=task.kind,
        name=task.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        samples=samples,
        documents=documents,
        src_tokens=src_tokens,
        tgt_tokens=tgt_tokens,
        rejected=rejected,
        kept=True,
    )


def _flatten(ids: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ids and cumulative offsets (``len(ids) + 1`` entries, from 0)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    cum = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(cum[-1]))
    return flat, cum


def _encode_via_lists(
    sp: spm.SentencePieceProcessor, texts: list[str], dtype: np.dtype, *, eos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` (each ending with eos when ``eos``) through sentencepiece's public
    ``encode``: one Python list per text."""
    return _flatten(sp.encode(texts, num_threads=1, add_eos=eos), dtype)


def _encode_via_buffers(
    sp: spm.SentencePieceProcessor, texts: list[str], dtype: np.dtype, *, eos: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Ids of ``texts`` as :func:`_encode_via_lists` gives them, without a Python int per id.

    sentencepiece's batch entry point behind ``encode(out_type="numpy")`` returns one raw
    int32 vector per text. Asked to end each text with eos (a control symbol, which encoding
    text never produces), their concatenation carries the text boundaries, so one join and
    a few whole-array operations replace per-text Python work. None when the eos count does
    not match (then the caller falls back to the public path).
    """
    eos_id = sp.eos_id()
    # positional: texts, num_threads, thread_pool, enable_sampling, nbest_size, alpha,
    # add_bos, add_eos, reverse (checked against the public path by _buffers_usable)
    buffers = sp._processor._EncodeAsBufferBatch(texts, 1, None, False, -1, 0.0, False, True, False)
    ids = np.frombuffer(b"".join(buffers), dtype=np.intc)
    del buffers
    is_eos = ids == eos_id
    ends = np.flatnonzero(is_eos)
    if len(ends) != len(texts) or (len(ids) and ids[-1] != eos_id):
        return None
    cum = np.zeros(len(texts) + 1, dtype=np.int64)
    if eos:
        cum[1:] = ends + 1
        return ids.astype(dtype), cum
    cum[1:] = ends - np.arange(len(texts))  # ids before text i's eos, minus the i earlier eos
    return ids[~is_eos].astype(dtype), cum


_PROBE_TEXTS = ["Rosetta: 12 ids, «δοκιμή» テスト 测试 — ok?", "x", "  two  spaces  "]


def _buffers_usable(sp: spm.SentencePieceProcessor) -> bool:
    """Whether :func:`_encode_via_buffers` works with this sentencepiece build and model.

    The buffer entry point is private API: it is used only if it exists, the model has a
    control eos, and it gives exactly the public path's ids on probe texts.
    """
    eos = sp.eos_id()
    if not hasattr(getattr(sp, "_processor", None), "_EncodeAsBufferBatch"):
        return False
    if eos < 0 or not sp.is_control(eos):
        return False
    wide = np.dtype("<u4")
    for eos_too in (False, True):
        try:
            got = _encode_via_buffers(sp, _PROBE_TEXTS, wide, eos=eos_too)
        except (TypeError, ValueError, RuntimeError):  # another signature in another version
            return False
        want = _encode_via_lists(sp, _PROBE_TEXTS, wide, eos=eos_too)
        if got is None or not all(np.array_equal(g, w) for g, w in zip(got, want)):
            return False
    return True


def _sample_bounds(
    runs: list[tuple[str, int]], cum: np.ndarray, target: int
) -> Iterator[tuple[int, int, str]]:
    """Greedy packing: yield ``(start, stop, source)`` document ranges, one per sample.

    A sample takes documents in order while its total (``cum`` is the cumulative size, from 0)
    stays within ``target``, at least one document, and never crosses into another file.
    """
    start = 0
    run_stop = 0
    for source, count in runs:
        run_stop += count
        while start < run_stop:
            # the last j with cum[j] - cum[start] <= target, searched per sample, not per document
            stop = int(np.searchsorted(cum, cum[start] + target, side="right")) - 1
            stop = min(max(stop, start + 1), run_stop)
            yield start, stop, source
            start = stop


def _parse(task: _Task, worker: _Worker) -> tuple[DocBatch, list[tuple[str, int]], Rejects]:
    """The chunk's documents in one batch, the (file, count) runs they came in, and rejects."""
    rejects = Rejects()
    merged = DocBatch("", [], [], [] if task.kind == "pair" else None)
    runs: list[tuple[str, int]] = []
    for segment in task.segments:
        batch = parse_segment(
            segment,
            kind=task.kind,
            text_field=worker.settings.text_field,
            max_doc_bytes=worker.settings.max_doc_bytes,
            rejects=rejects,
        )
        if not batch.texts:
            continue
        if runs and runs[-1][0] == batch.source:
            runs[-1] = (batch.source, runs[-1][1] + len(batch))
        else:
            runs.append((batch.source, len(batch)))
        merged.ordinals += batch.ordinals
        merged.texts += batch.texts
        if merged.tgt_texts is not None:
            merged.tgt_texts += batch.tgt_texts or []
    return merged, runs, rejects


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the duration (and back on if it was on).

    A chunk's work allocates containers by the hundred thousand (pair tuples while parsing, and
    on the list path one Python list per document), each counting towards the collector's
    thresholds, and its passes over them all are pure overhead: a chunk makes no reference
    cycles. (Plain ``encode`` of the sample corpus takes 1.3-1.5x as long with it on; the job,
    with buffers, about 5% longer, or 13% on the list path.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _process(task: _Task) -> ShardResult:
    with _gc_paused():
        return _process_chunk(task)


def _process_chunk(task: _Task) -> ShardResult:
    worker = _WORKER
    assert worker is not None, "worker not initialised"
    path = worker.out / f"{task.stem}.tar"
    chunk = _fingerprint(task, worker)
    if path.exists():
        kept = _existing_result(path, task, chunk)
        if kept is not None:
            return kept
    docs, runs, rejects = _parse(task, worker)
    rejected = rejects.as_dict()
    if not docs.texts:  # nothing usable: no shard (an empty one would only cost a loader)
        path.unlink(missing_ok=True)
        return ShardResult(
            path="",
            kind=task.kind,
            name=task.name,
            sha256="",
            bytes=0,
            samples=0,
            documents=0,
            src_tokens=0,
            rejected=rejected,
        )
    mono = docs.tgt_texts is None
    encoded = [worker.encode(docs.texts, eos=mono)]  # mono samples store eos (shard_format)
    if not mono:
        encoded.append(worker.encode(docs.tgt_texts, eos=False))
    return _write_shard(
        path,
        task,
        docs,
        runs,
        encoded,
        rejected=rejected,
        chunk=chunk,
        dtype=worker.dtype,
        sample_tokens=worker.settings.sample_tokens,
        eos_id=worker.tokenizer.sp.eos_id(),
    )


def _write_shard(
    path: Path,
    task: _Task,
    docs: DocBatch,
    runs: list[tuple[str, int]],
    encoded: list[tuple[np.ndarray, np.ndarray]],
    *,
    rejected: dict[str, int],
    chunk: str,
    dtype: np.dtype,
    sample_tokens: int,
    eos_id: int,
) -> ShardResult:
    """Pack a chunk's encoded documents into samples, write its shard and describe it.

    ``encoded`` holds ``(ids, offsets)`` from ``_Worker.encode``: of the documents each ending
    with ``eos_id``, or of the source then the target sides of pairs (no eos). A mono sample
    holds at most ``sample_tokens`` ids, eos included (or one longer document).
    """
    src_total = tgt_total = 0
    with ShardWriter(path, dtype=dtype) as writer:
        if task.kind == "mono":
            tokens, cum = encoded[0]
            for a, b, source in _sample_bounds(runs, cum, sample_tokens):
                meta = {
                    "kind": "mono",
                    "lang": task.name,
                    "source": source,
                    "first_doc": docs.ordinals[a],
                    "num_docs": b - a,
                    "num_tokens": int(cum[b] - cum[a]) - (b - a),  # without the eos ids
                    "eos": eos_id,
                    "dtype": dtype_name(dtype),
                    "chunk": chunk,
                }
                if a == 0:  # a re-run that keeps this shard takes the counts from here
                    meta["rejected"] = rejected
                payload = encode_mono_payload(
                    tokens[cum[a] : cum[b]], doc_offsets=cum[a : b + 1] - cum[a]
                )
                writer.add_sample(meta, payload=payload, ext=MONO_EXT)
            src_total = int(cum[-1]) - len(docs.texts)
        else:
            (src, src_cum), (tgt, tgt_cum) = encoded
            src_lang, tgt_lang = task.name.split("-")
            for a, b, source in _sample_bounds(runs, src_cum + tgt_cum, sample_tokens):
                meta = {
                    "kind": "pair",
                    "src": src_lang,
                    "tgt": tgt_lang,
                    "source": source,
                    "first_doc": docs.ordinals[a],
                    "num_docs": b - a,
                    "src_tokens": int(src_cum[b] - src_cum[a]),
                    "tgt_tokens": int(tgt_cum[b] - tgt_cum[a]),
                    "dtype": dtype_name(dtype),
                    "chunk": chunk,
                }
                if a == 0:
                    meta["rejected"] = rejected
                payload = encode_pair_payload(
                    src[src_cum[a] : src_cum[b]],
                    src_offsets=src_cum[a : b + 1] - src_cum[a],
                    tgt=tgt[tgt_cum[a] : tgt_cum[b]],
                    tgt_offsets=tgt_cum[a : b + 1] - tgt_cum[a],
                )
                writer.add_sample(meta, payload=payload, ext=PAIR_EXT)
            src_total, tgt_total = int(src_cum[-1]), int(tgt_cum[-1])
        samples = writer.num_samples
    return ShardResult(
        path=path.name,
        kind=task.kind,
        name=task.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        samples=samples,
        documents=len(docs.texts),
        src_tokens=src_total,
        tgt_tokens=tgt_total,
        rejected=rejected,
    )


def _chunks(segments: Iterator[Segment], *, kind: str, name: str, limit: int) -> Iterator[_Task]:
    """Group segments into tasks of at least ``limit`` bytes (the last one may be smaller)."""
    task = _Task(kind, name, 0)
    size = 0
    for segment in segments:
        task.segments.append(segment)
        size += len(segment.data) + len(segment.tgt_data or b"")
        if size >= limit:
            yield task
            task, size = _Task(kind, name, task.index + 1), 0
    if task.segments:
        yield task


def _tasks(
    mono: list[MonoInput],
    pairs: list[PairInput],
    settings: ShardSettings,
    rejects: dict[str, Rejects],
) -> Iterator[_Task]:
    # segments are cut smaller than a shard, so a shard overshoots its size by one at most
    piece = min(settings.shard_text_bytes, _SEGMENT_BYTES)
    inputs = [
        (
            "mono",
            item.lang,
            (
                segment
                for path in item.paths
                for segment in iter_raw_segments(
                    path,
                    fmt=settings.fmt,
                    target_bytes=piece,
                    max_doc_bytes=settings.max_doc_bytes,
                    rejects=rejects[item.lang],
                )
            ),
        )
        for item in mono
    ]
    inputs += [
        (
            "pair",
            pair.name,
            iter_pair_segments(
                pair,
                target_bytes=piece,
                max_doc_bytes=settings.max_doc_bytes,
                rejects=rejects[pair.name],
            ),
        )
        for pair in pairs
    ]
    for kind, name, segments in inputs:  # generators: nothing is read before its turn
        try:
            yield from _chunks(segments, kind=kind, name=name, limit=settings.shard_text_bytes)
        except InputError as err:
            err.input_name = name
            raise


def _run(tasks: Iterator[_Task], workers: int, init_args: tuple) -> Iterator[ShardResult]:
    """Results in task order, with at most ``2 * workers`` chunks in memory at once."""
    if workers == 1:
        _init_worker(*init_args)
        for task in tasks:
            yield _process(task)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=init_args
    ) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_process, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _shard_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Shard name -> (inode, mtime in ns) of the shards in ``out``."""
    stamps = {}
    for path in out.iterdir():
        if SHARD_NAME_RE.match(path.name):
            st = path.stat()
            stamps[path.name] = (st.st_ino, st.st_mtime_ns)
    return stamps


def _drop_written_for(out: Path, name: str, before: dict[str, tuple[int, int]]) -> list[str]:
    """Remove the shards of input ``name`` (a language or pair) that this run wrote, i.e. that
    were not in ``out`` as they are now when it started; return their names.

    Called when that input turned out to be bad part-way: what came from its first part must
    not be mistaken for the whole input (shards of an earlier run stay, as its manifest lists
    them).
    """
    kind = "pair" if "-" in name else "mono"
    prefix = f"{kind}_{name}_"
    removed = []
    for old, stamp in sorted(_shard_stamps(out).items()):
        if old.startswith(prefix) and before.get(old) != stamp:
            (out / old).unlink(missing_ok=True)
            removed.append(old)
    return removed


def _check_out_dir(out: Path) -> None:
    """Create the output directory ``out``.

    Raises:
        ValueError: ``out`` is an existing file, or cannot be created (one line).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r}: cannot create it ({err.strerror})") from None


def _copy_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    dest = out / "tokenizer"
    dest.mkdir(exist_ok=True)
    for name in (MODEL_FILE, SIDECAR_FILE):
        src, dst = tokenizer.directory / name, dest / name
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def run_shard_job(
    mono: list[MonoInput],
    *,
    pairs: list[PairInput] | None = None,
    tokenizer: str | os.PathLike,
    out: str | os.PathLike,
    workers: int | None = None,
    settings: ShardSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize ``mono`` and ``pairs`` into shards under ``out`` and write its manifest.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        ValueError: nothing to shard, a setting out of range, ``workers`` < 1, a language the
            tokenizer was not trained for, a bad tokenizer directory, or ``out`` is a file.
        InputError: a truncated or corrupt compressed input, a TSV without tabs, line-aligned
            files of different lengths; the shards this run wrote for that input are removed
            and no manifest is written.
        FileNotFoundError: the tokenizer directory or an input file is missing.
    """
    # shards are numbered in this order, so it must not depend on how the caller listed inputs
    mono = sorted(mono, key=lambda item: item.lang)
    pairs = sorted(pairs or [], key=lambda pair: pair.name)
    settings = settings or ShardSettings()
    settings.check()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers ({workers}) must be >= 1")
    if not mono and not pairs:
        raise ValueError("shard: give at least one --input LANG=PATH or --parallel SRC-TGT=PATH")
    tok = load_tokenizer(tokenizer)
    known = set(tok.lang_ids)
    for lang in [m.lang for m in mono] + [x for p in pairs for x in (p.src, p.tgt)]:
        if lang not in known:
            raise ValueError(
                f"language {lang!r} is not one of the tokenizer's languages "
                f"({', '.join(sorted(known))}); train the tokenizer with it"
            )
    log = log or (lambda line: print(line, file=sys.stderr))
    out = Path(out)
    _check_out_dir(out)
    for stale in out.iterdir():  # temporary files of an interrupted run
        if _TMP_RE.match(stale.name):
            stale.unlink()
    _copy_tokenizer(tok, out)

    rejects = {m.lang: Rejects() for m in mono} | {p.name: Rejects() for p in pairs}
    init_args = (str(tok.directory), str(out), settings)
    results: list[ShardResult] = []
    before = _shard_stamps(out)
    try:
        for result in _run(_tasks(mono, pairs, settings, rejects), workers, init_args):
            rejects[result.name].merge(result.rejected)
            if not result.path:
                continue
            results.append(result)
            log(
                f"{result.path}: {'kept (finished earlier)' if result.kept else 'written'}, "
                f"{result.samples} samples, {result.documents} documents, {result.tokens} tokens"
            )
    except InputError as err:
        # the pool is gone (its workers are stopped when _run's generator closes), so every
        # shard of that input is final or an orphaned temporary file now
        for stale in out.iterdir():
            if _TMP_RE.match(stale.name):
                stale.unlink(missing_ok=True)
        if err.input_name:
            removed = _drop_written_for(out, err.input_name, before)
            if removed:
                log(f"removed {len(removed)} shard(s) of {err.input_name} written before the fault")
        err.args = (f"{err}; nothing written for {err.input_name or 'it'}, no manifest written",)
        raise
    written = {r.path for r in results}
    for old in sorted(out.iterdir()):
        # shards of an earlier run over more input would be picked up by a directory glob
        if SHARD_NAME_RE.match(old.name) and old.name not in written:
            log(f"{old.name}: removed (not produced from the current inputs)")
            old.unlink()
    manifest = build_manifest(
        results, tok=tok, settings=settings, rejects=rejects, mono=mono, pairs=pairs
    )
    write_manifest(out, manifest)
    return manifest


def build_manifest(
    results: list[ShardResult],
    *,
    tok: Tokenizer,
    settings: ShardSettings,
    rejects: dict[str, Rejects],
    mono: list[MonoInput],
    pairs: list[PairInput],
) -> dict:
    """The manifest for ``results`` (see ``data_pipeline.manifest``)."""
    languages: dict[str, dict] = {}
    for item in mono:
        mine = [r for r in results if r.kind == "mono" and r.name == item.lang]
        languages[item.lang] = {
            "documents": sum(r.documents for r in mine),
            "tokens": sum(r.tokens for r in mine),
            "samples": sum(r.samples for r in mine),
            "shards": len(mine),
            "rejected": rejects[item.lang].as_dict(),
            "sources": sorted({p.name for p in item.paths}),
        }
    pair_stats: dict[str, dict] = {}
    for pair in pairs:
        mine = [r for r in results if r.kind == "pair" and r.name == pair.name]
        pair_stats[pair.name] = {
            "src": pair.src,
            "tgt": pair.tgt,
            "documents": sum(r.documents for r in mine),
            "tokens": sum(r.tokens for r in mine),
            "src_tokens": sum(r.src_tokens for r in mine),
            "tgt_tokens": sum(r.tgt_tokens for r in mine),
            "samples": sum(r.samples for r in mine),
            "shards": len(mine),
            "rejected": rejects[pair.name].as_dict(),
            "sources": sorted({p.name for p in pair.paths}),
        }
    shards = []
    for r in results:
        entry = {
            "path": r.path,
            "kind": r.kind,
            "sha256": r.sha256,
            "bytes": r.bytes,
            "samples": r.samples,
            "documents": r.documents,
            "tokens": r.tokens,
        }
        if r.kind == "mono":
            entry["lang"] = r.name
        else:
            entry.update(pair=r.name, src_tokens=r.src_tokens, tgt_tokens=r.tgt_tokens)
        shards.append(entry)
    return {
        "format": MANIFEST_FORMAT,
        "tokenizer": {
            "dir": "tokenizer",
            "model_sha256": tok.model_sha256,
            "vocab_size": tok.vocab_size,
        },
        "dtype": dtype_name(token_dtype(tok.vocab_size)),
        "sample_tokens": settings.sample_tokens,
        "shard_text_bytes": settings.shard_text_bytes,
        "languages": languages,
        "pairs": pair_stats,
        "shards": shards,
    }
