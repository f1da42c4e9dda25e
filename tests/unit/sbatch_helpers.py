"""Helpers of the launch tests: a test copy of sbatch's ``#SBATCH`` line parser
(``sbatch_split``) and a small :class:`launch.slurm.SlurmJob` (``slurm_job``)."""

from __future__ import annotations

from pathlib import Path

from launch.slurm import SlurmJob


def slurm_job(tmp_path: Path, **changes) -> SlurmJob:
    """A 2-node x 4-GPU job under ``tmp_path/run``, with ``changes`` to its fields."""
    fields = dict(
        nodes=2,
        procs_per_node=4,
        gpus=True,
        run_dir=tmp_path / "run",
        python="/opt/venv/bin/python",
        workdir=Path("/repo"),
    )
    fields.update(changes)
    return SlurmJob(**fields)


def sbatch_split(line: str, *, legacy: bool = False) -> list[str]:
    """The arguments sbatch reads from the text after ``#SBATCH`` (src/sbatch/opt.c,
    ``_get_argument``): whitespace separates unless quoted, an unescaped ``#`` ends the line,
    a backslash escapes the next character (inside quotes too). ``legacy``: releases before
    17.x, where only double quotes quote and any unescaped ``#`` ends the line."""
    args: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return args
        arg, quote, escape, comment = [], "", False, False
        while i < n and (quote or not line[i].isspace()):
            c = line[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif c == "#" and (legacy or not quote):
                comment = True
                break
            elif quote and c == quote:
                quote = ""
                continue
            elif not quote and (c == '"' or (c == "'" and not legacy)):
                quote = c
                continue
            arg.append(c)
        assert not quote, f"unmatched quote in {line!r}"
        if arg:
            args.append("".join(arg))
        if comment:
            return args
