"""Stop cleanly on SLURM preemption (SIGTERM / SIGUSR1) and on runs of non-finite losses.

What to call: ``PreemptionHandler().install()`` (main thread only; ``uninstall()`` restores the
previous handlers), then ``should_stop(device=d)`` once per step on every rank: a collective
(one MAX all-reduce) when a process group is up, so all ranks get the same answer;
``request_stop(signum)`` does what the signal would. ``NonFiniteGuard(max_consecutive=k)``:
``check(loss)`` with the globally reduced loss is True when the step's update may be applied,
``diverged()`` True after k non-finite steps in a row, ``message(step)`` the line printed then.
Exit codes: :data:`EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL) after a stop signal,
:data:`EXIT_DIVERGED` (3) on divergence (the last good checkpoint is intact).

On a signal the handler only sets a flag; the trainer finishes the step in flight, agrees with
every rank that a stop was asked for (one all-reduce), saves a checkpoint and exits with
:data:`EXIT_PREEMPTED`, which the SLURM batch script takes as "requeue me".
"""

from __future__ import annotations

import math
import signal
from types import FrameType

import torch
import torch.distributed as dist

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry".
EXIT_PREEMPTED = 75
# The run stopped on too many non-finite losses in a row (the last good checkpoint is intact).
EXIT_DIVERGED = 3

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag the training loop polls between steps."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only); returns self."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def request_stop(self, signum: int = signal.SIGUSR1) -> None:
        """Act as if ``signum`` had arrived (what the signal handler does): the run checkpoints
        and stops at the end of the current step."""
        self.received = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(signum)

    def should_stop(self, *, device: torch.device | str = "cpu") -> bool:
        """Whether any rank received a stop signal (a collective when distributed)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


class NonFiniteGuard:
    """Counts steps whose loss was NaN/Inf; the update of such a step is skipped.

    Args:
        max_consecutive: stop the run after this many non-finite steps in a row.
    """

    def __init__(self, *, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"train.max_nonfinite_steps ({max_consecutive}) must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def check(self, loss: float) -> bool:
        """Record one step's (globally reduced) loss; True when the update may be applied."""
        if math.isfinite(loss):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        return False

    @property
    def diverged(self) -> bool:
        """Whether the run should stop."""
        return self.consecutive >= self.max_consecutive

    def message(self, step: int) -> str:
        """The one line printed when the run stops."""
        return (
            f"loss was NaN/Inf for {self.consecutive} steps in a row (up to step {step}); "
            "stopping with the last good checkpoint intact"
        )
