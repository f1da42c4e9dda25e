"""Text inputs of the preprocessing jobs (tokenizer training, sharding): specs, files, documents.

What to call:

- ``parse_mono_specs(["en=corpus/en.txt.zst", ...])`` -> ``[MonoInput]`` and
  ``parse_pair_specs(["en-de=corpus/en-de.tsv", ...])`` -> ``[PairInput]``: command-line input
  specs checked and expanded to files (a bad spec raises ``ValueError`` naming it);
- ``iter_documents(path, fmt=..., rejects=...)`` (one file of a ``MonoInput``) /
  ``iter_pairs(pair_input, rejects=...)``: the documents (pairs), in file order, with their
  ordinals;
- ``iter_raw_segments`` / ``iter_pair_segments`` then ``parse_segment``: the same, cut in two
  halves so that one process can feed many workers (the sharding job).

Guarantees: a bad *record* never stops a job (it is skipped and counted in a :class:`Rejects`);
a bad *file* always does, with an :class:`InputError` naming it; the documents read do not
depend on how the input is cut into segments or read blocks. The shard side (token shards, not
text) is ``data_pipeline.shard_format``.

How:

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

Bad records never stop a job: documents that are not valid UTF-8, empty (only whitespace) or
longer than the byte limit are skipped and counted in a :class:`Rejects`. A bad *file* does, with
an :class:`InputError` naming it: a truncated or corrupt ``.zst``/``.gz`` file (with the byte
offset), a TSV without tabs, line-aligned files of different lengths. A UTF-8 byte order mark at
the start of a file is dropped.

Reading has two halves, so that one process can feed many: :func:`iter_raw_segments` cuts a
(decompressed) file into pieces of about a target size at record boundaries with C-level
searches only, and :func:`parse_segment` turns one piece into documents (decoding, validation,
counting), wherever the piece was sent. A document's *ordinal* is the 0-based line number of its
first line in its file.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
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


class InputError(ValueError):
    """Input that cannot be read as it claims to be: a job stops on it, naming the file.

    Unlike a bad record (skipped and counted in :class:`Rejects`), the whole input is suspect:
    a truncated or corrupt compressed file, a TSV without tabs, line-aligned files of different
    lengths. ``input_name`` is the language or pair (``en``, ``en-de``) the file was given for,
    when known, so that a job can drop what it already wrote for it.
    """

    def __init__(self, message: str, *, path: Path, input_name: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.input_name = input_name


class CorruptInputError(InputError):
    """A ``.zst`` or ``.gz`` input that is truncated or corrupt.

    ``offset`` is the compressed byte where decoding stopped: the file's size when it ends
    inside a zstd frame or gzip member; for corrupt data, the start of the block (128 KiB at
    most) in which zstd found the fault, or how far gzip had read when it found it.
    """

    def __init__(self, path: Path, *, offset: int, reason: str) -> None:
        super().__init__(
            f"input {str(path)!r}: {reason} at byte {offset:,} of the compressed file",
            path=path,
        )
        self.offset = offset


_ZSTD_READ = 1 << 17
"""Compressed bytes fed to zstd per call: small enough that an error's offset is close."""


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file's decompressed bytes (one or more frames), that raises on a cut.

    zstandard's ``stream_reader`` returns what it decoded so far and then end-of-file when the
    input ends inside a frame, so a truncated file reads "successfully" up to the cut; here a
    frame that is not finished at the end of the input is a :class:`CorruptInputError`.
    """

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        self._raw = raw
        self._path = path
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = None  # the decompressor of the frame being read
        self._out = b""
        self._pos = 0
        self._offset = 0  # compressed bytes consumed
        self._done = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()

    def _feed(self, data: bytes) -> list[bytes]:
        out = []
        while data:
            if self._dobj is None:
                self._dobj = self._dctx.decompressobj()
            try:
                out.append(self._dobj.decompress(data))
            except zstandard.ZstdError as err:
                raise CorruptInputError(
                    self._path, offset=self._offset, reason=f"corrupt zstd data ({err})"
                ) from None
            if not self._dobj.eof:
                break
            data = self._dobj.unused_data  # a further frame follows in the same block
            self._dobj = None
        return out

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            if self._done:
                return 0
            block = self._raw.read(_ZSTD_READ)
            if not block:
                self._done = True
                if self._dobj is not None:
                    raise CorruptInputError(
                        self._path,
                        offset=self._offset,
                        reason="truncated zstd data (the file ends inside a frame)",
                    )
                return 0
            self._out, self._pos = b"".join(self._feed(block)), 0
            self._offset += len(block)
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n


class _GzipReader(io.RawIOBase):
    """A ``.gz`` file's decompressed bytes; truncation, a bad CRC, corrupt deflate data or a
    file that is not gzip raise :class:`CorruptInputError` rather than EOFError/OSError."""

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        self._raw = raw
        self._path = path
        self._gzip = gzip.GzipFile(fileobj=raw)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._gzip.close()
            self._raw.close()
        super().close()

    def readinto(self, buffer) -> int:
        try:
            return self._gzip.readinto(buffer)
        except EOFError:
            reason = "truncated gzip data (the file ends inside a member)"
        except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            reason = f"corrupt gzip data ({err})"
        raise CorruptInputError(self._path, offset=self._raw.tell(), reason=reason)


def open_binary(path: Path) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing ``.gz`` and ``.zst`` transparently.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptInputError: (while reading) a truncated or corrupt compressed file.
    """
    raw = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
    if path.suffix == ".gz":
        return io.BufferedReader(_GzipReader(raw, path), buffer_size=_READ_CHUNK)
    if path.suffix == ".zst":
        return io.BufferedReader(_ZstdReader(raw, path), buffer_size=_READ_CHUNK)
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
    """TSV lines without exactly one tab; lines of one aligned file past the other's end
    (blank ones only: different numbers of non-blank lines are an :class:`InputError`)."""

    def add(self, reason: str, count: int = 1) -> None:
        setattr(self, reason, getattr(self, reason) + count)

    def merge(self, other: Rejects | dict[str, int]) -> None:
        counts = other.as_dict() if isinstance(other, Rejects) else other
        for reason, count in counts.items():
            self.add(reason, count)

    def as_dict(self) -> dict[str, int]:
        """Reason -> count."""
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
    """Each document's 0-based line number in the file."""
    texts: list[str]
    """Documents, or source sides of pairs."""
    tgt_texts: list[str] | None = None
    """Target sides of pairs; None for monolingual batches."""

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Segment:
    """A piece of one input file that ends at a record boundary (what a worker parses).

    ``data`` is the piece's raw (decompressed) bytes; for aligned pair files ``tgt_data`` holds
    the same lines of the target file.
    """

    source: str
    first_line: int
    data: bytes
    tgt_data: bytes | None = None
    fmt: str = "lines"
    """The concrete format of ``data`` (``lines``, ``blank``, ``jsonl``; pairs: ``lines``)."""


