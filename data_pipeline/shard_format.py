"""Rosetta token shards: their on-disk format, the writer, the readers and the one tar parser.

What to call:

- write: ``with ShardWriter(path, dtype=token_dtype(vocab_size)) as w: w.add_sample(meta,
  payload=encode_mono_payload(...), ext=MONO_EXT)`` (``encode_pair_payload``, ``PAIR_EXT`` for
  pairs); nothing exists under ``path`` until the shard is complete (written under a temporary
  name, fsynced, renamed), and a failure inside the ``with`` block leaves nothing behind;
- read in order: ``iter_shard_samples(path)`` yields decoded, checked samples
  (:func:`decode_sample` says what a sample holds); ``iter_documents_of_sample`` /
  ``iter_pairs_of_sample`` split one into documents or pairs; ``iter_raw_samples(path)`` yields
  them still compressed (``verify`` checks them itself);
- read one sample: ``ShardReader().read(path, index)`` (the streaming loader's reader, one per
  slot); ``index_shard(path)`` gives every sample's byte range.

Guarantees: every reader takes the layout written today and the earlier one without eos; every
fault (a truncated or corrupt archive, members out of pairs, bad JSON, a failed zstd frame,
offsets that disagree with the metadata) raises ``ValueError`` naming the shard (and sample);
the tar headers are read by one parser, ``_parse_header``, for the sequential and the random
access readers alike.

Format

A shard directory holds ``manifest.json`` (see ``data_pipeline.manifest``), a copy of the
tokenizer under ``tokenizer/``, and shards named ``mono_<lang>_<NNNNN>.tar`` (one language each)
and ``pair_<src>-<tgt>_<NNNNN>.tar`` (one language pair each).

Each shard is a POSIX USTAR tar archive (plain 512-byte headers, no PAX records; mtime 0, uid/gid
0, mode 0644), readable by ``webdataset``. Members come in pairs, one pair per *sample*, in this
order::

    <key>.json      UTF-8 JSON object: the sample's metadata
    <key>.tok.zst   (mono) or <key>.pairs.zst (pair): one zstd frame (level 3, with content size
                    and checksum) holding the sample's arrays

``<key>`` is ``<shard stem>_<NNNNNN>`` (sample number within the shard), without dots.
All integers in payloads are little-endian. ``dtype`` is ``uint16`` when the tokenizer's vocab
size is at most 65536, else ``uint32``.

Mono sample: one or more whole documents of one language, packed in input order until adding
the next one would pass the target sample size (a document longer than the target is a sample
of its own). Metadata::

    {"kind": "mono", "lang": "en", "source": "<input file name>", "first_doc": <int>,
     "num_docs": D, "num_tokens": T, "eos": <eos id>, "dtype": "uint16", "chunk": "<16 hex>"}

Payload: ``uint32 doc_offsets[D + 1]`` (``doc_offsets[0] == 0``, ``doc_offsets[D] == T + D``,
rising), then ``dtype ids[T + D]``: each document's raw sentencepiece ids followed by the eos id
``eos`` (no bos or language tag), the documents back to back. Document ``i`` is
``ids[doc_offsets[i] : doc_offsets[i + 1] - 1]`` and ``ids[doc_offsets[i + 1] - 1] == eos``;
``T`` counts the documents' ids without their eos. This is the stream a packing loader cuts
into rows as it is, with no join (sentencepiece never encodes text to a control symbol, so eos
appears only at document ends). Samples written before eos was stored have no ``eos`` key and
hold ``doc_offsets[D] == T`` and ``tokens[T]`` without it; readers still take them.

Pair sample: ``D`` aligned (source, target) pairs of one language pair. Metadata::

    {"kind": "pair", "src": "en", "tgt": "de", "source": "<input file name>", "first_doc": <int>,
     "num_docs": D, "src_tokens": S, "tgt_tokens": G, "dtype": "uint16", "chunk": "<16 hex>"}

Payload: ``uint32 src_offsets[D + 1]``, ``uint32 tgt_offsets[D + 1]``, ``dtype src[S]``,
``dtype tgt[G]``.

``source`` is the input file's base name and ``first_doc`` the 0-based line number in it where
the sample's first document starts; a sample never spans two input files. ``chunk`` identifies
the input chunk and settings the shard was made from, and the first sample of a shard also
carries ``"rejected": {"invalid_utf8": n, "empty": n, "too_long": n, "bad_json": n,
"malformed": n}`` for that chunk; a re-run uses both to keep finished shards without redoing
them.

Reading

The sequential readers go through the archive with one buffered read per member. Random access
(:class:`ShardReader`): a shard's member offsets are found once per reader by reading its
512-byte tar headers (seeking over the data); a sample is then one seek and one read into a
reused buffer, decompressed straight from it. Only plain USTAR is parsed: the writer emits
nothing else, and ``tarfile`` (7-13x slower per member on a 2-core CPU) is used only to write.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

ZSTD_LEVEL = 3
MONO_EXT = "tok.zst"
PAIR_EXT = "pairs.zst"
DEFAULT_SAMPLE_TOKENS = 32768
"""Target tokens per sample: 64 KiB of uint16 ids, past the size where per-sample cost fades."""
OFFSET_DTYPE = np.dtype("<u4")
_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian dtype for ids of a vocabulary: uint16 up to 65536 entries, else uint32.

    Raises:
        ValueError: ``vocab_size`` is below 1 or above 2**32.
    """
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size ({vocab_size}) must be in [1, 2**32]")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _dtype_from_name(name: object, *, where: str) -> np.dtype:
    if name == "uint16":
        return np.dtype("<u2")
    if name == "uint32":
        return np.dtype("<u4")
    raise ValueError(f"{where}: dtype {name!r} must be uint16 or uint32")


