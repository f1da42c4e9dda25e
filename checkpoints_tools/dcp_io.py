"""Reading a trainer checkpoint without the trainer: metadata, config, one tensor at a time.

What to call::

    ckpt = open_checkpoint(path)          # ValueError: not a complete trainer checkpoint
    ckpt.cfg, ckpt.model_cfg, ckpt.step(), ckpt.has_optimizer()
    ckpt.model_shapes()                   # our model key -> (global shape, dtype); no tensor read
    w = ckpt.read_tensor(key, dtype=None) # one global tensor (KeyError: no such model tensor)
    state = ckpt.load_model_state()       # every model tensor (memory: the whole model)

One process, no process group; the checkpoint's saving layout does not matter. Memory of
``read_tensor``: about twice the tensor at its peak, nothing once the caller drops it (below).

A checkpoint directory (``pretrain.checkpoint``) holds DCP shards of
``{"train": {"model", "optim", "step", "scheduler"}}``. DCP stores each tensor as its global
(unsharded) shape split into the chunks the saving ranks held, so any layout reads back the same:
``read_tensor`` allocates one global tensor and lets DCP fill it from however many chunks. The
``.metadata`` file is a pickle: checkpoints are trusted run output, never files from elsewhere.

Memory of one read (measured: BENCHMARKS.md, "Checkpoint export"): DCP's
``FileSystemReader.read_data`` reads only the requested items' byte ranges, ``torch.load``s each
chunk into a temporary and copies it into the target, so a read peaks at about twice the tensor and
frees everything once the caller drops it. Time: ``dcp.load`` parses ``.metadata`` again on every
call (36 ms of a 46 ms read for a 24-layer model), so reads go through a reader that hands DCP the
metadata parsed once at open.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from pretrain.config import RunConfig, load_config
from pretrain.models.config import ModelConfig

MODEL_PREFIX = "train.model."


@dataclass
class Checkpoint:
    """An opened checkpoint.

    Attributes:
        path: the checkpoint directory.
        metadata: DCP's metadata (global shapes and dtypes of every entry).
        cfg: the resolved run config saved beside it.
    """

    path: Path
    metadata: Metadata
    cfg: RunConfig

    def reader(self) -> FileSystemReader:
        """A DCP reader of this checkpoint that does not re-parse ``.metadata``."""
        return _OpenedReader(self.path, self.metadata)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.cfg.model

    def model_shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Our model key -> (global shape, dtype), from metadata only."""
        shapes = {}
        for key, meta in self.metadata.state_dict_metadata.items():
            if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata):
                shapes[key[len(MODEL_PREFIX) :]] = (meta.size, meta.properties.dtype)
        return shapes

    def has_optimizer(self) -> bool:
        return any(k.startswith("train.optim.") for k in self.metadata.state_dict_metadata)

    def read_tensor(self, key: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One model tensor, global shape, read on its own (memory: that tensor).

        Raises:
            KeyError: no model tensor ``key``.
        """
        size, stored = self.model_shapes_cache()[key]
        tensor = torch.empty(size, dtype=stored)
        _quiet_load({MODEL_PREFIX + key: tensor}, self.reader())
        return tensor if dtype is None else tensor.to(dtype)

    def model_shapes_cache(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        if not hasattr(self, "_shapes"):
            self._shapes = self.model_shapes()
        return self._shapes

    def step(self) -> int:
        """The training step it was saved at (the ``train.step`` entry)."""
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = _load_state_dict_from_keys({"train.step"}, checkpoint_id=str(self.path))
        return int(loaded["train"]["step"])

    def load_model_state(self, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every model tensor (memory: the whole model; for ``--verify`` and tests)."""
        state = {k: torch.empty(size, dtype=dt) for k, (size, dt) in self.model_shapes().items()}
        _quiet_load({MODEL_PREFIX + k: v for k, v in state.items()}, self.reader())
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        return state


class _OpenedReader(FileSystemReader):
    """``FileSystemReader`` whose global metadata is the already parsed ``Metadata``.

    DCP's planner only reads the metadata, so one parsed copy serves every load. A rank-local
    metadata request (``rank=``, for checkpoints saved without coordination) still reads its
    file.
    """

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        return self._metadata


def _quiet_load(state: dict[str, Any], reader: FileSystemReader) -> None:
    # Without a process group DCP loads in this process and warns that it does so.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a complete checkpoint directory written by the trainer (or by this package).

    Raises:
        ValueError: not a directory, a ``.partial`` save, no ``.metadata`` (incomplete), no
            ``config.yaml``, or no model tensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a directory")
    if path.name.endswith(".partial"):
        raise ValueError(
            f"checkpoint {str(path)!r} is a save in progress or one a killed run left behind "
            "(.partial): it is incomplete"
        )
    if not (path / ".metadata").is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no .metadata: it is incomplete")
    if not (path / "config.yaml").is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no config.yaml: the model is unknown")
    cfg = load_config(path / "config.yaml")
    metadata = FileSystemReader(str(path)).read_metadata()
    ckpt = Checkpoint(path=path, metadata=metadata, cfg=cfg)
    if not ckpt.model_shapes():
        raise ValueError(f"checkpoint {str(path)!r} holds no model tensors (train.model.*)")
    return ckpt
