"""Run a function in N gloo processes: the harness of every distributed test.

What to call: ``run_distributed(fn, world_size=N, args=(...), timeout_s=300.0)`` -> the ranks'
return values, indexed by rank; it raises :class:`DistributedTestError` when a rank raised (its
traceback in the message), exited without a result, or the run outlasted ``timeout_s``.
``fn`` need not be picklable (fork hands it over); its return value must be.
``find_free_port()`` gives a localhost port nothing listens on right now.

``run_distributed`` forks N processes, each joins a gloo process group on a free localhost port
and calls ``fn(rank, world_size, *args)``. Each rank's return value (or its traceback) is
written to a file; the parent judges every rank by what it wrote, not by its exit code, because
a gloo FSDP2 process can abort at interpreter exit after its work is done. A rank that raises
fails the call with that rank's traceback; the other ranks are then stopped (killed after a few
seconds' grace), since they would wait forever in their next collective.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# How long ranks still running get after one rank has failed before they are killed.
_FAILURE_GRACE_S = 3.0


class DistributedTestError(RuntimeError):
    """A rank raised, died without a result, or the run timed out."""


def find_free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    result_dir: str,
    args: Sequence[Any],
    timeout_s: float,
) -> None:
    # A forked child must not share the parent's threads: one intra-op thread per rank.
    torch.set_num_threads(1)
    result_path = Path(result_dir) / f"rank_{rank}.pkl"
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=(rank == 0))
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        payload = ("ok", value, time.time())
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        payload = ("error", traceback.format_exc(), time.time())
    tmp = result_path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as handle:
            pickle.dump(payload, handle)
    except Exception:  # noqa: BLE001 - an unpicklable result is itself a failure to report
        with open(tmp, "wb") as handle:
            pickle.dump(("error", traceback.format_exc(), time.time()), handle)
    os.replace(tmp, result_path)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        # Skip interpreter teardown: the result is on disk, and teardown is where gloo/FSDP2
        # processes have been seen to abort.
        os._exit(0)


def _read_result(path: Path) -> tuple[str, Any, float] | None:
    if not path.exists():
        return None
    with open(path, "rb") as handle:
        return pickle.load(handle)


def run_distributed(
    fn: Callable[..., Any],
    *,
    world_size: int,
    args: Sequence[Any] = (),
    timeout_s: float = 300.0,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` forked gloo processes.

    ``fn`` need not be picklable (fork hands it over in memory); its return value must be.

    Returns:
        The return values, indexed by rank.

    A run whose first failure is a ``DistNetworkError`` (gloo's localhost rendezvous dropping
    a connection) is run once more on a fresh port.

    Raises:
        DistributedTestError: a rank raised (its traceback is in the message), a rank exited
            without writing a result, or the run took longer than ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    try:
        return _run_once(fn, world_size=world_size, args=args, timeout_s=timeout_s)
    except DistributedTestError as err:
        # gloo's rendezvous over localhost TCP has been seen to drop a connection ("Connection
        # reset by peer" while a process group is made) once in some thousand runs: one more
        # try on a fresh port; any other failure is the test's.
        if "DistNetworkError" not in str(err):
            raise
        return _run_once(fn, world_size=world_size, args=args, timeout_s=timeout_s)


def _run_once(
    fn: Callable[..., Any], *, world_size: int, args: Sequence[Any], timeout_s: float
) -> list[Any]:
    ctx = mp.get_context("fork")
    result_dir = tempfile.mkdtemp(prefix="rosetta_dist_")
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, result_dir, tuple(args), timeout_s),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        results = _collect(procs, Path(result_dir), timeout_s=timeout_s)
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=5)
        shutil.rmtree(result_dir, ignore_errors=True)
    return results


def _collect(procs: list, result_dir: Path, *, timeout_s: float) -> list[Any]:
    world_size = len(procs)
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    results: dict[int, tuple[str, Any, float]] = {}
    while True:
        for rank, proc in enumerate(procs):
            if rank in results:
                continue
            result = _read_result(result_dir / f"rank_{rank}.pkl")
            if result is None and not proc.is_alive():
                # It may have written its result just before exiting.
                result = _read_result(result_dir / f"rank_{rank}.pkl")
                if result is None:
                    result = (
                        "error",
                        f"exited with code {proc.exitcode} without a result",
                        time.time(),
                    )
            if result is not None:
                results[rank] = result
                if result[0] == "error" and failed_at is None:
                    failed_at = time.monotonic()
        if len(results) == world_size:
            break
        now = time.monotonic()
        if failed_at is not None and now - failed_at > _FAILURE_GRACE_S:
            break
        if now > deadline:
            missing = [r for r in range(world_size) if r not in results]
            raise DistributedTestError(
                f"timed out after {timeout_s:.0f} s; ranks {missing} did not finish"
            )
        time.sleep(0.02)
    # The rank that failed first is the cause; the others usually fail because it left.
    errors = sorted(
        (results[rank][2], rank, results[rank][1])
        for rank in results
        if results[rank][0] == "error"
    )
    errors = [(rank, message) for _, rank, message in errors]
    if errors:
        rank, message = errors[0]
        others = [r for r, _ in errors[1:]]
        extra = f" (ranks {others} failed too)" if others else ""
        raise DistributedTestError(f"rank {rank} failed{extra}:\n{message}")
    return [results[rank][1] for rank in range(world_size)]