def dtype_name(dtype: np.dtype) -> str:
    """``uint16`` or ``uint32``: the name stored in sample metadata."""
    return np.dtype(dtype).name


def encode_mono_payload(tokens: np.ndarray, *, doc_offsets: np.ndarray) -> bytes:
    """Uncompressed mono payload: offsets then ids (each document ending with eos; see the
    module docstring)."""
    return doc_offsets.astype(OFFSET_DTYPE, copy=False).tobytes() + tokens.tobytes()


def encode_pair_payload(
    src: np.ndarray, *, src_offsets: np.ndarray, tgt: np.ndarray, tgt_offsets: np.ndarray
) -> bytes:
    """Uncompressed pair payload: src offsets, tgt offsets, src ids, tgt ids."""
    return b"".join(
        (
            src_offsets.astype(OFFSET_DTYPE, copy=False).tobytes(),
            tgt_offsets.astype(OFFSET_DTYPE, copy=False).tobytes(),
            src.tobytes(),
            tgt.tobytes(),
        )
    )


def _check_offsets(offsets: np.ndarray, total: int, *, where: str, strict: bool = False) -> None:
    """Offsets from 0 to ``total``, never falling (``strict``: always rising)."""
    falls = np.less_equal if strict else np.less
    if (
        not len(offsets)
        or offsets[0] != 0
        or offsets[-1] != total
        or np.count_nonzero(falls(offsets[1:], offsets[:-1]))
    ):
        raise ValueError(f"{where}: document offsets must rise from 0 to {total}")


