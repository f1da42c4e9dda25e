"""Writing safetensors shards one tensor at a time (memory: the tensor being written).

``safetensors.torch.save_file`` needs every tensor of a file in memory at once. The format is
simple enough to stream: an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes in that order. Shapes and dtypes are
known before any tensor is read (from DCP metadata, mapped through the export plan on the meta
device), so the header is written first and tensors follow as they are produced.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
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