# --- cutting files into segments (cheap: no decoding) -----------------------------------------

_BOM = b"\xef\xbb\xbf"


def _iter_blocks(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's bytes in blocks of ``_READ_CHUNK``, without a UTF-8 byte order mark at the
    start (editors on Windows write one; it is no part of the first document)."""
    first = stream.read(_READ_CHUNK)
    if first.startswith(_BOM):
        first = first[len(_BOM) :]
    if first:
        yield first
    yield from iter(lambda: stream.read(_READ_CHUNK), b"")


_BLANK_RUN = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")


def _find_cut(buf: bytearray, start: int, blank: bool) -> int:
    """Index just past the first record boundary at or after ``start``, or -1."""
    if blank:
        m = _BLANK_RUN.search(buf, max(start - 1, 0))
        return m.end() if m else -1
    i = buf.find(b"\n", max(start - 1, 0))
    return i + 1 if i >= 0 else -1


def _rfind_cut(buf: bytearray, end: int, blank: bool) -> int:
    """Index just past the last record boundary before ``end``, or 0."""
    if blank:
        last = 0
        for m in _BLANK_RUN.finditer(buf, 0, end):
            last = m.end()
        return last
    return buf.rfind(b"\n", 0, end) + 1


def iter_raw_segments(
    path: Path,
    *,
    fmt: str = "lines",
    target_bytes: int,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[Segment]:
    """Cut one file into segments of about ``target_bytes`` ending at record boundaries.

    Records are lines, or blank-line separated documents for ``fmt == "blank"``. Only C-level
    searches run per block, so one process can cut for many workers. A record that outgrows
    ``max_doc_bytes`` while straddling a cut is dropped here (counted as ``too_long``) so that
    memory stays bounded; shorter over-long records are left to :func:`parse_segment`.

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: ``path`` does not exist.
    """
    concrete = resolve_format(path, fmt)
    blank = concrete == "blank"
    source = path.name
    target_bytes = max(target_bytes, 1)
    line = 0
    buf = bytearray()
    skipping = False  # inside an over-long record: drop bytes up to its end
    with open_binary(path) as stream:
        for block in _iter_blocks(stream):
            if skipping:
                # a blank-line run may straddle blocks: keep a little of the previous tail
                buf += block
                cut = _find_cut(buf, 0, blank)
                if cut < 0:
                    line += buf.count(b"\n", 0, max(len(buf) - 64, 0))
                    del buf[: max(len(buf) - 64, 0)]
                    continue
                line += buf.count(b"\n", 0, cut)
                del buf[:cut]
                skipping = False
            else:
                buf += block
            while len(buf) >= target_bytes:
                cut = _find_cut(buf, target_bytes, blank)
                if cut < 0:
                    break
                piece = bytes(buf[:cut])
                del buf[:cut]
                yield Segment(source, line, piece, fmt=concrete)
                line += piece.count(b"\n")
            if len(buf) > target_bytes + max_doc_bytes + 2:
                # the record straddling the target has outgrown the limit: emit what precedes
                # it, drop it, and skip to its end
                start = _rfind_cut(buf, target_bytes, blank)
                if start:
                    piece = bytes(buf[:start])
                    yield Segment(source, line, piece, fmt=concrete)
                    line += piece.count(b"\n")
                rejects.add("too_long")
                line += buf.count(b"\n", start)
                # keep a newline so the boundary search sees the record's own end
                tail_keep = 1 if buf.endswith(b"\n") else 0
                del buf[: len(buf) - tail_keep]
                line -= tail_keep
                skipping = True
    if skipping:
        return
    if buf:
        yield Segment(source, line, bytes(buf), fmt=concrete)


def _count_lines(path: Path) -> int:
    """Lines of a file up to its last one that is not blank (trailing blank lines and a missing
    final newline do not count as a difference between line-aligned files)."""
    lines = content = 0
    with open_binary(path) as stream:
        for block in iter(lambda: stream.read(_READ_CHUNK), b""):
            stripped = block.rstrip()
            if stripped:
                content = lines + stripped.count(b"\n") + 1
            lines += block.count(b"\n")
    return content


def iter_raw_aligned_segments(
    pair: PairInput, *, target_bytes: int, rejects: Rejects
) -> Iterator[Segment]:
    """Cut two line-aligned files into segments holding the same lines of both.

    Both files are counted first (one cheap pass), so that files of different lengths stop the
    job before anything is cut.

    Raises:
        FileNotFoundError: an input file does not exist.
        InputError: the files have different numbers of lines (trailing blank lines aside), or
            one is a truncated or corrupt compressed file.
    """
    src_path, tgt_path = pair.paths
    source = f"{src_path.name},{tgt_path.name}"
    counts = [_count_lines(path) for path in pair.paths]
    if counts[0] != counts[1]:
        raise InputError(
            f"--parallel {pair.name}: {str(src_path)!r} has {counts[0]:,} lines but "
            f"{str(tgt_path)!r} has {counts[1]:,}: line-aligned files must have one line per "
            "pair in each",
            path=src_path,
            input_name=pair.name,
        )
    with open_binary(tgt_path) as tgt_stream:
        tgt_blocks = _iter_blocks(tgt_stream)
        tgt_buf = bytearray()
        for seg in iter_raw_segments(
            src_path,
            fmt="lines",
            target_bytes=target_bytes,
            max_doc_bytes=1 << 62,  # lengths are checked per line when parsing
            rejects=rejects,
        ):
            need = seg.data.count(b"\n")
            end = 0
            for _ in range(need):
                i = tgt_buf.find(b"\n", end)
                while i < 0:
                    block = next(tgt_blocks, b"")
                    if not block:
                        break
                    tgt_buf += block
                    i = tgt_buf.find(b"\n", end)
                if i < 0:
                    end = len(tgt_buf)
                    break
                end = i + 1
            if not seg.data.endswith(b"\n"):  # the source's last line: the rest of the target
                tgt_buf += b"".join(tgt_blocks)
                end = len(tgt_buf)
            yield Segment(source, seg.first_line, seg.data, bytes(tgt_buf[:end]))
            del tgt_buf[:end]
        rest = bytes(tgt_buf) + b"".join(tgt_blocks)
        if rest:  # target lines with no source line
            yield Segment(source, -1, b"", rest)


# --- parsing segments -------------------------------------------------------------------------


def iter_line_blocks(stream: BinaryIO, *, max_bytes: int) -> Iterator[list[bytes | None]]:
    """Yield the lines of a stream in lists, one list per block read.

    Each line is its bytes without ``\\n`` (and without a ``\\r`` before it), or ``None`` for a
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


def _decode_lines(lines: list[bytes | None], rejects: Rejects) -> list[str | None]:
    """Decode a block of lines at once; line by line (counting faults) only if that fails."""
    if None not in lines:
        try:
            return b"\n".join(lines).decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
    texts: list[str | None] = []
    for raw in lines:
        if raw is None:
            rejects.add("too_long")
            texts.append(None)
            continue
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            rejects.add("invalid_utf8")
            texts.append(None)
    return texts


def _decode(raw: bytes, rejects: Rejects) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        rejects.add("invalid_utf8")
        return None
    if not text.strip():
        rejects.add("empty")
        return None
    return text


def _split_segment(data: bytes, max_bytes: int) -> list[str] | None:
    """A segment's lines, decoded in one call; None when a line needs the careful path.

    The careful path (:func:`iter_line_blocks` and per-line decoding) is taken for invalid
    UTF-8 or a line that may pass ``max_bytes``; clean text costs a few C calls per segment.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.split("\n")
    if lines[-1] == "":  # the segment's final newline, not an empty line
        lines.pop()
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    # a character takes at most 4 UTF-8 bytes, so shorter lines cannot pass the limit
    if max(map(len, lines), default=0) * 4 > max_bytes:
        return None
    return lines


def _keep_nonempty(
    lines: list[str], first_line: int, rejects: Rejects
) -> tuple[list[int], list[str]]:
    ordinals = range(first_line, first_line + len(lines))
    if all(lines) and not any(map(str.isspace, lines)):
        return list(ordinals), lines
    keep = [line != "" and not line.isspace() for line in lines]
    rejects.add("empty", len(keep) - sum(keep))
    return list(itertools.compress(ordinals, keep)), list(itertools.compress(lines, keep))


def _parse_lines(stream: BinaryIO, first_line: int, max_bytes: int, rejects: Rejects) -> tuple:
    fast = _split_segment(stream.getvalue(), max_bytes) if isinstance(stream, io.BytesIO) else None
    if fast is not None:
        return _keep_nonempty(fast, first_line, rejects)
    ordinals: list[int] = []
    texts: list[str] = []
    base = first_line
    for lines in iter_line_blocks(stream, max_bytes=max_bytes):
        decoded = _decode_lines(lines, rejects)
        block_ordinals = range(base, base + len(decoded))
        base += len(decoded)
        if None in decoded or not all(decoded) or any(map(str.isspace, decoded)):
            keep = [t is not None and t != "" and not t.isspace() for t in decoded]
            empty = sum(1 for t, k in zip(decoded, keep) if t is not None and not k)
            rejects.add("empty", empty)
            texts += itertools.compress(decoded, keep)
            ordinals += itertools.compress(block_ordinals, keep)
        else:
            texts += decoded
            ordinals += block_ordinals
    return ordinals, texts


def _parse_jsonl(
    stream: BinaryIO, first_line: int, text_field: str, max_bytes: int, rejects: Rejects
) -> tuple:
    ordinals: list[int] = []
    texts: list[str] = []
    for ordinal, raw in enumerate(iter_lines(stream, max_bytes=max_bytes), first_line):
        if raw is None:
            rejects.add("too_long")
            continue
        if not raw.strip():
            rejects.add("empty")
            continue
        try:
            text = json.loads(raw)[text_field]
        except (ValueError, TypeError, KeyError, IndexError):
            rejects.add("bad_json")
            continue
        if not isinstance(text, str):
            rejects.add("bad_json")
            continue
        if not text.strip():
            rejects.add("empty")
            continue
        # JSON escapes let a lone surrogate (\ud800) through; it has no UTF-8 form
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            rejects.add("invalid_utf8")
            continue
        ordinals.append(ordinal)
        texts.append(text)
    return ordinals, texts


def _parse_blank(stream: BinaryIO, first_line: int, max_bytes: int, rejects: Rejects) -> tuple:
    ordinals: list[int] = []
    texts: list[str] = []
    parts: list[bytes] = []
    size = 0
    too_long = False
    start = first_line

    def flush() -> None:
        if too_long:
            rejects.add("too_long")
        elif parts:
            text = _decode(b"\n".join(parts), rejects)
            if text is not None:
                ordinals.append(start)
                texts.append(text)

    for line_no, raw in enumerate(iter_lines(stream, max_bytes=max_bytes), first_line):
        if raw is not None and not raw.strip():
            if parts or too_long:
                flush()
            parts, size, too_long = [], 0, False
            continue
        if not parts and not too_long:
            start = line_no
        if raw is None or size + len(raw) + 1 > max_bytes:
            too_long, parts = True, []
            continue
        if not too_long:
            parts.append(raw)
            size += len(raw) + 1
    if parts or too_long:
        flush()
    return ordinals, texts


def _parse_tsv(stream: BinaryIO, first_line: int, max_bytes: int, rejects: Rejects) -> tuple:
    ordinals: list[int] = []
    srcs: list[str] = []
    tgts: list[str] = []
    base = first_line
    fast = _split_segment(stream.getvalue(), max_bytes) if isinstance(stream, io.BytesIO) else None
    blocks = [fast] if fast is not None else None
    for lines in blocks or iter_line_blocks(stream, max_bytes=max_bytes):
        decoded = lines if blocks else _decode_lines(lines, rejects)
        for ordinal, line in enumerate(decoded, base):
            if line is None:
                continue
            src, tab, tgt = line.partition("\t")
            if not tab or "\t" in tgt:
                rejects.add("empty" if not line.strip() else "malformed")
            elif not src.strip() or not tgt.strip():
                rejects.add("empty")
            else:
                ordinals.append(ordinal)
                srcs.append(src)
                tgts.append(tgt)
        base += len(decoded)
    return ordinals, srcs, tgts


def _parse_aligned(
    src_stream: BinaryIO, tgt_stream: BinaryIO, first_line: int, max_bytes: int, rejects: Rejects
) -> tuple:
    ordinals: list[int] = []
    srcs: list[str] = []
    tgts: list[str] = []
    src_lines = iter_lines(src_stream, max_bytes=max_bytes)
    tgt_lines = iter_lines(tgt_stream, max_bytes=max_bytes)
    for ordinal, (src_raw, tgt_raw) in enumerate(
        itertools.zip_longest(src_lines, tgt_lines, fillvalue=b"\0missing"), first_line
    ):
        if src_raw == b"\0missing" or tgt_raw == b"\0missing":
            rejects.add("malformed")  # the longer file's lines have no partner
            continue
        if src_raw is None or tgt_raw is None:
            rejects.add("too_long")
            continue
        src = _decode(src_raw, rejects)
        tgt = _decode(tgt_raw, rejects) if src is not None else None
        if src is not None and tgt is not None:
            ordinals.append(ordinal)
            srcs.append(src)
            tgts.append(tgt)
    return ordinals, srcs, tgts


def parse_segment(
    segment: Segment,
    *,
    kind: str,
    text_field: str = "text",
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> DocBatch:
    """Decode, validate and split one segment into documents (``kind`` mono) or pairs.

    The segment's ``fmt`` says how; pairs are TSV, or aligned when the segment has ``tgt_data``.
    Bad records are counted in ``rejects``.
    """
    fmt = segment.fmt
    stream = io.BytesIO(segment.data)
    if kind == "pair":
        if segment.tgt_data is not None:
            ordinals, srcs, tgts = _parse_aligned(
                stream, io.BytesIO(segment.tgt_data), segment.first_line, max_doc_bytes, rejects
            )
        else:
            ordinals, srcs, tgts = _parse_tsv(
                stream, segment.first_line, 2 * max_doc_bytes, rejects
            )
        return DocBatch(segment.source, ordinals, srcs, tgts)
    if fmt == "lines":
        ordinals, texts = _parse_lines(stream, segment.first_line, max_doc_bytes, rejects)
    elif fmt == "blank":
        ordinals, texts = _parse_blank(stream, segment.first_line, max_doc_bytes, rejects)
    else:
        ordinals, texts = _parse_jsonl(
            stream, segment.first_line, text_field, max_doc_bytes, rejects
        )
    return DocBatch(segment.source, ordinals, texts)


_SEGMENT_BYTES = 4 << 20


def iter_documents(
    path: Path,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    rejects: Rejects,
) -> Iterator[tuple[int, str]]:
    """Yield ``(ordinal, text)`` for the documents of one file, skipping and counting bad ones.

    ``ordinal`` is the 0-based line number of the document's (first) line.

    Raises:
        ValueError: an unknown format.
        FileNotFoundError: ``path`` does not exist.
    """
    for segment in iter_raw_segments(
        path,
        fmt=fmt,
        target_bytes=_SEGMENT_BYTES,
        max_doc_bytes=max_doc_bytes,
        rejects=rejects,
    ):
        batch = parse_segment(
            segment,
            kind="mono",
            text_field=text_field,
            max_doc_bytes=max_doc_bytes,
            rejects=rejects,
        )
        yield from zip(batch.ordinals, batch.texts)


def iter_pair_segments(
    pair: PairInput, *, target_bytes: int, max_doc_bytes: int, rejects: Rejects
) -> Iterator[Segment]:
    """Segments of every file of a pair input, in order (see :func:`iter_raw_segments`).

    Raises:
        FileNotFoundError: an input file does not exist.
        InputError: a TSV file with no tab in its first segment, line-aligned files of different
            lengths, a truncated or corrupt compressed file.
    """
    if pair.aligned:
        yield from iter_raw_aligned_segments(pair, target_bytes=target_bytes, rejects=rejects)
        return
    for path in pair.paths:
        segments = iter_raw_segments(
            path,
            fmt="lines",
            target_bytes=target_bytes,
            max_doc_bytes=2 * max_doc_bytes,
            rejects=rejects,
        )
        for index, segment in enumerate(segments):
            if index == 0 and b"\t" not in segment.data and segment.data.strip():
                # every line would be malformed: a wrong file or format, not bad lines
                lines = segment.data.count(b"\n") + (not segment.data.endswith(b"\n"))
                raise InputError(
                    f"--parallel {pair.name}: {str(path)!r} has no tab in its first "
                    f"{lines:,} line(s): a TSV holds source<TAB>target per "
                    "line (two line-aligned files are given as SRC-TGT=SRC_FILE,TGT_FILE)",
                    path=path,
                    input_name=pair.name,
                )
            yield segment


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
    for segment in iter_pair_segments(
        pair, target_bytes=_SEGMENT_BYTES, max_doc_bytes=max_doc_bytes, rejects=rejects
    ):
        batch = parse_segment(segment, kind="pair", max_doc_bytes=max_doc_bytes, rejects=rejects)
        for ordinal, src, tgt in zip(batch.ordinals, batch.texts, batch.tgt_texts or []):
            yield batch.source, ordinal, src, tgt
