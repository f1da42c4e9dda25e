"""Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``) in and out, in numpy alone.

What to call:

- read: ``MegatronDataset(prefix)`` checks both files whole and gives ``document(i)`` (the ids of
  document ``i``, its sequences joined), ``sequence(i)``, ``document_token_offsets()`` and
  ``tokens`` (every id, a read-only memory map);
- write: ``with MegatronWriter(prefix, dtype=megatron_token_dtype(vocab_size)) as w:
  w.add_document(ids)`` (or ``add_documents(ids, lengths=...)`` for many at once); nothing
  exists under either final name until the block ends without an exception;
- convert: :func:`export_megatron` (our shards -> one dataset per language, or one merged) and
  :func:`import_megatron` (one dataset -> a shard directory with its manifest), the
  ``python -m data_pipeline export-megatron`` / ``import-megatron`` commands.

Guarantees: files written here are byte for byte what megatron-core's ``IndexedDatasetBuilder``
writes for the same documents and dtype (one sequence per document); megatron-core's
``IndexedDataset`` reads them to the same ids. Every fault of a file read here (missing file,
bad magic, version other than 1, unknown dtype code, an ``.idx`` or ``.bin`` of the wrong size,
document indices or sequence pointers that do not add up) raises one ``ValueError`` line
naming the file (``FileNotFoundError`` for a missing file). Writers go through temporary
names: a failure leaves nothing behind.

Format (megatron-core ``megatron/core/datasets/indexed_dataset.py``; all little-endian)::

    .idx  b"MMIDIDX\\x00\\x00"   9 bytes of magic
          <Q version           always 1
          <B dtype code        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                               7 float32, 8 uint16 (the ids' dtype in .bin)
          <Q S                 sequences
          <Q D + 1             document indices, the leading 0 included
          int32[S]             sequence lengths (ids)
          int64[S]             sequence pointers: byte offsets into .bin, the running sum of
                               length x itemsize from 0
          int64[D + 1]         document indices: document d is sequences [idx[d], idx[d + 1]);
                               idx[0] == 0, idx[D] == S
          int8[S]              (optional, "multimodal" datasets only) sequence modes
    .bin  the ids of every sequence back to back, in the dtype of the code

The reader takes a file with or without the modes block (its size tells which); the writer
never writes it. Megatron's preprocessing picks uint16 for a vocabulary below 65,500 entries
and int32 otherwise (``DType.optimal_dtype``); :func:`megatron_token_dtype` does the same.

Documents and eos: a Rosetta mono shard stores each document followed by the tokenizer's eos.
Export writes a document's ids without it, unless ``append_eod`` (Megatron's
``preprocess_data.py --append-eod``, which GPT training usually wants) keeps one eos at the end of
each. Import drops one trailing eos per document, if there is one, since our shards add their
own; an eos anywhere else inside a document is refused (our readers cut documents at eos), and
a document left empty is skipped and counted as ``empty`` in the manifest's ``rejected``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

import numpy as np

from data_pipeline.manifest import load_manifest, manifest_path, write_manifest
from data_pipeline.shard import SHARD_NAME_RE, ShardResult, ShardSettings, build_manifest
from data_pipeline.shard import _sample_bounds as sample_bounds
from data_pipeline.shard_format import (
    DEFAULT_SAMPLE_TOKENS,
    MONO_EXT,
    ShardWriter,
    dtype_name,
    encode_mono_payload,
    iter_shard_samples,
    token_dtype,
)
from data_pipeline.text_inputs import MonoInput, Rejects
from data_pipeline.tokenizer import (
    MODEL_FILE,
    SIDECAR_FILE,
    Tokenizer,
    load_tokenizer,
    sha256_file,
)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices
HEADER_BYTES = _HEADER.size  # 34
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
"""Megatron's dtype code -> numpy dtype (``indexed_dataset.DType``)."""
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
TOKEN_DTYPE_NAMES = ("uint8", "int8", "int16", "int32", "int64", "uint16")
"""The integer dtypes of Megatron's codes: the ones that can hold token ids."""
UINT16_VOCAB_LIMIT = 65500
"""Below this many vocabulary entries Megatron's preprocessing stores ids as uint16."""
DEFAULT_SHARD_TOKENS = 16 << 20
"""Imported shards: a new shard starts after this many ids (about the sharding job's size)."""
_CHECK_BLOCK = 1 << 24  # ids checked per numpy pass, to bound the memory of the checks


