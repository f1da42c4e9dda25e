"""Input specifications and raw-document readers for the data jobs.

An input names one language (``LANG=PATH``) or a language pair (``SRC-TGT=PATH``); ``PATH`` is a
file or a glob, and may instead carry the language in a ``{lang}`` (``{src}``, ``{tgt}``)
placeholder: ``--input 'corpus/{lang}.train.txt.zst'``. Files may be plain, ``.gz`` or ``.zst``.

Formats of monolingual files:
- ``lines``: one document per line (the default);
- ``blank``: documents separated by one or more blank lines (newlines inside a document kept);
- ``jsonl``: one JSON object per line, the document in a text field (``text`` by default).
``auto`` picks ``jsonl`` for ``*.jsonl``/``*.json`` (before any compression suffix), else ``lines``.

Parallel files: a TSV with ``source<TAB>target`` per line, or two line-aligned files given as
``SRC-TGT=SRC_PATH,TGT_PATH``.

Bad input never stops a job: documents that are not valid UTF-8, empty (only whitespace) or longer
than the byte limit are skipped and counted in a :class:`Rejects`.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

LANG_RE = re.compile(r"^[a-z]{2,3}(_[A-Za-z0-9]{2,8})*$")
"""Language codes: ISO 639 (``en``, ``yue``), optionally ``_Script``/``_REGION`` (``zh_Hant``)."""

FORMATS = ("auto", "lines", "blank", "jsonl")
DEFAULT_MAX_DOC_BYTES = 4 << 20
"""Documents (lines) longer than this in UTF-8 are skipped: in a text corpus they are junk."""

_READ_CHUNK = 1 << 20


def check_lang(lang: str, *, what: str = "language") -> str:
    """Return ``lang`` after checking it is a valid language code.

    Raises:
        ValueError: ``lang`` does not match ``LANG_RE``.
    """
    if not LANG_RE.match(lang):
        raise ValueError(
            f"{what} {lang!r} is not a language code (2-3 lowercase letters, e.g. 'en', 'zh_Hant')"
        )
    return lang


@dataclass(frozen=True)
class MonoInput:
    """One language's input files (sorted, globs expanded)."""

    lang: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class PairInput:
    """One language pair's input: TSV files, or one source and one target file (``aligned``)."""

    src: str
    tgt: str
    paths: tuple[Path, ...]
    aligned: bool = False

    @property
    def name(self) -> str:
        return f"{self.src}-{self.tgt}"


def _expand(pattern: str, *, option: str) -> list[Path]:
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"{option} {pattern!r}: no file matches this glob")
        return found
    path = Path(pattern)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {pattern!r}: no such file")
    return [path]


def _expand_placeholders(pattern: str, names: tuple[str, ...], *, option: str) -> dict:
    """Expand a path with ``{name}`` placeholders; return ``{(values...): [paths]}``."""
    regex = ""
    globbed = ""
    for part in re.split(r"(\{[a-z]+\})", pattern):
        if part in {"{" + n + "}" for n in names}:
            regex += r"([a-z]{2,3}(?:_[A-Za-z0-9]{2,8})*)"
            globbed += "*"
        else:
            regex += re.escape(part)
            globbed += part
    matcher = re.compile(regex + "$")
    grouped: dict[tuple[str, ...], list[Path]] = {}
    for hit in sorted(glob.glob(globbed)):
        m = matcher.match(hit)
        if m and os.path.isfile(hit):
            grouped.setdefault(m.groups(), []).append(Path(hit))
    if not grouped:
        raise FileNotFoundError(f"{option} {pattern!r}: no file matches this pattern")
    return grouped


