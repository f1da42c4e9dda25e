"""Sharded, atomic training checkpoints with torch.distributed.checkpoint (DCP).

What to call (every rank calls every :class:`CheckpointManager` method; each is a collective)::

    manager = CheckpointManager(run_dir, keep=k, async_save=False)
    state = TrainState(model_parts, optimizers, schedulers, step=step)
    manager.save(step, state, rank_state=..., config_yaml=..., index_entry=...)
    manager.recover()                        # train.resume=auto: complete fully written partials
    rank_states = manager.load(path, state, ranks=[...])
    manager.close()                          # finish a background save, prune

Guarantee: a checkpoint named ``step_<N>`` is complete (every rank's shards and state on disk);
a reader never sees a half-written one. ``TrainState`` keys are the unsplit model's parameter
names, so one checkpoint loads into any pipeline, tensor, expert or data-parallel layout.
Reading without loading (any rank, no collective): ``complete_checkpoints(root)`` /
``latest_checkpoint(root)``; ``latest_loadable(root)``, the newest one that looks whole
(``checkpoint_problem(path)``), raising ``ValueError`` when every one is corrupt;
``read_rank_index(path)``, ``read_rank_states(path, ranks=...)``; ``check_compatible(path,
model_cfg)`` raises ``ValueError`` naming the first architecture key that differs.
``rank_zero_result(fn, *args)`` computes ``fn`` on rank 0 and hands it to every rank (a
collective). ``rng_state()`` / ``set_rng_state(state)`` capture and restore this process's RNGs.
``CheckpointPolicy(every)`` decides when the training loop saves.

Layout of ``<run_dir>/checkpoints/``::

    step_<N>/            a complete checkpoint (only complete ones carry this name)
        .metadata        DCP metadata (a pickle: checkpoints are trusted run output)
        __<r>_0.distcp   DCP shards: model, optimizer, scheduler, step
        rank_<r>.pt      per-rank state: RNG states and the data loader's state
        rank_<r>.done    marker: rank r's DCP write has finished
        rank_index.json  world size and each rank's small index entry (its dp coordinate), so
                         that a resuming rank reads only the rank files it needs
        config.yaml      the resolved run config (model and layout it was saved with)
    .step_<N>.partial/   a save in progress, or one a killed run left behind

A save writes into ``.step_<N>.partial``. A synchronous save ends with a barrier, after which
rank 0 renames it to ``step_<N>`` (a directory rename is atomic) and deletes all but the newest
``keep`` complete checkpoints. With ``async_save`` the DCP write runs in the background on a
process group of its own; when a rank's write finishes, a callback (file operations only, no
collectives) writes that rank's ``rank_<r>.done``, and the callback that finds ``.metadata``
and every rank's marker renames the directory: the checkpoint is complete as soon as it is on
disk, not at the next save. A run killed between the last marker and the rename leaves a
partial directory that is fully written; :meth:`CheckpointManager.recover` (run by
``train.resume=auto``) completes it. Pruning happens at the next save or at ``close``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from pretrain.models.config import ModelConfig, architecture_keys

_STEP_RE = re.compile(r"^step_(\d+)$")
_PARTIAL_RE = re.compile(r"^\.step_(\d+)\.partial$")
RANK_INDEX = "rank_index.json"


class TrainState(Stateful):
    """What DCP saves: model and optimizer (sharded as they are), scheduler and step.

    ``model`` may be a list of model parts (a rank's pipeline stages) with one optimizer and one
    scheduler per part. Keys are the unsplit model's parameter names (pipeline stages keep
    them) and the optimizer state is flattened onto those names, so one checkpoint loads into
    any pipeline, tensor, expert or data-parallel layout.
    """

    def __init__(
        self,
        model: torch.nn.Module | list[torch.nn.Module],
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        scheduler: torch.optim.lr_scheduler.LRScheduler
        | list[torch.optim.lr_scheduler.LRScheduler]
        | None = None,
        *,
        step: int = 0,
    ) -> None:
        self.parts = list(model) if isinstance(model, (list, tuple)) else [model]
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if scheduler is None:
            self.schedulers = []
        elif isinstance(scheduler, (list, tuple)):
            self.schedulers = list(scheduler)
        else:
            self.schedulers = [scheduler]
        if len(self.parts) != len(self.optimizers):
            raise ValueError(
                f"model parts ({len(self.parts)}) and optimizers ({len(self.optimizers)}) "
                "must pair up"
            )
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        model_sd: dict[str, Any] = {}
        optim_sd: dict[str, Any] = {}
        for part, optimizer in zip(self.parts, self.optimizers):
            model_sd.update(get_model_state_dict(part))
            optim_sd.update(get_optimizer_state_dict(part, optimizer, options=_FLAT))
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "step": self.step}
        if self.schedulers:
            # Every part's schedule is the same function of the step.
            state["scheduler"] = self.schedulers[0].state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, optimizer in zip(self.parts, self.optimizers):
            set_model_state_dict(part, state_dict["model"], options=_PART)
            set_optimizer_state_dict(
                part, optimizer, optim_state_dict=state_dict["optim"], options=_FLAT
            )
        if "scheduler" in state_dict:
            for scheduler in self.schedulers:
                scheduler.load_state_dict(state_dict["scheduler"])
        self.step = int(state_dict["step"])


# Optimizer state keyed by parameter name (not by position), so that parts and layouts mix.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
# A part takes its own keys from the merged dict of all parts.
_PART = StateDictOptions(strict=False)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, Python), loadable with weights_only."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": _tuples_to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(v) for v in value]
    return value


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def complete_checkpoints(checkpoint_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``checkpoint_root``, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoint_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(checkpoint_root)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes checkpoint ``path`` unloadable, found without loading it: its DCP metadata
    unreadable, a shard file it names missing or shorter than the bytes it indexes, a rank
    state that ``torch.load(weights_only=True)`` refuses. None when it looks whole.

    The metadata is unpickled (DCP checkpoints are trusted run output).
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a torn write shows as any unpickling error
        return f"{path / '.metadata'}: unreadable ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size < size:
            return f"{file}: truncated ({file.stat().st_size} of {size} bytes)"
    for file in sorted(path.glob("rank_*.pt")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            return f"{file}: unreadable ({type(err).__name__}: {err})"
    return None


def latest_loadable(checkpoint_root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """``train.resume=auto``: the newest complete checkpoint under ``checkpoint_root`` that
    looks whole (:func:`checkpoint_problem`), and one note per corrupt newer one passed over.

    Returns:
        ``(path or None when there is no complete checkpoint, notes)``.

    Raises:
        ValueError: every complete checkpoint is corrupt (one line naming the newest).
    """
    found = complete_checkpoints(checkpoint_root)
    notes = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes
        notes.append(
            f"checkpoint {path} is corrupt ({problem}); falling back to the previous "
            "complete checkpoint"
        )
        if len(notes) == 1:
            newest = f"the newest, {path.name}, is corrupt: {problem}"
    if found:
        raise ValueError(
            f"train.resume (auto): no loadable checkpoint in {checkpoint_root}; {newest}"
        )
    return None, notes


def holds_earlier_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds metrics or checkpoints (complete or partial) of a run."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    return (run_dir / "metrics.jsonl").exists() or (root.is_dir() and any(root.iterdir()))


def move_run_dir_aside(run_dir: str | os.PathLike) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.old-<UTC time>`` (``-2``, ``-3``, ... when taken) and
    return the new name; nothing is deleted."""
    import time

    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 2
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    os.replace(run_dir, target)
    return target


