"""Peak memory of one CLI command, measured inside the process that runs it (Linux only).

What to call::

    python -m checkpoints_tools.memwatch REPORT.json [--warmup] -- export-hf CKPT --out DIR ...

or ``measure(argv, warmup=False)`` -> the report dict (it runs ``checkpoints_tools.cli.main(argv)``
in this process and raises ``SystemExit`` with the command's exit code when the command fails,
so a broken export is never reported as a memory figure); ``PeakSampler`` is the context manager
behind it, ``read_status()`` / ``reset_peak()`` the ``/proc/self`` readers.

Why inside the process: a parent's ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is not the child's
own peak. On ``execve`` Linux folds the RSS high-water mark of the pre-exec image (the parent's
address space, copied by fork or shared by vfork/posix_spawn) into the child's ``maxrss``, so a
parent that held a 4 GB model reports 4+ GB for a child that never allocated it (the first export
measurement read 8.5 GiB this way, the export itself peaked at 0.83 GiB: BENCHMARKS.md,
"Checkpoint export").

What is reported (GiB): ``peak_rss`` is the kernel's exact high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` when the command starts); ``peak_anon`` / ``peak_file`` are
sampled every few milliseconds from ``RssAnon`` / ``RssFile``: anonymous memory is what the
export really holds, file-backed pages (mapped libraries) are shared and reclaimable. ``start_*``
are the same figures just before the command, so growth = peak - start. With ``--warmup`` the
command runs once unmeasured first (to a sibling ``--out``), so lazy imports (transformers,
tokenizers) and allocator pools are in ``start_*`` and the growth is the tensors' alone.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_FIELDS = re.compile(r"(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB")
GIB = 2**30


def read_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process, in bytes."""
    with open("/proc/self/status") as status:
        return {m[1]: int(m[2]) * 1024 for m in map(_FIELDS.match, status) if m}


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel refuses (then VmHWM is the
    process's peak since exec, still an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


class PeakSampler:
    """Context manager: peak ``RssAnon`` / ``RssFile`` sampled on a thread, exact ``VmHWM``.

    Attributes (bytes, set on exit): ``start`` (status on entry), ``peak_anon``, ``peak_file``,
    ``peak_rss``; ``exact_peak`` tells whether ``VmHWM`` could be reset on entry.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self.peak_anon = self.peak_file = self.peak_rss = 0

    def _sample(self) -> None:
        # A thread rather than signals: a tensor of any size worth bounding lives for far longer
        # than a few milliseconds, and VmHWM catches the total exactly whatever the sampling.
        while not self._stop.is_set():
            now = read_status()
            self.peak_anon = max(self.peak_anon, now["RssAnon"])
            self.peak_file = max(self.peak_file, now["RssFile"])
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self.exact_peak = reset_peak()
        self.start = read_status()
        self.peak_anon, self.peak_file = self.start["RssAnon"], self.start["RssFile"]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = read_status()
        self.peak_anon = max(self.peak_anon, end["RssAnon"])
        self.peak_file = max(self.peak_file, end["RssFile"])
        self.peak_rss = end["VmHWM"]

    def report(self) -> dict[str, Any]:
        """The figures in GiB (rounded to MiB) plus ``exact_peak``."""

        def gib(x: int) -> float:
            return round(x / GIB, 4)

        return {
            "peak_rss_gib": gib(self.peak_rss),
            "peak_anon_gib": gib(self.peak_anon),
            "peak_file_gib": gib(self.peak_file),
            "start_rss_gib": gib(self.start["VmRSS"]),
            "start_anon_gib": gib(self.start["RssAnon"]),
            "start_file_gib": gib(self.start["RssFile"]),
            "exact_peak": self.exact_peak,
        }


def _warmup_argv(argv: list[str]) -> tuple[list[str], Path | None]:
    """``argv`` with its ``--out`` redirected to a sibling ``.warmup`` path (removed after)."""
    if "--out" not in argv:
        return argv, None
    i = argv.index("--out") + 1
    other = Path(argv[i] + ".warmup")
    return [*argv[:i], str(other), *argv[i + 1 :]], other


def measure(argv: Sequence[str], *, warmup: bool = False) -> dict[str, Any]:
    """Run ``checkpoints_tools.cli.main(argv)`` here and report its memory (see module doc).

    Raises:
        SystemExit: the command failed (its exit code), so a broken export is not reported as a
            memory figure.
    """
    from checkpoints_tools.cli import main as cli_main

    argv = list(argv)
    if warmup:
        warm_argv, warm_out = _warmup_argv(argv)
        code = cli_main(warm_argv)
        if warm_out is not None:
            shutil.rmtree(warm_out, ignore_errors=True)
        if code:
            raise SystemExit(code)
    start = time.perf_counter()
    with PeakSampler() as sampler:
        code = cli_main(argv)
    if code:
        raise SystemExit(code)
    return {**sampler.report(), "seconds": round(time.perf_counter() - start, 2)}


def main(args: Sequence[str] | None = None) -> None:
    """``REPORT.json [--warmup] -- CLI ARGS...``: measure and write the report as JSON."""
    args = list(sys.argv[1:] if args is None else args)
    if "--" not in args or not args or args[0] == "--":
        raise SystemExit("usage: python -m checkpoints_tools.memwatch REPORT [--warmup] -- ARGS")
    split = args.index("--")
    report_path, flags, argv = Path(args[0]), args[1:split], args[split + 1 :]
    report = measure(argv, warmup="--warmup" in flags)
    report_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
