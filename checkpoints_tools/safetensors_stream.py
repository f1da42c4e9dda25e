"""Writing and reading safetensors shards one tensor at a time (memory: that one tensor).

What to call: writing, ``plan_shards(entries, max_shard_bytes=n)`` (greedy, in order; a larger
tensor gets a shard of its own), then per shard ``write_shard(path, entries, produce,
metadata=None)`` (calls ``produce(name)`` for each tensor in turn; returns the bytes of tensor
data; ``ValueError`` for a produced tensor whose shape or dtype differs from its entry), then
``write_index(out, shard_names, total_size=n)``. Reading, ``SafetensorsDir(directory)``:
``names()``, ``shape(name)`` (header only) and ``read(name)`` (one copy, no mapping, nothing
cached); ``read_header(path)``. Malformed files and directories raise ``ValueError``.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. The format is
simple enough to stream: an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes in that order. Shapes and dtypes are
known before any tensor is read (from DCP metadata, mapped through the export plan on the meta
device), so the header is written first and tensors follow as they are produced.

Reading (:class:`SafetensorsDir`, for import-hf) parses each file's header and reads one tensor's
byte range straight into that tensor's memory: one copy, nothing mapped. (safetensors'
``safe_open`` maps the file, and ``get_tensor`` leaves the pages it touched in the process's RSS
until the file is closed: measured 2026-11-23, a 95 MiB import from 60 MB shards grew RSS by 56
MiB that way, and a multi-GB shard would add up to its size.) A transformers directory is either
one ``model.safetensors`` or the shards that ``model.safetensors.index.json`` lists.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def plan_shards(
    entries: list[tuple[str, torch.Size, torch.dtype]], *, max_shard_bytes: int
) -> list[list[tuple[str, torch.Size, torch.dtype]]]:
    """Greedy split of ``(name, shape, dtype)`` in order into shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[tuple[str, torch.Size, torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    return shards


def write_shard(
    path: str | os.PathLike,
    entries: list[tuple[str, torch.Size, torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file, calling ``produce(name)`` for each tensor in turn.

    Returns:
        Bytes of tensor data written.

    Raises:
        ValueError: a produced tensor whose shape or dtype differs from its entry.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tensor.shape != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {name!r} came out {tuple(tensor.shape)} {tensor.dtype}, planned "
                    f"{tuple(shape)} {dtype}"
                )
            flat = tensor.contiguous().reshape(-1).view(torch.uint8)
            out.write(flat.numpy().data)
            del tensor, flat
    return offset


def write_index(
    out: Path, shard_names: Iterable[tuple[str, list[str]]], *, total_size: int
) -> None:
    """``model.safetensors.index.json``: total size and tensor name -> shard file."""
    weight_map = {name: file for file, names in shard_names for name in names}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class SafetensorsDir:
    """The tensors of a transformers directory, listed from the file headers and read one at a
    time (no file is read whole or mapped; nothing is cached).

    Raises (on construction):
        ValueError: neither ``model.safetensors.index.json`` nor ``model.safetensors``; an index
            that is not JSON or names anything but file names in the directory; a shard the
            index names that is missing or is not safetensors; a tensor name found in two files.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = _index_files(index)
        elif (self.directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ValueError(
                f"transformers directory {str(self.directory)!r} has no "
                "model.safetensors(.index.json): only safetensors weights are read"
            )
        self._entries: dict[str, _Entry] = {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise ValueError(
                    f"transformers directory {str(self.directory)!r} lacks {file!r}, which "
                    "model.safetensors.index.json names"
                )
            # The headers, not the index, say what each file holds.
            for name, entry in read_header(path).items():
                if name in self._entries:
                    raise ValueError(
                        f"tensor {name!r} is in both {self._entries[name].path.name!r} and {file!r}"
                    )
                self._entries[name] = entry

    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._entries)

    def shape(self, name: str) -> torch.Size:
        """The stored shape of tensor ``name`` (from the header; nothing is read)."""
        return self._entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, read into memory of its own (one copy, no mapping).

        Raises:
            KeyError: no tensor ``name``.
            ValueError: the file ends before the tensor does.
        """
        entry = self._entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(entry.path, "rb", buffering=0) as handle:
            handle.seek(entry.offset)
            done = 0
            while done < len(buffer):
                count = handle.readinto(buffer[done:])
                if not count:
                    raise ValueError(f"{str(entry.path)!r} ends inside tensor {name!r}")
                done += count
        return tensor


def _index_files(index: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` names (plain names in its directory).

    Raises:
        ValueError: not JSON, no ``weight_map`` of tensor name -> file name, or a file name
            that leaves the directory.
    """
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{str(index)!r} is not a JSON object ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{str(index)!r} has no weight_map of tensor name -> file name")
    for file in weight_map.values():
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(
                f"{str(index)!r} names file {file!r}: only files of its own directory are read"
            )
    return sorted(set(weight_map.values()))


_READ_DTYPES = {
    **{code: dtype for dtype, code in _DTYPES.items()},
    "F64": torch.float64,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # of the first byte in the file
    shape: torch.Size
    dtype: torch.dtype


def read_header(path: str | os.PathLike) -> dict[str, _Entry]:
    """Name -> where and what each tensor of one safetensors file is (header only).

    Raises:
        ValueError: not a safetensors file, an unknown dtype, or byte ranges that disagree with
            the shapes or the file size.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if length + 8 > size:
            raise ValueError(f"{str(path)!r} is not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise ValueError(f"{str(path)!r} is not a safetensors file") from None
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; this machine is not")
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file (header not a JSON object)")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{str(path)!r}: tensor {name!r} needs dtype, shape and data_offsets")
        if not isinstance(info["dtype"], str) or info["dtype"] not in _READ_DTYPES:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not _naturals(shape):
            raise ValueError(f"{str(path)!r}: tensor {name!r} has shape {shape!r}")
        if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has data_offsets {offsets!r}")
        dtype, shape = _READ_DTYPES[info["dtype"]], torch.Size(shape)
        begin, end = offsets
        if end - begin != shape.numel() * dtype.itemsize or 8 + length + end > size:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has a bad byte range")
        entries[name] = _Entry(path, 8 + length + begin, shape, dtype)
    return entries


def _naturals(value: object) -> bool:
    """A list of ints >= 0 (bool is not an int here)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