def read_rank_index(path: str | os.PathLike) -> dict[str, Any] | None:
    """The rank index a checkpoint was saved with: ``{"world_size": W, "ranks": {rank:
    entry}}`` (each entry as that rank passed it to :meth:`CheckpointManager.save`).

    None for a checkpoint without one (saved before the index existed, or rewritten by a tool
    that does not write it) or whose index does not match its ``rank_*.pt`` files: the caller
    then reads every rank file.
    """
    path = Path(path)
    try:
        raw = json.loads((path / RANK_INDEX).read_text(encoding="utf-8"))
        index = {
            "world_size": int(raw["world_size"]),
            "ranks": {int(rank): entry for rank, entry in raw["ranks"].items()},
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    on_disk = sorted(int(f.stem.split("_")[1]) for f in path.glob("rank_*.pt"))
    if sorted(index["ranks"]) != list(range(index["world_size"])) or on_disk != sorted(
        index["ranks"]
    ):
        return None
    return index


def rank_zero_result(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` computed on rank 0 only and handed to every rank (collective when a
    process group is up): e.g. :func:`latest_loadable`, which reads every rank file of its
    candidates, so that the run reads them once rather than once per rank.

    Raises:
        ValueError: the one ``fn`` raised on rank 0, raised on every rank.
    """
    found: list[Any] = [None, None]
    if _rank() == 0:
        try:
            found = [fn(*args), None]
        except ValueError as err:
            found = [None, str(err)]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    result, error = found
    if error is not None:
        raise ValueError(error)
    return result


def read_rank_states(
    path: str | os.PathLike, *, ranks: list[int] | None = None
) -> dict[int, dict[str, Any]]:
    """The saved ``rank_<r>.pt`` states of checkpoint ``path`` by rank (``weights_only``).

    Args:
        ranks: the saved ranks to read (those whose file exists); None: every one.
    """
    path = Path(path)
    if ranks is None:
        files = sorted(path.glob("rank_*.pt"))
    else:
        files = [path / f"rank_{r}.pt" for r in sorted(set(ranks))]
    rank_states = {}
    for file in files:
        if file.is_file():
            rank = int(file.stem.split("_")[1])
            rank_states[rank] = torch.load(file, map_location="cpu", weights_only=True)
    return rank_states


def _fully_written(directory: Path) -> bool:
    """``.metadata``, the rank index and every indexed rank's done-marker exist."""
    if not (directory / ".metadata").is_file():
        return False
    index = read_rank_index(directory)
    if index is None:
        return False
    return all((directory / f"rank_{r}.done").is_file() for r in range(index["world_size"]))


def _promote(partial: Path, final: Path) -> bool:
    """Rename a fully written ``partial`` to ``final`` unless ``final`` exists (a re-save of a
    step is left to the main thread). Any rank may call it: of concurrent callers one rename
    wins and the others find ``partial`` gone."""
    if final.exists() or not _fully_written(partial):
        return False
    try:
        os.rename(partial, final)
    except OSError:  # another rank's callback renamed it first
        return False
    return True


class CheckpointManager:
    """Saves and loads the run's checkpoints; every rank calls every method.

    Args:
        run_dir: the run directory; checkpoints live in ``<run_dir>/checkpoints``.
        keep: complete checkpoints kept (older ones are deleted after a successful save).
        async_save: write DCP shards in the background (on a gloo process group of the
            manager's own, so that the training loop's collectives never interleave with it).
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int, async_save: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep ({keep}) must be >= 1")
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.async_save = async_save
        self._group = (
            dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        )
        self._pending: tuple[int, Path, Future, threading.Event] | None = None
        self._callback_error: BaseException | None = None

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        rank_state: dict[str, Any],
        config_yaml: str | None = None,
        index_entry: dict[str, Any] | None = None,
        write_extra: Callable[[Path], None] | None = None,
    ) -> None:
        """Save ``state`` (collective) and this rank's ``rank_state`` as checkpoint ``step``,
        with the resolved run config beside it.

        Args:
            rank_state: this rank's ``rank_<r>.pt`` (loadable with ``weights_only``).
            index_entry: a small JSON-serializable description of this rank's state (e.g. its
                dp coordinate); rank 0 writes every rank's entry to ``rank_index.json`` so that
                a resume can choose which rank files to read.
            write_extra: a collective writing more into the checkpoint directory (given its
                path) before the DCP save (DeepSpeed's own engine checkpoint); synchronous
                saves only.
        """
        if write_extra is not None and self.async_save:
            raise ValueError("write_extra needs a synchronous save (checkpoint.async_save false)")
        self.wait()
        partial = self.root / f".step_{step}.partial"
        entry = dict(index_entry or {})
        if dist.is_initialized():
            entries: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(entries, entry)
        else:
            entries = [entry]
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by a killed run: never loaded, safe to drop
            partial.mkdir()
            if config_yaml is not None:
                (partial / "config.yaml").write_text(config_yaml, encoding="utf-8")
            index = {"world_size": len(entries), "ranks": dict(enumerate(entries))}
            tmp = partial / f".{RANK_INDEX}.tmp"
            tmp.write_text(json.dumps(index, sort_keys=True), encoding="utf-8")
            os.replace(tmp, partial / RANK_INDEX)
        _barrier()
        _write_rank_state(partial, rank_state)
        if write_extra is not None:
            write_extra(partial)
        if self.async_save:
            done = threading.Event()
            future = dcp.async_save(
                {"train": state}, checkpoint_id=str(partial), process_group=self._group
            )
            final = self.root / f"step_{step}"
            rank = _rank()
            future.add_done_callback(
                lambda fut: self._on_written(fut, partial, final, rank=rank, done=done)
            )
            self._pending = (step, partial, future, done)
        else:
            dcp.save({"train": state}, checkpoint_id=str(partial))
            _mark_written(partial, _rank())
            self._finish(step, partial)

    def _on_written(
        self, future: Future, partial: Path, final: Path, *, rank: int, done: threading.Event
    ) -> None:
        """Runs in DCP's writer thread once this rank's write ends: mark it, and complete the
        checkpoint when every rank has. File operations only: collectives from this thread
        would interleave with the main thread's."""
        try:
            if future.exception() is None:
                _mark_written(partial, rank)
                _promote(partial, final)
        except BaseException as err:  # raised to the main thread by wait()
            self._callback_error = err
        finally:
            done.set()

    def wait(self) -> None:
        """Finish a background save, if one is running (collective): wait for it, then prune.

        Raises:
            What the background write or its completion raised on this rank.
        """
        if self._pending is None:
            return
        step, partial, future, done = self._pending
        self._pending = None
        future.result()
        done.wait()
        if self._callback_error is not None:
            err, self._callback_error = self._callback_error, None
            raise err
        self._finish(step, partial)

    def _finish(self, step: int, partial: Path) -> None:
        _barrier()
        if _rank() == 0:
            final = self.root / f"step_{step}"
            if not partial.exists():
                pass  # completed by the writer callback of an async save
            elif final.exists():
                stale = self.root / f".step_{step}.replaced"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(partial, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(partial, final)
            for _, old in complete_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def recover(self) -> list[int]:
        """Complete every partial checkpoint that is fully written (``.metadata``, rank index
        and every rank's done-marker: a run killed between an async write's end and its
        rename) unless a complete one of that step exists (collective; rank 0 renames).

        Returns:
            The steps completed, oldest first.
        """
        recovered = []
        if _rank() == 0 and self.root.is_dir():
            for child in sorted(self.root.iterdir()):
                match = _PARTIAL_RE.match(child.name)
                if match and child.is_dir():
                    if _promote(child, self.root / f"step_{match.group(1)}"):
                        recovered.append(int(match.group(1)))
        _barrier()
        return sorted(recovered)

    def load(
        self,
        path: str | os.PathLike,
        state: TrainState,
        *,
        ranks: list[int] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Load checkpoint ``path`` into ``state`` (collective, resharding as DCP allows).

        Args:
            ranks: as :func:`read_rank_states` (``[]``: none; a resume reads what it needs
                with ``pretrain.data.read_resume_rank_states``).

        Returns:
            The saved states of ``ranks`` by rank.

        Raises:
            ValueError: ``path`` is not a complete checkpoint.
        """
        path = Path(path)
        if not (path / ".metadata").is_file():
            raise ValueError(f"checkpoint {str(path)!r} is incomplete or not a DCP checkpoint")
        dcp.load({"train": state}, checkpoint_id=str(path))
        return read_rank_states(path, ranks=ranks)

    def close(self) -> None:
        """Finish any background save."""
        self.wait()


# What fixes a model's parameters and their meaning: the model fields marked as architecture in
# their metadata. Other model keys (dropout, init, masking) may change between a checkpoint and
# the run that resumes it.
_ARCHITECTURE_KEYS = architecture_keys()


def _architecture(model: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys of a ``model`` section, defaults resolved (None head_dim etc.)."""
    flat = _flatten(model, "model")
    # a key missing from an older checkpoint's config.yaml takes the default it was built with
    arch = {key: flat.get(f"model.{key}", _DEFAULTS[f"model.{key}"]) for key in _ARCHITECTURE_KEYS}
    if arch["num_kv_heads"] is None:
        arch["num_kv_heads"] = arch["num_heads"]
    if arch["head_dim"] is None and arch["hidden_size"] and arch["num_heads"]:
        arch["head_dim"] = arch["hidden_size"] // arch["num_heads"]
    if not arch["moe.num_experts"]:
        for key in (
            "moe.top_k", "moe.router", "moe.every", "moe.offset", "moe.expert_ffn_hidden_size"
        ):  # fmt: skip
            arch[key] = None  # meaningless for a dense model
    elif arch["moe.expert_ffn_hidden_size"] is None:
        arch["moe.expert_ffn_hidden_size"] = arch["ffn_hidden_size"]
    return arch


def check_compatible(path: str | os.PathLike, model_cfg: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint saved for another model architecture.

    Args:
        path: a complete checkpoint directory.
        model_cfg: this run's ``model`` section as a plain dict.

    Raises:
        ValueError: one line naming the first architecture key (``model.*``) that differs.
    """
    config_path = Path(path) / "config.yaml"
    if not config_path.is_file():
        return  # saved without a config: DCP's own key and shape checks still apply
    saved = (yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}).get("model", {})
    ours, theirs = _architecture(model_cfg), _architecture(saved)
    for key in _ARCHITECTURE_KEYS:
        if theirs[key] != ours[key]:
            raise ValueError(
                f"checkpoint {str(path)!r} holds model.{key}={theirs[key]!r} but this run has "
                f"model.{key}={ours[key]!r}; a different model cannot resume it"
            )


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat


_DEFAULTS = _flatten(dataclasses.asdict(ModelConfig()), "model")
"""Every ``model`` key's default (what a key missing from an older checkpoint was built with)."""


def _write_rank_state(directory: Path, rank_state: dict[str, Any]) -> None:
    final = directory / f"rank_{_rank()}.pt"
    tmp = directory / f".rank_{_rank()}.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, final)


def _mark_written(directory: Path, rank: int) -> None:
    """This rank's done-marker: its DCP write has finished."""
    (directory / f"rank_{rank}.done").touch()


class CheckpointPolicy:
    """When the training loop saves: every ``checkpoint.every`` steps while the loss is finite
    (a periodic save inside a run of NaN/Inf losses waits for a good step, so the last
    checkpoint is one taken after a good step), and when the run ends (its last step,
    ``train.stop_at``, a stop signal) unless that step is saved already. A save at the end is
    attempted even after a non-finite loss: the trainer refuses it and stops with exit 3.

    Args:
        every: ``checkpoint.every`` (0: only at the end).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.saved_step: int | None = None

    def periodic(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0)

    def due(self, step: int, *, ending: bool) -> bool:
        """Whether ``step`` may save (the loop reads the step's loss first)."""
        return self.periodic(step) or ending

    def should_save(self, step: int, *, ending: bool, finite: bool) -> bool:
        """Whether to save ``step``: ``ending`` when the run stops after it, ``finite`` when
        the recent losses were finite."""
        if self.saved_step == step:
            return False
        return (self.periodic(step) and finite) or ending

    def saved(self, step: int) -> None:
        """Record that ``step`` is on disk (or is the step a run resumed from)."""
        self.saved_step = step