def parse_mono_specs(specs: list[str]) -> list[MonoInput]:
    """Parse ``--input`` values (``LANG=PATH`` or a path with ``{lang}``) into inputs.

    The same language given twice gets the union of its files. Result sorted by language.

    Raises:
        ValueError: a malformed spec or language code.
        FileNotFoundError: a path or glob that matches no file.
    """
    by_lang: dict[str, list[Path]] = {}
    for spec in specs:
        lang, sep, path = spec.partition("=")
        if sep and LANG_RE.match(lang):
            by_lang.setdefault(lang, []).extend(_expand(path, option=f"--input {lang}"))
        elif "{lang}" in spec:
            grouped = _expand_placeholders(spec, ("lang",), option="--input")
            for (found_lang,), paths in grouped.items():
                by_lang.setdefault(found_lang, []).extend(paths)
        elif sep:
            check_lang(lang, what=f"--input {spec!r}: language")
        else:
            raise ValueError(f"--input {spec!r} must be LANG=PATH or a PATH containing {{lang}}")
    return [MonoInput(lang, tuple(sorted(set(p)))) for lang, p in sorted(by_lang.items())]


def parse_pair_specs(specs: list[str]) -> list[PairInput]:
    """Parse ``--parallel`` values into pair inputs.

    Forms: ``SRC-TGT=PATH.tsv`` (file or glob), ``SRC-TGT=SRC_FILE,TGT_FILE`` (line-aligned), or a
    TSV path with ``{src}`` and ``{tgt}`` placeholders. Result sorted by pair name.

    Raises:
        ValueError: a malformed spec, language code, or a pair whose two sides are equal.
        FileNotFoundError: a path or glob that matches no file.
    """
    pairs: dict[tuple[str, str], PairInput] = {}

    def add(src: str, tgt: str, paths: list[Path], aligned: bool, spec: str) -> None:
        check_lang(src, what=f"--parallel {spec!r}: source language")
        check_lang(tgt, what=f"--parallel {spec!r}: target language")
        if src == tgt:
            raise ValueError(f"--parallel {spec!r}: source and target language must differ")
        old = pairs.get((src, tgt))
        if old is not None and (old.aligned or aligned):
            raise ValueError(f"--parallel {spec!r}: pair {src}-{tgt} given twice")
        merged = sorted(set(paths) | set(old.paths if old else ()))
        pairs[(src, tgt)] = PairInput(src, tgt, tuple(paths if aligned else merged), aligned)

    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and re.match(r"^[A-Za-z0-9_]+-[A-Za-z0-9_]+$", name):
            src, tgt = name.split("-")
            if "," in path:
                src_path, _, tgt_path = path.partition(",")
                paths = [
                    _expand(src_path, option=f"--parallel {name} (source)")[0],
                    _expand(tgt_path, option=f"--parallel {name} (target)")[0],
                ]
                add(src, tgt, paths, True, spec)
            else:
                add(src, tgt, _expand(path, option=f"--parallel {name}"), False, spec)
        elif "{src}" in spec and "{tgt}" in spec:
            grouped = _expand_placeholders(spec, ("src", "tgt"), option="--parallel")
            for (src, tgt), paths in grouped.items():
                add(src, tgt, paths, False, spec)
        else:
            raise ValueError(
                f"--parallel {spec!r} must be SRC-TGT=PATH.tsv, SRC-TGT=SRC_FILE,TGT_FILE "
                "or a PATH containing {src} and {tgt}"
            )
    return [pairs[k] for k in sorted(pairs)]


def open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing ``.gz`` and ``.zst`` transparently.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    raw = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if path.suffix == ".zst":
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=_READ_CHUNK)
    return raw


