"""Run logging: one console line per log step on rank 0, JSONL, TensorBoard, per-rank log files.

What to call: ``RunLogger(run_dir, rank=r, cfg=cfg.logging, total_steps=n, start_step=s)`` on
every rank; ``log(metrics, step)`` once per log step (nested dicts allowed: per-language,
per-expert), ``advance(step)`` every step (moves the progress bar; cheap), ``info(message)`` for a
free-form line, ``close()`` at the end (flushes and closes every backend). No collectives: each
rank writes only its own files, and rank 0 alone prints and writes JSONL / TensorBoard.
``format_step_line`` and ``flatten_metrics`` are the pure formatting pieces, for tests.

Every backend sits behind :meth:`RunLogger.log` (``log(metrics, step)``):

- rank 0 prints one line per log step (step, loss, lr, grad norm, tokens/s, MFU, memory, ETA),
  with a rich progress bar on a terminal;
- rank 0 appends ``{"step": N, ...}`` to ``<run_dir>/metrics.jsonl`` (flushed per line, so a
  killed run keeps every line it logged) and writes TensorBoard events to ``<run_dir>/tb`` when
  tensorboard is installed;
- every rank writes its own lines to ``<run_dir>/logs/rank_<r>.log``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pretrain.config import LoggingConfig


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"loss": {"en": 2.0}}`` -> ``{"loss/en": 2.0}``; non-numeric leaves are dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)):
            flat[name] = value
        elif hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
            flat[name] = float(value.item())
    return flat


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def format_duration(seconds: float) -> str:
    """``3725.0`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_step_line(
    metrics: Mapping[str, Any], step: int, *, total_steps: int, eta_s: float | None
) -> str:
    """The console line of one log step; fields that are absent are left out."""
    parts = [f"step {step}/{total_steps}"]
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):.4f}")
    if "lr" in metrics:
        parts.append(f"lr {float(metrics['lr']):.2e}")
    if "grad_norm" in metrics:
        parts.append(f"gnorm {float(metrics['grad_norm']):.3f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * float(metrics['mfu']):.1f}%")
    if "memory_gib" in metrics:
        parts.append(f"mem {float(metrics['memory_gib']):.2f} GiB")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class RunLogger:
    """Logs a run's metrics to the console, JSONL, TensorBoard and per-rank files.

    Args:
        run_dir: the run directory (created if missing).
        rank: this process's global rank; only rank 0 prints and writes JSONL/TensorBoard.
        cfg: the ``logging`` section.
        total_steps: steps of the whole run (for the progress bar and ETA).
        start_step: the step a resumed run starts from (ETA counts from here).
        console: a rich console to print to (tests pass one that records).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        console: Console | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.cfg = cfg
        self.total_steps = total_steps
        self._start_step = start_step
        self._start_time = time.monotonic()
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)

        self._file_logger = logging.getLogger(f"rosetta.run.{id(self)}.rank{rank}")
        self._file_logger.propagate = False
        self._file_logger.setLevel(logging.INFO)
        self._file_handler = logging.FileHandler(
            self.run_dir / "logs" / f"rank_{rank}.log", encoding="utf-8"
        )
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self._file_logger.addHandler(self._file_handler)

        self.console = console if console is not None else Console(stderr=False)
        self._jsonl = None
        self._tb = None
        self._progress: Progress | None = None
        self._task = None
        if rank == 0:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if cfg.tensorboard:
                self._tb = _tensorboard_writer(self.run_dir / "tb")
            if cfg.progress and self.console.is_terminal:
                self._progress = Progress(
                    TextColumn("[bold]train"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=True,
                )
                self._task = self._progress.add_task("train", total=total_steps)
                self._progress.update(self._task, completed=start_step)
                self._progress.start()

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    def eta_seconds(self, step: int) -> float | None:
        """Remaining time from the mean step time since the logger started."""
        done = step - self._start_step
        if done <= 0:
            return None
        per_step = (time.monotonic() - self._start_time) / done
        return per_step * max(0, self.total_steps - step)

    def info(self, message: str) -> None:
        """A free-form line: this rank's log file, and the console on rank 0."""
        self._file_logger.info(message)
        if self.rank == 0:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (call every step; cheap)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record one log step's metrics (nested dicts allowed: per-language, per-expert)."""
        line = format_step_line(
            metrics, step, total_steps=self.total_steps, eta_s=self.eta_seconds(step)
        )
        self._file_logger.info(line)
        if self.rank != 0:
            return
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.advance(step)
        record = {"step": step, **_jsonable(dict(metrics))}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in flatten_metrics(metrics).items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every backend."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._file_logger.removeHandler(self._file_handler)
        self._file_handler.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_writer(path: Path) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError):
        return None
    return SummaryWriter(log_dir=str(path))