def megatron_token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice for ids of a vocabulary: uint16 below 65,500 entries, else int32.

    Raises:
        ValueError: ``vocab_size`` below 1 or above int32's range.
    """
    if not 1 <= vocab_size <= np.iinfo(np.int32).max + 1:
        raise ValueError(f"vocab_size ({vocab_size}) must be in [1, 2**31]")
    return np.dtype("<u2") if vocab_size < UINT16_VOCAB_LIMIT else np.dtype("<i4")


def token_dtype_from_name(name: str) -> np.dtype:
    """The little-endian dtype of one of :data:`TOKEN_DTYPE_NAMES`.

    Raises:
        ValueError: not one of them.
    """
    if name not in TOKEN_DTYPE_NAMES:
        raise ValueError(f"--dtype ({name!r}) must be one of {', '.join(TOKEN_DTYPE_NAMES)}")
    return np.dtype(name).newbyteorder("<")


def paths_of(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``: the suffixes are appended, as Megatron does."""
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _map(path: Path, dtype: np.dtype, *, count: int, offset: int) -> np.ndarray:
    """A read-only memory map of ``count`` items at byte ``offset`` (empty without mapping)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class MegatronDataset:
    """A Megatron indexed dataset opened for reading, both files checked.

    Attributes:
        prefix: the path prefix. bin_path / idx_path: its two files.
        dtype: the ids' dtype. sequence_lengths: int32 ``[S]``. sequence_pointers: int64 ``[S]``
        (bytes). document_indices: int64 ``[D + 1]``. sequence_modes: int8 ``[S]`` or None.
        tokens: every id, ``[sum(sequence_lengths)]`` (read-only memory maps, all of them).

    Raises (from the constructor):
        FileNotFoundError: ``PREFIX.idx`` or ``PREFIX.bin`` is missing.
        ValueError: the file and its first fault (see the module docstring).
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = paths_of(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"megatron dataset {self.prefix!r}: no file {str(path)!r}")
        idx = str(self.idx_path)
        size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise ValueError(
                f"{idx}: starts with {head[: len(INDEX_MAGIC)]!r}, not {INDEX_MAGIC!r}: "
                "not a Megatron indexed dataset index"
            )
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{idx}: truncated: {size} bytes, the header alone is {HEADER_BYTES}")
        _, version, code, num_seq, num_doc_idx = _HEADER.unpack(head)
        if version != INDEX_VERSION:
            raise ValueError(f"{idx}: version {version}, only {INDEX_VERSION} is defined")
        if code not in DTYPE_CODES:
            known = ", ".join(f"{c} {d.name}" for c, d in DTYPE_CODES.items())
            raise ValueError(f"{idx}: dtype code {code} is not one of Megatron's ({known})")
        self.dtype = DTYPE_CODES[code]
        if num_doc_idx < 1:
            raise ValueError(f"{idx}: document count {num_doc_idx} must be >= 1 (the leading 0)")
        expected = HEADER_BYTES + num_seq * (4 + 8) + num_doc_idx * 8
        if size < expected:
            raise ValueError(
                f"{idx}: truncated: {size} bytes, its header ({num_seq} sequences, "
                f"{num_doc_idx} document indices) needs {expected}"
            )
        if size not in (expected, expected + num_seq):
            raise ValueError(
                f"{idx}: {size} bytes, its header ({num_seq} sequences, {num_doc_idx} document "
                f"indices) needs {expected} (or {expected + num_seq} with sequence modes)"
            )
        at = HEADER_BYTES
        self.sequence_lengths = _map(self.idx_path, np.dtype("<i4"), count=num_seq, offset=at)
        at += 4 * num_seq
        self.sequence_pointers = _map(self.idx_path, np.dtype("<i8"), count=num_seq, offset=at)
        at += 8 * num_seq
        self.document_indices = _map(self.idx_path, np.dtype("<i8"), count=num_doc_idx, offset=at)
        at += 8 * num_doc_idx
        self.sequence_modes = (
            _map(self.idx_path, np.dtype("i1"), count=num_seq, offset=at)
            if size > expected
            else None
        )
        self._check_index(idx, num_seq)
        self._token_offsets = np.zeros(num_seq + 1, dtype=np.int64)
        np.cumsum(self.sequence_lengths, out=self._token_offsets[1:])
        itemsize = self.dtype.itemsize
        pointers = self._token_offsets[:-1] * itemsize
        if num_seq and not np.array_equal(self.sequence_pointers, pointers):
            i = _first_bad(self.sequence_pointers != pointers)
            raise ValueError(
                f"{idx}: sequence {i} points at byte {int(self.sequence_pointers[i])}, not "
                f"{int(pointers[i])} (the running sum of lengths x {itemsize})"
            )
        num_tokens = int(self._token_offsets[-1])
        bin_size = self.bin_path.stat().st_size
        if bin_size != num_tokens * itemsize:
            state = "truncated: " if bin_size < num_tokens * itemsize else ""
            raise ValueError(
                f"{self.bin_path}: {state}{bin_size} bytes, its index describes "
                f"{num_tokens} {self.dtype.name} ids ({num_tokens * itemsize} bytes)"
            )
        self.tokens = _map(self.bin_path, self.dtype, count=num_tokens, offset=0)

    def _check_index(self, idx: str, num_seq: int) -> None:
        lengths, docs = self.sequence_lengths, self.document_indices
        if num_seq and np.count_nonzero(lengths < 0):
            i = _first_bad(lengths < 0)
            raise ValueError(f"{idx}: sequence {i} has length {int(lengths[i])} < 0")
        if docs[0] != 0 or docs[-1] != num_seq:
            raise ValueError(
                f"{idx}: document indices run from {int(docs[0])} to {int(docs[-1])}, they must "
                f"run from 0 to the sequence count {num_seq}"
            )
        if len(docs) > 1 and np.count_nonzero(docs[1:] < docs[:-1]):
            d = _first_bad(docs[1:] < docs[:-1])
            raise ValueError(f"{idx}: document indices fall after document {d}")

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def sequence(self, index: int) -> np.ndarray:
        """Ids of sequence ``index`` (read-only view)."""
        return self.tokens[self._token_offsets[index] : self._token_offsets[index + 1]]

    def document_token_offsets(self) -> np.ndarray:
        """int64 ``[D + 1]``: document ``d`` is ``tokens[out[d] : out[d + 1]]``."""
        return self._token_offsets[np.asarray(self.document_indices)]

    def document(self, index: int) -> np.ndarray:
        """Ids of document ``index``, its sequences joined (read-only view)."""
        a, b = self.document_indices[index], self.document_indices[index + 1]
        return self.tokens[self._token_offsets[a] : self._token_offsets[b]]