def resolve_format(path: Path, fmt: str) -> str:
    """The concrete format (``lines``/``blank``/``jsonl``) used for ``path``.

    Raises:
        ValueError: ``fmt`` is not one of ``FORMATS``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    name = path.name
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    return "jsonl" if name.endswith((".jsonl", ".json")) else "lines"


@dataclass
class Rejects:
    """Counts of skipped input, by reason."""

    invalid_utf8: int = 0
    empty: int = 0
    too_long: int = 0
    bad_json: int = 0
    malformed: int = 0
    """TSV lines without exactly one tab, or aligned files of different lengths."""
    by_file: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, source: str, count: int = 1) -> None:
        setattr(self, reason, getattr(self, reason) + count)
        self.by_file[source] = self.by_file.get(source, 0) + count

    def merge(self, other: Rejects) -> None:
        for name in ("invalid_utf8", "empty", "too_long", "bad_json", "malformed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for source, n in other.by_file.items():
            self.by_file[source] = self.by_file.get(source, 0) + n

    def as_dict(self) -> dict[str, int]:
        """Reason -> count, without the per-file breakdown."""
        return {
            "invalid_utf8": self.invalid_utf8,
            "empty": self.empty,
            "too_long": self.too_long,
            "bad_json": self.bad_json,
            "malformed": self.malformed,
        }

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


@dataclass
class DocBatch:
    """Consecutive documents (or pairs) of one file, as parallel lists.

    Moving documents in lists rather than one tuple each keeps the per-document Python cost of
    the reading side small next to tokenization.
    """

    source: str
    """The file's base name (``a.en,a.de`` for aligned files)."""
    ordinals: list[int]
    """Each document's ordinal in the file (0-based line number for line formats)."""
    texts: list[str]
    """Documents, or source sides of pairs."""
    tgt_texts: list[str] | None = None
    """Target sides of pairs; None for monolingual batches."""

    def __len__(self) -> int:
        return len(self.texts)


_BATCH = 4096


def _batched(items: Iterator[tuple], source: str, *, pairs: bool = False) -> Iterator[DocBatch]:
    """Group ``(ordinal, text[, tgt])`` items into batches."""
    while True:
        chunk = list(itertools.islice(items, _BATCH))
        if not chunk:
            return
        yield DocBatch(
            source,
            [c[0] for c in chunk],
            [c[1] for c in chunk],
            [c[2] for c in chunk] if pairs else None,
        )


def iter_line_blocks(stream: BinaryIO, *, max_bytes: int) -> Iterator[list[bytes | None]]:
    """Yield the lines of a stream in lists, one list per block read.

    Each line is its bytes without ``\n`` (and without a ``\r`` before it), or ``None`` for a
    line longer than ``max_bytes``; an over-long line is never held whole in memory. Reading in
    1 MiB blocks and splitting in C keeps the per-line Python cost small.
    """
    carry = b""
    skipping = False  # inside an over-long line, dropping bytes up to its newline
    for block in iter(lambda: stream.read(_READ_CHUNK), b""):
        parts = block.split(b"\n")
        if len(parts) == 1:
            if not skipping:
                carry += block
                if len(carry) > max_bytes + 1:
                    skipping, carry = True, b""
            continue
        lines: list[bytes | None] = [None if skipping else carry + parts[0]]
        lines += parts[1:-1]
        carry, skipping = parts[-1], False
        if len(carry) > max_bytes + 1:
            skipping, carry = True, b""
        # per-line work only for blocks that need it: CRLF line ends, or a line over the limit
        if b"\r" in block or (lines[0] is not None and lines[0].endswith(b"\r")):
            lines = [x[:-1] if x is not None and x.endswith(b"\r") else x for x in lines]
        measured = lines[1:] if lines[0] is None else lines  # only the first can be None here
        if max(map(len, measured), default=0) > max_bytes:
            lines = [None if x is None or len(x) > max_bytes else x for x in lines]
        yield lines
    if skipping:
        yield [None]
    elif carry:
        carry = carry.removesuffix(b"\r")
        yield [None if len(carry) > max_bytes else carry]


def iter_lines(stream: BinaryIO, *, max_bytes: int) -> Iterator[bytes | None]:
    """Yield each line's bytes without its newline; ``None`` for a line over ``max_bytes``."""
    for lines in iter_line_blocks(stream, max_bytes=max_bytes):
        yield from lines


