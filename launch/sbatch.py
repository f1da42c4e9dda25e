"""sbatch helpers shared by the launchers: Slurm time limits and submission (no torch import).

What to call: ``time_limit_seconds(value)`` -> seconds of a Slurm ``--time`` value (``90``,
``1:30:00``, ``2-00:00:00``; ``ValueError`` for another form, a field out of range, or zero);
``sbatch_value(value)`` -> one ``#SBATCH --option=<value>`` argument, quoted only when needed
(``ValueError`` for a line break); ``output_pattern_literal(text)`` -> ``text`` as a literal
part of an ``--output`` pattern (``%`` doubled); ``submit(script, sbatch="sbatch")`` -> the job
id (``ValueError`` with sbatch's first error line when sbatch is missing or refuses the job).
"""

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
_FORMS_TEXT = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# A field after the first is bounded by the next larger unit (the first may be any size).
_UNIT_MAX = {"h": 24, "m": 60, "s": 60}
_UNIT_NAME = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def time_limit_seconds(value: str) -> int:
    """Seconds in a Slurm ``--time`` value (``90``, ``1:30:00``, ``2-00:00:00``, ...).

    The first field may be any size (``90`` minutes, ``36:00:00``); the fields after it must
    be below the next larger unit: seconds and minutes < 60, hours < 24 after days. Slurm
    itself would read ``99:99`` as 100 minutes 39 seconds; a field out of range is a typo.

    Raises:
        ValueError: not one of Slurm's forms, a field out of range, or zero.
    """
    for pattern, units in _TIME_FORMS:
        match = pattern.match(value.strip())
        if match:
            fields = [int(num) for num in match.groups()]
            for num, unit in list(zip(fields, units))[1:]:
                if num >= _UNIT_MAX[unit]:
                    raise ValueError(
                        f"--time ({value!r}): {_UNIT_NAME[unit]} ({num}) must be < "
                        f"{_UNIT_MAX[unit]} (forms: {_FORMS_TEXT})"
                    )
            seconds = sum(num * _UNIT_S[unit] for num, unit in zip(fields, units))
            if seconds <= 0:
                raise ValueError(f"--time ({value!r}) must be > 0")
            return seconds
    raise ValueError(f"--time ({value!r}) must be {_FORMS_TEXT}")


# What an #SBATCH line may hold unquoted. sbatch splits the rest of the line shell-like
# (src/sbatch/opt.c, _get_argument): whitespace ends an argument unless quoted, an unescaped
# "#" starts a comment, ' and " quote, and a backslash escapes the next character (inside
# quotes too). Releases before 17.x knew only double quotes and ended the line at any "#".
_SBATCH_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def sbatch_value(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH --option=<value>`` line: as it is when it
    needs no quoting, else in double quotes with ``\\``, ``"`` and ``#`` escaped (read back
    unchanged by every sbatch release).

    Raises:
        ValueError: ``value`` holds a line break (an #SBATCH line cannot).
    """
    if "\n" in value or "\r" in value:
        raise ValueError(f"{value!r} holds a line break: not allowed in an #SBATCH line")
    if _SBATCH_PLAIN.match(value):
        return value
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def output_pattern_literal(text: str) -> str:
    """``text`` as a literal part of an sbatch ``--output`` filename pattern (``%`` doubled;
    ``%j`` and friends are replacement symbols there)."""
    return text.replace("%", "%%")


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