class MegatronWriter:
    """Writes one Megatron indexed dataset, one sequence per document.

    Ids go to ``.PREFIX.bin.tmp-<pid>`` as they come; :meth:`finish` writes the index beside it,
    :meth:`commit` renames both (``.bin`` first, so a present ``.idx`` means a finished pair);
    :meth:`close` does both. :meth:`abort` (or leaving a ``with`` block by an exception) removes
    the temporary files: nothing is left under either name.
    """

    def __init__(self, prefix: str | os.PathLike, *, dtype: np.dtype | str) -> None:
        dtype = np.dtype(dtype).newbyteorder("<")
        if dtype not in CODE_OF_DTYPE or dtype.kind not in "iu":
            raise ValueError(
                f"dtype ({dtype.name}) must be one of {', '.join(TOKEN_DTYPE_NAMES)} for token ids"
            )
        self.dtype = dtype
        self.bin_path, self.idx_path = paths_of(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = self.bin_path.with_name(f".{self.bin_path.name}{tag}")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}{tag}")
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._info = np.iinfo(dtype)

    def add_documents(self, ids: np.ndarray, *, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose ids are ``ids`` back to back.

        Raises:
            ValueError: ``lengths`` do not add up to ``len(ids)``, a length is negative or past
                int32, or an id does not fit the dtype.
        """
        ids = np.asarray(ids)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lengths.sum()) != len(ids) or np.count_nonzero(lengths < 0):
            raise ValueError(f"lengths (sum {int(lengths.sum())}) must add up to {len(ids)} ids")
        if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {int(lengths.max())} ids is past int32's range")
        if len(ids):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < self._info.min or hi > self._info.max:
                bad = lo if lo < self._info.min else hi
                raise ValueError(
                    f"token id {bad} does not fit {self.dtype.name}: pick a wider --dtype"
                )
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths.astype(np.int32))
        self.num_documents += len(lengths)
        self.num_tokens += len(ids)

    def add_document(self, ids: np.ndarray | Iterable[int]) -> None:
        """Append one document (one sequence)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        self.add_documents(ids, lengths=np.array([len(ids)]))

    def finish(self) -> None:
        """Close the ``.bin`` and write the ``.idx``, both still under temporary names."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        num_seq = len(lengths)
        with open(self._tmp_idx, "wb") as f:
            code = CODE_OF_DTYPE[self.dtype]
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, num_seq, num_seq + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(np.arange(num_seq + 1, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        """Move both finished files to their final names."""
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)

    def close(self) -> None:
        """:meth:`finish` then :meth:`commit`."""
        self.finish()
        self.commit()

    def abort(self) -> None:
        """Drop the temporary files."""
        self._file.close()
        self._tmp_bin.unlink(missing_ok=True)
        self._tmp_idx.unlink(missing_ok=True)

    def __enter__(self) -> MegatronWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- our shards -> Megatron ----------------------------------------------------------------


def _documents_of_sample(sample: dict, *, eod: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)`` of a decoded mono sample's documents, each followed by ``eod`` when
    it is not None (and by nothing otherwise)."""
    tokens, offsets = sample["tokens"], sample["doc_offsets"].astype(np.int64)
    stored = sample.get("eos")
    lengths = np.diff(offsets)
    if stored is not None:
        lengths = lengths - 1
        if eod == stored:
            return tokens, lengths + 1
        keep = np.ones(len(tokens), dtype=bool)
        keep[offsets[1:] - 1] = False
        tokens = tokens[keep]
    if eod is None:
        return tokens, lengths
    ends = np.cumsum(lengths)
    return np.insert(tokens, ends, np.array(eod, dtype=tokens.dtype)), lengths + 1


def _shards_tokenizer(root: Path, manifest: dict) -> Path | None:
    directory = root / manifest.get("tokenizer", {}).get("dir", "tokenizer")
    return directory if (directory / SIDECAR_FILE).is_file() else None


def _copy_tokenizer_files(src: Path, dest: Path) -> None:
    """Copy a tokenizer's two files into ``dest`` (each through a temporary name)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, SIDECAR_FILE):
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dest / name)


def export_megatron(
    shards: str | os.PathLike,
    *,
    out: str | os.PathLike,
    langs: list[str] | None = None,
    merged: bool = False,
    append_eod: bool = False,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Write the mono documents of a shard directory as Megatron indexed datasets.

    Outputs: ``OUT_<lang>.bin/.idx`` per language; a single ``OUT.bin/.idx`` when one language is
    asked for or ``merged`` (languages in sorted order, each in manifest order). Documents keep
    their order; each is one sequence and one document, its eos dropped unless ``append_eod``.
    Pair shards are not exported (the format holds monolingual documents). The shards'
    tokenizer is copied to ``tokenizer/`` beside the outputs, where ``import_megatron`` looks.

    Args:
        langs: languages to export (default: every language of the manifest).
        dtype: one of :data:`TOKEN_DTYPE_NAMES` (default: :func:`megatron_token_dtype` of the
            manifest's vocabulary).

    Returns:
        Per output ``{"prefix", "langs", "documents", "tokens", "dtype"}``.

    Raises:
        FileNotFoundError: no manifest, or a listed shard is missing.
        ValueError: a language not in the manifest, a dtype the vocabulary does not fit, a bad
            shard, or a different tokenizer already beside the outputs. Nothing is written then.
    """
    log = log or (lambda line: None)
    manifest = load_manifest(shards)
    root = manifest_path(shards).parent
    known = sorted(manifest["languages"])
    chosen = sorted(set(langs)) if langs else known
    for lang in chosen:
        if lang not in known:
            raise ValueError(
                f"--lang {lang!r} is not a language of {str(root)!r} ({', '.join(known) or 'none'})"
            )
    if not chosen:
        raise ValueError(f"{str(root)!r} has no mono language to export")
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    ids_dtype = token_dtype_from_name(dtype) if dtype else megatron_token_dtype(vocab_size)
    if vocab_size - 1 > np.iinfo(ids_dtype).max:
        raise ValueError(
            f"--dtype {ids_dtype.name} holds ids up to {np.iinfo(ids_dtype).max}, the vocabulary "
            f"has {vocab_size}"
        )
    eod = None
    tok_dir = _shards_tokenizer(root, manifest)
    if append_eod:
        if tok_dir is None:
            raise ValueError(f"--append-eod: {str(root)!r} has no tokenizer to take eos from")
        eod = int(load_tokenizer(tok_dir).special_ids["eos"])
    out = os.fspath(out)
    if merged or len(chosen) == 1:
        outputs = [(out, chosen)]
    else:
        outputs = [(f"{out}_{lang}", [lang]) for lang in chosen]
    beside = Path(out).parent / "tokenizer"
    if tok_dir is not None and (beside / SIDECAR_FILE).is_file():
        if load_tokenizer(beside).model_sha256 != load_tokenizer(tok_dir).model_sha256:
            raise ValueError(
                f"{str(beside)!r} holds another tokenizer: export into another directory"
            )
    if manifest["pairs"]:
        pairs = ", ".join(sorted(manifest["pairs"]))
        log(f"pairs not exported ({pairs}): Megatron's indexed dataset holds monolingual documents")
    writers: list[MegatronWriter] = []
    results = []
    try:
        for prefix, group in outputs:
            writer = MegatronWriter(prefix, dtype=ids_dtype)
            writers.append(writer)
            for lang in group:
                for entry in manifest["shards"]:
                    if entry["kind"] != "mono" or entry.get("lang") != lang:
                        continue
                    path = root / entry["path"]
                    if not path.is_file():
                        raise FileNotFoundError(f"shard {str(path)!r}: no such file")
                    for sample in iter_shard_samples(path):
                        ids, lengths = _documents_of_sample(sample, eod=eod)
                        writer.add_documents(ids, lengths=lengths)
            writer.finish()
            results.append(
                {
                    "prefix": prefix,
                    "langs": group,
                    "documents": writer.num_documents,
                    "tokens": writer.num_tokens,
                    "dtype": ids_dtype.name,
                }
            )
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for writer in writers:
        writer.commit()
    if tok_dir is not None:
        _copy_tokenizer_files(tok_dir, beside)
    return results


# --- Megatron -> our shards ----------------------------------------------------------------


def _check_ids(ds: MegatronDataset, doc_offsets: np.ndarray, *, vocab_size: int) -> None:
    """Every id in ``[0, vocab_size)``, block by block.

    Raises:
        ValueError: the first id out of range, with its document.
    """
    tokens = ds.tokens
    for start in range(0, len(tokens), _CHECK_BLOCK):
        block = np.asarray(tokens[start : start + _CHECK_BLOCK])
        bad = (block < 0) | (block >= vocab_size)
        if np.count_nonzero(bad):
            at = start + _first_bad(bad)
            doc = int(np.searchsorted(doc_offsets, at, side="right")) - 1
            raise ValueError(
                f"{ds.bin_path}: token id {int(tokens[at])} in document {doc} is outside the "
                f"tokenizer's vocabulary [0, {vocab_size})"
            )


def _eos_positions(ds: MegatronDataset, eos: int) -> np.ndarray:
    found = []
    tokens = ds.tokens
    for start in range(0, len(tokens), _CHECK_BLOCK):
        block = np.asarray(tokens[start : start + _CHECK_BLOCK])
        found.append(np.flatnonzero(block == eos) + start)
    return np.concatenate(found) if found else np.zeros(0, np.int64)


def _import_fingerprint(ds: MegatronDataset, tok: Tokenizer, sample_tokens: int) -> str:
    digest = hashlib.sha256()
    digest.update(sha256_file(ds.idx_path).encode())
    digest.update(f"{ds.bin_path.stat().st_size}:{tok.model_sha256}:{sample_tokens}".encode())
    return digest.hexdigest()[:16]


def _write_imported_shards(
    ds: MegatronDataset,
    *,
    lang: str,
    out: Path,
    tok: Tokenizer,
    keep: np.ndarray,
    starts: np.ndarray,
    kept_lengths: np.ndarray,
    dropped: np.ndarray,
    sample_tokens: int,
    shard_tokens: int,
) -> tuple[list[ShardResult], Rejects]:
    """Pack the kept documents (original numbers ``keep``, ids from ``starts``, ``kept_lengths``
    long, not counting the trailing eos ids at the sorted positions ``dropped``) into samples
    and shards under ``out``."""
    eos = int(tok.special_ids["eos"])
    dtype = token_dtype(tok.vocab_size)
    source = ds.bin_path.name
    chunk = _import_fingerprint(ds, tok, sample_tokens)
    cum = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(kept_lengths + 1, out=cum[1:])  # each document with its eos
    empty_docs = np.setdiff1d(np.arange(ds.num_documents), keep)
    rejects = Rejects()
    results: list[ShardResult] = []
    bounds = list(sample_bounds([(source, len(keep))], cum, sample_tokens))
    shard_groups: list[list[tuple[int, int]]] = []
    tokens_in_shard = shard_tokens
    for a, b, _ in bounds:
        if tokens_in_shard >= shard_tokens:
            shard_groups.append([])
            tokens_in_shard = 0
        shard_groups[-1].append((a, b))
        tokens_in_shard += int(cum[b] - cum[a])
    for index, group in enumerate(shard_groups):
        first = int(keep[group[0][0]]) if index else 0
        stop = int(keep[shard_groups[index + 1][0][0]]) if index + 1 < len(shard_groups) else None
        empties = np.count_nonzero(
            (empty_docs >= first) & (empty_docs < (ds.num_documents if stop is None else stop))
        )
        shard_rejects = Rejects(empty=int(empties))
        rejects.merge(shard_rejects)
        path = out / f"mono_{lang}_{index:05d}.tar"
        documents = src_tokens = 0
        with ShardWriter(path, dtype=dtype) as writer:
            for a, b in group:
                # the ids from the sample's first kept document to the end of its last, less the
                # trailing eos dropped from them (a document left empty had nothing else), then
                # one eos after each document
                lo, hi = int(starts[a]), int(starts[b - 1] + kept_lengths[b - 1])
                region = np.asarray(ds.tokens[lo:hi])
                cut = dropped[np.searchsorted(dropped, lo) : np.searchsorted(dropped, hi)]
                region = np.delete(region, cut - lo) if len(cut) else region
                ends = np.cumsum(kept_lengths[a:b])
                ids = np.insert(region.astype(dtype), ends, np.array(eos, dtype=dtype))
                num_tokens = int(ends[-1])
                meta = {
                    "kind": "mono",
                    "lang": lang,
                    "source": source,
                    "first_doc": int(keep[a]),
                    "num_docs": b - a,
                    "num_tokens": num_tokens,
                    "eos": eos,
                    "dtype": dtype_name(dtype),
                    "chunk": chunk,
                }
                if a == group[0][0]:
                    meta["rejected"] = shard_rejects.as_dict()
                payload = encode_mono_payload(ids, doc_offsets=cum[a : b + 1] - cum[a])
                writer.add_sample(meta, payload=payload, ext=MONO_EXT)
                documents += b - a
                src_tokens += num_tokens
            samples = writer.num_samples
        results.append(
            ShardResult(
                path=path.name,
                kind="mono",
                name=lang,
                sha256=sha256_file(path),
                bytes=path.stat().st_size,
                samples=samples,
                documents=documents,
                src_tokens=src_tokens,
                rejected=shard_rejects.as_dict(),
            )
        )
    if not shard_groups:
        rejects.merge(Rejects(empty=len(empty_docs)))
    return results, rejects


def import_megatron(
    prefix: str | os.PathLike,
    *,
    lang: str,
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Read one Megatron indexed dataset into a new shard directory of language ``lang``.

    Each Megatron document (its sequences joined, one trailing eos dropped) becomes one
    document of ``mono_<lang>_NNNNN.tar`` shards packed like the sharding job's (samples of at
    most ``sample_tokens`` ids with eos, a new shard after ``shard_tokens`` ids); the manifest
    and a copy of the tokenizer are written too. ``source`` is ``PREFIX.bin``'s name and
    ``first_doc`` the Megatron document number. The directory is built under a temporary name
    and renamed when complete.

    Args:
        tokenizer: the tokenizer the ids come from (default: ``tokenizer/`` beside ``PREFIX``,
            where :func:`export_megatron` puts it).

    Returns:
        The manifest written (``shard_tokens`` in place of ``shard_text_bytes``).

    Raises:
        FileNotFoundError: a file of the dataset or the tokenizer is missing.
        ValueError: a bad dataset (see :class:`MegatronDataset`), float ids, an id outside the
            tokenizer's vocabulary, an eos inside a document, no document left, a language the
            tokenizer was not trained for, a setting below 1, or ``out`` not new or empty.
    """
    if sample_tokens < 1:
        raise ValueError(f"--sample-tokens ({sample_tokens}) must be >= 1")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens ({shard_tokens}) must be >= 1")
    if not SHARD_NAME_RE.match(f"mono_{lang}_00000.tar"):
        raise ValueError(f"--lang ({lang!r}) must be letters, digits or _")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out {str(out)!r} exists and is not an empty directory: import into a new one "
            "(and join shard directories with `merge`)"
        )
    ds = MegatronDataset(prefix)
    if tokenizer is None:
        tokenizer = Path(os.fspath(prefix)).parent / "tokenizer"
        if not tokenizer.is_dir():
            raise FileNotFoundError(
                f"no tokenizer/ beside {ds.prefix!r}: give --tokenizer DIR (the tokenizer the "
                "ids come from)"
            )
    tok = load_tokenizer(tokenizer)
    if lang not in tok.lang_ids:
        raise ValueError(
            f"--lang {lang!r} is not one of the tokenizer's languages "
            f"({', '.join(sorted(tok.lang_ids))})"
        )
    if ds.dtype.kind not in "iu":
        raise ValueError(f"{ds.idx_path}: dtype {ds.dtype.name} holds no token ids")
    doc_offsets = ds.document_token_offsets()
    _check_ids(ds, doc_offsets, vocab_size=tok.vocab_size)
    eos = int(tok.special_ids["eos"])
    lengths = np.diff(doc_offsets)
    last = doc_offsets[1:] - 1
    ends_with_eos = np.zeros(ds.num_documents, dtype=bool)
    nonempty = lengths > 0
    ends_with_eos[nonempty] = np.asarray(ds.tokens[last[nonempty]]) == eos
    eos_at = _eos_positions(ds, eos)
    inside = np.setdiff1d(eos_at, last[ends_with_eos], assume_unique=True)
    if len(inside):
        doc = int(np.searchsorted(doc_offsets, inside[0], side="right")) - 1
        raise ValueError(
            f"{ds.bin_path}: document {doc} holds the eos id {eos} before its end: Rosetta shards "
            "keep eos for document ends"
        )
    kept_lengths_all = lengths - ends_with_eos
    keep = np.flatnonzero(kept_lengths_all > 0)
    if not len(keep):
        raise ValueError(f"megatron dataset {ds.prefix!r} has no non-empty document to import")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        results, rejects = _write_imported_shards(
            ds,
            lang=lang,
            out=tmp,
            tok=tok,
            keep=keep,
            starts=doc_offsets[keep],
            kept_lengths=kept_lengths_all[keep],
            dropped=last[ends_with_eos],
            sample_tokens=sample_tokens,
            shard_tokens=shard_tokens,
        )
        _copy_tokenizer_files(tok.directory, tmp / "tokenizer")
        manifest = build_manifest(
            results,
            tok=tok,
            settings=ShardSettings(sample_tokens=sample_tokens),
            rejects={lang: rejects},
            mono=[MonoInput(lang, (ds.bin_path,))],
            pairs=[],
        )
        del manifest["shard_text_bytes"]  # shards were cut by ids, not by input text
        manifest["shard_tokens"] = shard_tokens
        write_manifest(tmp, manifest)
        if out.is_dir():
            out.rmdir()  # empty (checked above): the finished directory takes its place
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