def _decode_lines(lines: list[bytes | None], rejects: Rejects, source: str) -> list[str | None]:
    """Decode a block of lines at once; line by line (counting faults) only if that fails."""
    if None not in lines:
        try:
            return b"\n".join(lines).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
    texts: list[str | None] = []
    for raw in lines:
        if raw is None:
            rejects.add("too_long", source)
            texts.append(None)
            continue
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.add("invalid_utf8", source)
            texts.append(None)
    return texts


def _iter_text_line_batches(
    stream: BinaryIO, max_bytes: int, rejects: Rejects, source: str
) -> Iterator[DocBatch]:
    """The ``lines`` format, one batch per block read."""
    base = 0
    for lines in iter_line_blocks(stream, max_bytes=max_bytes):
        texts = _decode_lines(lines, rejects, source)
        ordinals = list(range(base, base + len(texts)))
        base += len(texts)
        if None in texts or not all(texts) or any(map(str.isspace, texts)):
            keep = [t is not None and t != "" and not t.isspace() for t in texts]
            empty = sum(1 for t, k in zip(texts, keep) if t is not None and not k)
            if empty:
                rejects.add("empty", source, empty)
            texts = list(itertools.compress(texts, keep))
            ordinals = list(itertools.compress(ordinals, keep))
        if texts:
            yield DocBatch(source, ordinals, texts)


def _decode(raw: bytes, rejects: Rejects, source: str) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        rejects.add("invalid_utf8", source)
        return None
    if not text.strip():
        rejects.add("empty", source)
        return None
    return text


