"""sbatch helpers shared by the launchers: Slurm time limits and submission (no torch import)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

# Slurm --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
)
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm ``--time`` value (``90``, ``1:30:00``, ``2-00:00:00``, ...).

    Raises:
        ValueError: not one of Slurm's forms, or zero.
    """
    for pattern, units in _TIME_FORMS:
        match = pattern.match(value.strip())
        if match:
            seconds = sum(int(num) * _UNIT_S[unit] for num, unit in zip(match.groups(), units))
            if seconds <= 0:
                raise ValueError(f"--time ({value!r}) must be > 0")
            return seconds
    raise ValueError(
        f"--time ({value!r}) must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
    )


def submit(script: Path, *, sbatch: str = "sbatch") -> str:
    """Submit ``script`` with sbatch; returns the job id.

    Raises:
        ValueError: sbatch is missing or refused the job (its first error line).
    """
    if shutil.which(sbatch) is None:
        raise ValueError(f"sbatch ({sbatch!r}) not found on PATH: submit on a Slurm login node")
    done = subprocess.run(
        [sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise ValueError(f"sbatch {script} failed: {lines[0]}")
    return done.stdout.strip().split(";")[0]
