"""Writing a DCP checkpoint whose tensors are produced one at a time (memory: about one tensor).

What to call: ``save_streamed(state, path=dir, produce=fn, bucket_bytes=None)``, in one process
without a process group: ``state`` is a state dict whose tensors are meta tensors (shape and
dtype only) beside ordinary values, and ``fn(flat_key, meta_tensor)`` returns each tensor just
before it is written (``flat_key`` as in the metadata, e.g. ``train.model.norm.weight``). A
produced tensor whose shape or dtype differs from its meta tensor raises ``ValueError``. Peak
memory is about 2x the largest tensor (one bucket of at most ``bucket_bytes`` plus the tensor
being produced). :class:`BucketedWriter` and :func:`buckets` are the writer pieces.

``dcp.save`` wants a state dict of materialised tensors, i.e. the whole model in memory. Here the
state dict holds meta tensors (shape and dtype only) beside ordinary values; the planner asks
``produce(key, meta)`` for each meta tensor just before the writer serialises it, and nothing keeps
the tensor afterwards. The result is an ordinary DCP checkpoint (``.metadata`` plus
``__0_<i>.distcp`` files, metadata built by DCP's own planner from the same state-dict structure
the trainer saves), which ``dcp.load``, the trainer's resume, ``inspect``, ``export-hf`` and
``reshard`` read like any other.

One detail of torch's ``FileSystemWriter`` (2.13, ``filesystem.py: _write_files_from_queue``)
decides the memory: it keeps a reference to every tensor written to a file until that file is
closed (a ``tensor_dict`` its safetensors format needs), and by default it writes all of a rank's
items into one file, so the default writer would end up holding the whole model. The writer
here splits the items into files of at most ``bucket_bytes`` (default: the largest tensor), so at
most one bucket plus the tensor being produced is alive: about 2x the largest tensor. It relies on
the writer's ``_write_data`` (a queue of ``(path, file name, items)``), which
tests/cli/test_checkpoints_memory.py pins through the measured memory of an import.
"""

from __future__ import annotations

import os
import queue
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

Producer = Callable[[str, torch.Tensor], torch.Tensor]


class _ProducingPlanner(DefaultSavePlanner):
    """``DefaultSavePlanner`` that materialises a meta tensor when the writer asks for it."""

    def __init__(self, produce: Producer) -> None:
        super().__init__()
        self._produce = produce

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = super().lookup_object(index)
        if not (isinstance(obj, torch.Tensor) and obj.is_meta):
            return obj
        tensor = self._produce(index.fqn, obj)
        if tensor.shape != obj.shape or tensor.dtype != obj.dtype:
            raise ValueError(
                f"tensor {index.fqn!r} came out {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{tuple(obj.shape)} {obj.dtype}"
            )
        return tensor.contiguous()


def _nbytes(item: WriteItem) -> int:
    data = item.tensor_data
    return 0 if data is None else data.size.numel() * data.properties.dtype.itemsize


def buckets(items: list[WriteItem], *, bucket_bytes: int) -> list[list[WriteItem]]:
    """Items in order, split into runs of at most ``bucket_bytes`` of tensor data (a larger
    tensor gets a run of its own); byte items (scalars, lists) go with the first run."""
    byte_items = [i for i in items if i.type == WriteItemType.BYTE_IO]
    runs: list[list[WriteItem]] = [list(byte_items)]
    size = 0
    for item in items:
        if item.type == WriteItemType.BYTE_IO:
            continue
        nbytes = _nbytes(item)
        if size and size + nbytes > bucket_bytes:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += nbytes
    return [run for run in runs if run]


class BucketedWriter(FileSystemWriter):
    """``FileSystemWriter`` that writes a rank's items into several files of at most
    ``bucket_bytes`` of tensors each (``None``: the largest tensor), so that the tensors it keeps
    until a file is closed stay bounded (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, bucket_bytes: int | None = None) -> None:
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.bucket_bytes = bucket_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        limit = self.bucket_bytes or max((_nbytes(i) for i in plan.items), default=1)
        files: queue.Queue = queue.Queue()
        for count, run in enumerate(buckets(plan.items, bucket_bytes=limit)):
            name = f"{plan.storage_data.prefix}{count}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, run))
        return self._write_data(planner, files)


def save_streamed(
    state: dict[str, Any],
    *,
    path: str | os.PathLike,
    produce: Producer,
    bucket_bytes: int | None = None,
) -> None:
    """Save ``state`` as a DCP checkpoint in directory ``path`` (one process, no process group),
    calling ``produce(flat_key, meta_tensor)`` for each meta tensor as it is written
    (``flat_key`` as in the metadata, e.g. ``train.model.norm.weight``).

    Raises:
        ValueError: a produced tensor whose shape or dtype differs from its meta tensor (and
            whatever ``produce`` raises).
    """
    writer = BucketedWriter(path, bucket_bytes=bucket_bytes)
    with warnings.catch_warnings():
        # without a process group DCP saves in this process and warns that it does so
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=writer, planner=_ProducingPlanner(produce), no_dist=True)