def iter_documents(
    path: Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[tuple[int, str]]:
    """Yield ``(ordinal, text)`` for the documents of one file, skipping and counting bad ones.

    ``ordinal`` numbers every document of the file from 0, skipped ones included, so for the
    ``lines`` and ``jsonl`` formats it is the 0-based line number.

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: ``path`` does not exist.
    """
    for batch in iter_document_batches(
        path, fmt=fmt, text_field=text_field, max_doc_bytes=max_doc_bytes, rejects=rejects
    ):
        yield from zip(batch.ordinals, batch.texts)


def iter_document_batches(
    path: Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[DocBatch]:
    """:func:`iter_documents` in batches (what the sharding job reads).

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: ``path`` does not exist.
    """
    fmt = resolve_format(path, fmt)
    source = path.name
    with open_binary(path) as stream:
        if fmt == "lines":
            yield from _iter_text_line_batches(stream, max_doc_bytes, rejects, source)
        elif fmt == "blank":
            yield from _batched(_iter_blank(stream, max_doc_bytes, rejects, source), source)
        else:
            yield from _batched(
                _iter_jsonl(stream, text_field, max_doc_bytes, rejects, source), source
            )


def _iter_jsonl(
    stream: BinaryIO, text_field: str, max_doc_bytes: int, rejects: Rejects, source: str
) -> Iterator[tuple[int, str]]:
    for ordinal, raw in enumerate(iter_lines(stream, max_bytes=max_doc_bytes)):
        if raw is None:
            rejects.add("too_long", source)
            continue
        if not raw.strip():
            rejects.add("empty", source)
            continue
        try:
            text = json.loads(raw)[text_field]
        except (ValueError, TypeError, KeyError, IndexError):
            rejects.add("bad_json", source)
            continue
        if not isinstance(text, str):
            rejects.add("bad_json", source)
            continue
        if not text.strip():
            rejects.add("empty", source)
            continue
        # JSON escapes let a lone surrogate (\ud800) through; it has no UTF-8 form
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            rejects.add("invalid_utf8", source)
            continue
        yield ordinal, text


def _iter_blank(
    stream: BinaryIO, max_doc_bytes: int, rejects: Rejects, source: str
) -> Iterator[tuple[int, str]]:
    parts: list[bytes] = []
    size = 0
    too_long = False
    ordinal = 0

    def flush() -> Iterator[tuple[int, str]]:
        if too_long:
            rejects.add("too_long", source)
        elif parts:
            text = _decode(b"\n".join(parts), rejects, source)
            if text is not None:
                yield ordinal, text

    for raw in iter_lines(stream, max_bytes=max_doc_bytes):
        if raw is not None and not raw.strip():
            if parts or too_long:
                yield from flush()
                ordinal += 1
            parts, size, too_long = [], 0, False
            continue
        if raw is None or size + len(raw) + 1 > max_doc_bytes:
            too_long, parts = True, []
            continue
        if not too_long:
            parts.append(raw)
            size += len(raw) + 1
    if parts or too_long:
        yield from flush()


def iter_pairs(
    pair: PairInput,
    *,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[tuple[str, int, str, str]]:
    """Yield ``(file name, ordinal, source text, target text)``, skipping and counting bad lines.

    ``ordinal`` is the 0-based line number in that file (or in both aligned files).

    Raises:
        FileNotFoundError: an input file does not exist.
    """
    for batch in iter_pair_batches(pair, max_doc_bytes=max_doc_bytes, rejects=rejects):
        for ordinal, src, tgt in zip(batch.ordinals, batch.texts, batch.tgt_texts or []):
            yield batch.source, ordinal, src, tgt


def iter_pair_batches(
    pair: PairInput,
    *,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[DocBatch]:
    """:func:`iter_pairs` in batches (what the sharding job reads).

    Raises:
        FileNotFoundError: an input file does not exist.
    """
    if pair.aligned:
        source = f"{pair.paths[0].name},{pair.paths[1].name}"
        yield from _batched(_iter_aligned(pair, max_doc_bytes, rejects, source), source, pairs=True)
        return
    for path in pair.paths:
        source = path.name
        with open_binary(path) as stream:
            base = 0
            for lines in iter_line_blocks(stream, max_bytes=2 * max_doc_bytes):
                texts = _decode_lines(lines, rejects, source)
                batch = DocBatch(source, [], [], [])
                for ordinal, line in enumerate(texts, base):
                    if line is None:
                        continue
                    src, tab, tgt = line.partition("\t")
                    if not tab or "\t" in tgt:
                        rejects.add("empty" if not line.strip() else "malformed", source)
                    elif not src.strip() or not tgt.strip():
                        rejects.add("empty", source)
                    else:
                        batch.ordinals.append(ordinal)
                        batch.texts.append(src)
                        batch.tgt_texts.append(tgt)
                base += len(texts)
                if batch.texts:
                    yield batch


def _iter_aligned(
    pair: PairInput, max_doc_bytes: int, rejects: Rejects, source: str
) -> Iterator[tuple[int, str, str]]:
    src_path, tgt_path = pair.paths
    with open_binary(src_path) as src_stream, open_binary(tgt_path) as tgt_stream:
        src_lines = iter_lines(src_stream, max_bytes=max_doc_bytes)
        tgt_lines = iter_lines(tgt_stream, max_bytes=max_doc_bytes)
        sentinel = object()
        ordinal = -1
        while True:
            ordinal += 1
            src_raw = next(src_lines, sentinel)
            tgt_raw = next(tgt_lines, sentinel)
            if src_raw is sentinel and tgt_raw is sentinel:
                return
            if src_raw is sentinel or tgt_raw is sentinel:
                # the longer file's tail has no partner: count each unpartnered line
                rejects.add("malformed", source)
                rest = src_lines if tgt_raw is sentinel else tgt_lines
                for _ in rest:
                    rejects.add("malformed", source)
                return
            if src_raw is None or tgt_raw is None:
                rejects.add("too_long", source)
                continue
            src = _decode(src_raw, rejects, source)
            tgt = _decode(tgt_raw, rejects, source) if src is not None else None
            if src is not None and tgt is not None:
                yield ordinal, src, tgt