def decode_sample(
    meta: bytes | dict,
    *,
    payload: bytes,
    where: str = "sample",
    check: bool | str = True,
    decompressor: zstandard.ZstdDecompressor | None = None,
) -> dict:
    """Decode one sample from its ``.json`` member and its compressed payload member.

    ``check``: True checks the offsets (and, with eos stored, that each document ends with it);
    ``"stream"`` checks only that a mono sample stored with eos ends with it, for a reader that
    cuts the id stream at its eos ids and never reads the offsets (the zstd frame's checksum
    already guards the bytes); False checks neither.

    Returns (arrays are read-only views of one decompressed buffer):
        mono: ``{"kind": "mono", "lang", "source", "first_doc", "num_docs", "eos", "tokens"
        [T + D], "doc_offsets" [D + 1]}`` (samples without eos: no ``"eos"``, ``"tokens"
        [T]``); pair: ``{"kind": "pair", "src", "tgt", "source", "first_doc",
        "num_docs", "src_tokens" [S], "src_offsets" [D + 1], "tgt_tokens" [G], "tgt_offsets"
        [D + 1]}``.

    Raises:
        ValueError: ``where`` and what is wrong: bad JSON, a failed zstd frame or checksum, a
            payload size or offsets that disagree with the metadata, a document not ending with
            eos.
    """
    if not isinstance(meta, dict):
        try:
            meta = json.loads(meta)
        except ValueError as err:
            raise ValueError(f"{where}: metadata is not JSON ({err})") from None
    try:
        raw = (decompressor or zstandard.ZstdDecompressor()).decompress(payload)
    except zstandard.ZstdError as err:
        raise ValueError(f"{where}: payload does not decompress ({err})") from None
    try:
        kind = meta["kind"]
        dtype = _dtype_from_name(meta["dtype"], where=where)
        num_docs = int(meta["num_docs"])
        if kind == "mono":
            sizes = (num_docs + 1, int(meta["num_tokens"]))
        elif kind == "pair":
            sizes = (num_docs + 1, num_docs + 1, int(meta["src_tokens"]), int(meta["tgt_tokens"]))
        else:
            raise ValueError(f"{where}: kind {kind!r} must be mono or pair")
    except (KeyError, TypeError) as err:
        raise ValueError(f"{where}: metadata lacks or mistypes {err}") from None
    eos = meta.get("eos") if kind == "mono" else None
    if eos is not None:  # stored with an eos after every document
        if not isinstance(eos, int) or eos < 0:
            raise ValueError(f"{where}: eos {eos!r} must be a token id")
        sizes = (sizes[0], sizes[1] + num_docs)
    dtypes = (OFFSET_DTYPE,) * (len(sizes) // 2) + (dtype,) * (len(sizes) // 2)
    expected = sum(n * d.itemsize for n, d in zip(sizes, dtypes))
    if len(raw) != expected:
        raise ValueError(f"{where}: payload is {len(raw)} bytes, metadata implies {expected}")
    arrays = []
    offset = 0
    for n, d in zip(sizes, dtypes):
        arrays.append(np.frombuffer(raw, dtype=d, count=n, offset=offset))
        offset += n * d.itemsize
    out = {k: v for k, v in meta.items() if k not in ("num_tokens", "src_tokens", "tgt_tokens")}
    if kind == "mono":
        offsets, ids = out["doc_offsets"], out["tokens"] = arrays
        if check == "stream" and eos is not None:
            if num_docs and ids[-1] != eos:  # the offsets are left to readers that use them
                raise ValueError(f"{where}: a document does not end with eos {eos}")
        elif check:
            _check_offsets(offsets, sizes[1], where=where, strict=eos is not None)
            # rising offsets from 0: every document has at least one id, its last
            if eos is not None and np.count_nonzero(ids[offsets[1:].astype(np.intp) - 1] != eos):
                raise ValueError(f"{where}: a document does not end with eos {eos}")
    else:
        out["src_offsets"], out["tgt_offsets"], out["src_tokens"], out["tgt_tokens"] = arrays
        if check:
            _check_offsets(out["src_offsets"], sizes[2], where=where)
            _check_offsets(out["tgt_offsets"], sizes[3], where=where)
    return out


# --- writing ---------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one shard to ``<path>.tmp-<pid>`` and renames it to ``path`` on :meth:`close`.

    Until ``close()`` returns, nothing exists under the final name; ``abort()`` (or leaving a
    ``with`` block by an exception) removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.dtype = np.dtype(dtype)
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._zstd = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=True, write_content_size=True
        )
        self.num_samples = 0

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def _key(self) -> str:
        return f"{self.path.name.removesuffix('.tar')}_{self.num_samples:06d}"

    def add_sample(self, meta: dict, *, payload: bytes, ext: str) -> None:
        """Append one sample: its metadata and its (uncompressed) payload."""
        key = self._key()
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        self._add(f"{key}.{ext}", self._zstd.compress(payload))
        self.num_samples += 1

    def close(self) -> None:
        """Finish the archive, flush it to disk and move it to its final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Drop the temporary file; nothing is left under either name."""
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- the USTAR parser (the one place that reads tar headers) --------------------------------


