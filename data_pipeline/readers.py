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

    def add(self, reason: str, source: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.by_file[source] = self.by_file.get(source, 0) + 1

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


def iter_lines(stream: BinaryIO, *, max_bytes: int) -> Iterator[bytes | None]:
    """Yield each line's bytes without its newline; ``None`` for a line over ``max_bytes``.

    An over-long line is consumed in bounded pieces, never held whole in memory.
    """
    while True:
        line = stream.readline(max_bytes + 2)
        if not line:
            return
        complete = line.endswith(b"\n")
        if complete:
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        if len(line) > max_bytes:
            if not complete:
                while True:  # skip the rest of the line
                    rest = stream.readline(_READ_CHUNK)
                    if not rest or rest.endswith(b"\n"):
                        break
            yield None
            continue
        yield line


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
    fmt = resolve_format(path, fmt)
    source = path.name
    with open_binary(path) as stream:
        if fmt == "blank":
            yield from _iter_blank(stream, max_doc_bytes, rejects, source)
            return
        for ordinal, raw in enumerate(iter_lines(stream, max_bytes=max_doc_bytes)):
            if raw is None:
                rejects.add("too_long", source)
                continue
            if fmt == "jsonl":
                if not raw.strip():
                    rejects.add("empty", source)
                    continue
                try:
                    value = json.loads(raw)
                    text = value[text_field]
                except (ValueError, TypeError, KeyError, IndexError):
                    rejects.add("bad_json", source)
                    continue
                if not isinstance(text, str):
                    rejects.add("bad_json", source)
                    continue
                if not text.strip():
                    rejects.add("empty", source)
                    continue
                # JSON escapes let a \ud800 surrogate through; it cannot be encoded as UTF-8
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    rejects.add("invalid_utf8", source)
                    continue
                yield ordinal, text
            else:
                text = _decode(raw, rejects, source)
                if text is not None:
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
    if pair.aligned:
        yield from _iter_aligned(pair, max_doc_bytes, rejects)
        return
    for path in pair.paths:
        source = path.name
        with open_binary(path) as stream:
            for ordinal, raw in enumerate(iter_lines(stream, max_bytes=2 * max_doc_bytes)):
                if raw is None:
                    rejects.add("too_long", source)
                    continue
                fields = raw.split(b"\t")
                if len(fields) != 2:
                    rejects.add("empty" if not raw.strip() else "malformed", source)
                    continue
                texts = [_decode(f, rejects, source) for f in fields]
                if texts[0] is not None and texts[1] is not None:
                    yield source, ordinal, texts[0], texts[1]


def _iter_aligned(
    pair: PairInput, max_doc_bytes: int, rejects: Rejects
) -> Iterator[tuple[str, int, str, str]]:
    src_path, tgt_path = pair.paths
    source = f"{src_path.name},{tgt_path.name}"
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
                yield source, ordinal, src, tgt