def _padded(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _parse_header(header: bytes, *, where: str) -> tuple[str, int]:
    """``(name, data size)`` of one 512-byte USTAR header of a regular file member.

    Raises:
        ValueError: ``where`` and the fault: a short header, unreadable size or checksum
            fields, a checksum mismatch, or a member that is not a regular file.
    """
    if len(header) < _BLOCK:
        raise ValueError(f"{where}: truncated inside a header")
    try:
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        stored = int(header[148:156].rstrip(b"\0 "), 8)
    except ValueError:
        raise ValueError(f"{where}: corrupt tar header") from None
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # checksum field as spaces
        raise ValueError(f"{where}: tar header checksum mismatch")
    name = header[0:100].rstrip(b"\0").decode("utf-8", "replace")
    prefix = header[345:500].rstrip(b"\0")
    if prefix:
        name = f"{prefix.decode('utf-8', 'replace')}/{name}"
    kind = header[156:157]
    if kind != b"0" and kind != b"\0":
        raise ValueError(f"{where}: member {name!r} has tar type {kind!r}, expected a file")
    return name, size


def _sample_key(meta_name: str, payload_name: str | None, *, where: str) -> tuple[str, str]:
    """``(key, payload extension)`` of a sample's two member names.

    Raises:
        ValueError: ``where`` and the fault: the first member is not ``<key>.json``, or the
            second is missing or belongs to another key.
    """
    key, _, ext = meta_name.partition(".")
    if ext != "json":
        raise ValueError(f"{where}: member {meta_name!r} where a .json was expected")
    if payload_name is None or payload_name.partition(".")[0] != key:
        raise ValueError(f"{where}: sample {key!r} has no payload member")
    return key, payload_name.partition(".")[2]


def iter_tar_members(stream: BinaryIO, *, where: str) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of each regular member of a USTAR stream, in order.

    A minimal reader: 512-byte headers, octal sizes, checksums checked; PAX/GNU extension
    records are not expected in Rosetta shards and are reported as errors.

    Raises:
        ValueError: ``where`` and the fault: a truncated archive, a bad header checksum, or an
            unexpected member type.
    """
    while True:
        header = stream.read(_BLOCK)
        if len(header) == 0:
            raise ValueError(f"{where}: truncated (no end-of-archive marker)")
        if header == _END_BLOCK:
            return
        name, size = _parse_header(header, where=where)
        padded = _padded(size)
        data = stream.read(padded)
        if len(data) < padded:
            raise ValueError(f"{where}: truncated inside member {name!r}")
        yield name, data[:size]


def iter_raw_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict, str, bytes]]:
    """Yield ``(key, metadata, payload extension, compressed payload)`` per sample of a shard.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the shard's name and the fault (bad tar, members out of pairs, bad JSON).
    """
    path = Path(path)
    where = f"shard {path.name}"
    with open(path, "rb") as f:
        members = iter_tar_members(io.BufferedReader(f, buffer_size=1 << 20), where=where)
        for meta_name, meta_bytes in members:
            payload_name, payload = next(members, (None, b""))
            key, ext = _sample_key(meta_name, payload_name, where=where)
            try:
                meta = json.loads(meta_bytes)
            except ValueError as err:
                raise ValueError(f"{where}: sample {key!r} metadata is not JSON ({err})") from None
            yield key, meta, ext, payload


def iter_shard_samples(path: str | os.PathLike, *, check: bool = True) -> Iterator[dict]:
    """Yield the decoded samples of one shard, in order (see :func:`decode_sample`).

    Each dict also carries ``"key"``. Offsets are checked unless ``check`` is False.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the shard's name and the first fault found.
    """
    path = Path(path)
    decompressor = zstandard.ZstdDecompressor()
    for key, meta, ext, payload in iter_raw_samples(path):
        expected = MONO_EXT if meta.get("kind") == "mono" else PAIR_EXT
        if ext != expected:
            raise ValueError(f"shard {path.name}: sample {key!r} payload .{ext}, not .{expected}")
        sample = decode_sample(
            meta,
            payload=payload,
            where=f"shard {path.name} sample {key}",
            check=check,
            decompressor=decompressor,
        )
        sample["key"] = key
        yield sample


def iter_documents_of_sample(sample: dict) -> Iterator[np.ndarray]:
    """Yield each document's token array of a decoded mono sample (without its eos)."""
    offsets = sample["doc_offsets"]
    tokens = sample["tokens"]
    end = 1 if "eos" in sample else 0
    for i in range(len(offsets) - 1):
        yield tokens[offsets[i] : offsets[i + 1] - end]


def iter_pairs_of_sample(sample: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield each ``(source ids, target ids)`` of a decoded pair sample."""
    so, to = sample["src_offsets"], sample["tgt_offsets"]
    src, tgt = sample["src_tokens"], sample["tgt_tokens"]
    for i in range(len(so) - 1):
        yield src[so[i] : so[i + 1]], tgt[to[i] : to[i + 1]]


# --- random access: one sample by (shard, index) -----------------------------------------


def _index_members(path: Path) -> list[tuple[int, int, int, int, str]]:
    """Per sample ``(start, stop, metadata size, payload size, payload extension)``, from the
    tar headers alone (seeking over the data)."""
    where = f"shard {path.name}"
    members = []
    with open(path, "rb") as f:
        end = f.seek(0, io.SEEK_END)
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(_BLOCK)
            if len(header) == 0:
                raise ValueError(f"{where}: truncated (no end-of-archive marker)")
            if header == _END_BLOCK:
                break
            name, size = _parse_header(header, where=where)
            f.seek(pos + _BLOCK + _padded(size))
            header = f.read(_BLOCK)
            payload_name, payload_size = (
                (None, 0) if header == _END_BLOCK else _parse_header(header, where=where)
            )
            _, ext = _sample_key(name, payload_name, where=where)
            stop = pos + _BLOCK + _padded(size) + _BLOCK + _padded(payload_size)
            if stop > end:
                raise ValueError(f"{where}: truncated inside member {payload_name!r}")
            members.append((pos, stop, size, payload_size, ext))
            pos = stop
    return members


def index_shard(path: str | os.PathLike) -> np.ndarray:
    """Byte ranges of a shard's samples, from its tar headers alone.

    Returns:
        int64 ``[num_samples, 2]``: start (the ``.json`` header) and end (past the padded
        payload) of each sample.

    Raises:
        OSError: the file cannot be read.
        ValueError: the shard's name and the fault (truncated, bad header, members out of pairs).
    """
    spans = [m[:2] for m in _index_members(Path(path))]
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


class ShardReader:
    """Reads single samples of shards by (shard path, sample index), keeping some files open.

    Each shard's tar headers are read (and checked) once, on its first sample; a sample is then
    one seek and one read, and its payload is decompressed straight from that read.
    """

    def __init__(self, *, max_open: int = 64) -> None:
        self._indexes: dict[str, list[tuple[int, int, int, int, str]]] = {}
        self._names: dict[str, str] = {}
        self._files: OrderedDict[str, io.BufferedReader] = OrderedDict()
        self._max_open = max_open
        self._zstd = zstandard.ZstdDecompressor()
        self._buffer = bytearray(0)

    def _file(self, path: str) -> io.BufferedReader:
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        f = open(path, "rb")  # noqa: SIM115 - kept open across calls, closed in close()
        while len(self._files) >= self._max_open:
            self._files.popitem(last=False)[1].close()
        self._files[path] = f
        return f

    def _members(self, path: str) -> list[tuple[int, int, int, int, str]]:
        members = self._indexes.get(path)
        if members is None:
            members = self._indexes[path] = _index_members(Path(path))
            self._names[path] = Path(path).name
        return members

    def num_samples(self, path: str) -> int:
        """Samples in the shard (reads its headers once)."""
        return len(self._members(path))

    def read(self, path: str, index: int, *, check: bool | str = True) -> dict:
        """Decode sample ``index`` of the shard at ``path`` (see :func:`decode_sample`, which
        takes ``check``).

        Raises:
            OSError: the file cannot be read.
            ValueError: the shard's name and the fault (index out of range, bad member, bad
                payload).
        """
        members = self._members(path)
        if not 0 <= index < len(members):
            raise ValueError(f"shard {Path(path).name}: has no sample {index}")
        start, stop, meta_size, payload_size, ext = members[index]
        if ext != MONO_EXT and ext != PAIR_EXT:
            raise ValueError(
                f"shard {Path(path).name}: sample {index} payload .{ext} is not a token payload"
            )
        f = self._file(path)
        f.seek(start)
        if len(self._buffer) < stop - start:  # one buffer reused: the payload is decompressed
            self._buffer = bytearray(stop - start)  # out of it, nothing keeps a view
        raw = memoryview(self._buffer)[: stop - start]
        if f.readinto(raw) != stop - start:
            raise ValueError(f"shard {Path(path).name}: truncated at sample {index}")
        at = _BLOCK + _padded(meta_size) + _BLOCK
        return decode_sample(
            bytes(raw[_BLOCK : _BLOCK + meta_size]),
            payload=raw[at : at + payload_size],
            where=f"shard {self._names[path]} sample {index}",
            check=check,
            decompressor=self._zstd,
        )

    def close(self) -> None:
        """Close every open file."""
        while self._files:
            self._files.popitem()[1].close()
