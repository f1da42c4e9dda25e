"""Data preprocessing (tokenizer training, sharding, back-translation) as Slurm array jobs, or
locally.

What to call: the commands below (``main(argv)`` returns the exit code), or the tested pieces:
``make_plan(command, inputs=..., parallel=..., out=..., num_tasks=n)`` (JSON data: every task's
data command and the merge; ``ValueError`` / ``FileNotFoundError`` for bad inputs),
``deal_groups(groups, num_tasks=n)`` (deterministic: largest first, ties by name),
``run_task(plan, index)`` / ``run_merge(plan)`` (the data command's exit code) and
``render_array_sbatch`` / ``render_merge_sbatch``. Exit codes: 0 done; 2 bad arguments or inputs
(one line on stderr); otherwise the data command's. Guarantee: ``--out`` ends as one shard
directory with one ``manifest.json``, whatever ``--array`` is, and a language is never split
across tasks.

    python -m launch.preprocess shard --tokenizer TOK --input en=data/en/*.txt --input de=... \
        --out shards --array 4 [--workers 8] [--partition P] [--time T] [--after JOBID] \
        (--submit | --local | --dry-run) [more data_pipeline shard options]
    python -m launch.preprocess train-tokenizer --input ... --vocab-size 32000 --out TOK \
        (--submit | --local | --dry-run) [more data_pipeline train-tokenizer options]
    python -m launch.preprocess backtranslate --translator apertium:spa-eng --tokenizer TOK \
        --input es=mono/es.txt --to en --out bt --array 4 (--submit | --local | --dry-run) \
        [more data_pipeline backtranslate options]

Back-translation deals chunks, not languages: every task runs the same ``data_pipeline
backtranslate`` command into the same ``--out`` with ``--part i/N`` and the merge step runs it
with ``--finalize`` (translates nothing; writes the manifest once every chunk is finished, or
fails naming the missing ones), so that ``--out`` is one shard directory whatever ``--array`` is.

The inputs are expanded with data_pipeline's own parsers and grouped by language (monolingual)
or language pair (parallel); the groups are dealt to the ``--array`` tasks, largest first, each
to the task with the fewest bytes so far. A language is never split across tasks, so the tasks'
shard names never collide. Each task runs ``python -m data_pipeline <command>`` on its groups;
with ``--array 1`` it writes to ``--out`` itself, with N > 1 task i writes ``<out>/part_<i>``
and a final step, ``python -m data_pipeline merge <out>/part_0 ... --out <out>``, writes one
``<out>/manifest.json`` over all parts (shards stay in the parts), so that ``--out`` is a shard
directory the trainer reads whatever ``--array`` was.

The plan (``<out>.jobs/<command>.plan.json``) lists every task's exact command and the merge.
An array task runs ``python -m launch.preprocess run-task PLAN`` and picks its task from
``SLURM_ARRAY_TASK_ID`` (through ``launch.env``); the merge is a second job,
``python -m launch.preprocess run-merge PLAN``, held until every array task succeeded
(``afterok`` on the array job). ``--local`` runs ``run-task PLAN --task i`` for every i, then
``run-merge PLAN``, in this process, one after the other: the same commands either way.
``--submit`` prints the id of the job that finishes the output (the merge job, else the array
job) on stdout, for the next stage's ``--after``; with a merge, the line ``array job A, merge job
M`` goes to stderr. Tokenizer training is one task (``--array 1``); ``--after JOBID`` starts the
job when that job succeeded, and Slurm cancels it when that job failed. Its ``--parallel``
pairs go to tokenizer training too: both sides count as text of their languages, so a language
seen only in pairs gets its place in the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.text_inputs import MonoInput, PairInput, parse_mono_specs, parse_pair_specs
from launch.env import read_array_task
from launch.sbatch import output_pattern_literal, sbatch_value, submit, time_limit_seconds

EXIT_BAD_INPUT = 2
COMMANDS = ("shard", "train-tokenizer")
BACKTRANSLATE = "backtranslate"
PLAN_VERSION = 2


@dataclass(frozen=True)
class _Group:
    """One language's or language pair's arguments, and its input size for balancing."""

    name: str
    args: tuple[str, ...]
    num_bytes: int


def _size(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def _groups(mono: Sequence[MonoInput], pairs: Sequence[PairInput]) -> list[_Group]:
    groups = [
        _Group(m.lang, tuple(f"--input={m.lang}={p}" for p in m.paths), _size(m.paths))
        for m in mono
    ]
    for pair in pairs:
        if pair.aligned:
            args: tuple[str, ...] = (f"--parallel={pair.name}={pair.paths[0]},{pair.paths[1]}",)
        else:
            args = tuple(f"--parallel={pair.name}={p}" for p in pair.paths)
        groups.append(_Group(pair.name, args, _size(pair.paths)))
    return groups


def deal_groups(groups: Sequence[_Group], *, num_tasks: int) -> list[list[_Group]]:
    """Deal groups to ``num_tasks`` tasks: largest first, each to the lightest task so far.

    Deterministic: ties go by name, then to the lowest task index.

    Raises:
        ValueError: fewer groups than tasks (a task would have nothing to do).
    """
    if num_tasks > len(groups):
        raise ValueError(
            f"--array ({num_tasks}) must be <= the number of languages and pairs "
            f"({len(groups)}): a language is never split across tasks"
        )
    tasks: list[list[_Group]] = [[] for _ in range(num_tasks)]
    loads = [0] * num_tasks
    for group in sorted(groups, key=lambda g: (-g.num_bytes, g.name)):
        lightest = min(range(num_tasks), key=lambda i: (loads[i], i))
        tasks[lightest].append(group)
        loads[lightest] += group.num_bytes
    return [sorted(task, key=lambda g: g.name) for task in tasks]


def make_plan(
    command: str,
    *,
    inputs: Sequence[str],
    parallel: Sequence[str] = (),
    out: str,
    num_tasks: int,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> dict:
    """The plan: every task's data command and the merge (None for one task), as JSON data.

    Raises:
        ValueError: an unknown command, bad input specs, no inputs, or more tasks than groups.
        FileNotFoundError: an input path or glob that matches nothing.
    """
    if command not in COMMANDS:
        raise ValueError(f"command ({command!r}) must be one of {', '.join(COMMANDS)}")
    if num_tasks < 1:
        raise ValueError(f"--array ({num_tasks}) must be >= 1")
    if command == "train-tokenizer" and num_tasks != 1:
        raise ValueError(f"--array ({num_tasks}) must be 1 for train-tokenizer (one sample)")
    if not inputs and not parallel:
        raise ValueError("--input or --parallel: give at least one input")
    groups = _groups(parse_mono_specs(list(inputs)), parse_pair_specs(list(parallel)))
    tasks = []
    for index, task_groups in enumerate(deal_groups(groups, num_tasks=num_tasks)):
        task_out = out if num_tasks == 1 else str(Path(out) / f"part_{index}")
        argv = [command, *(a for g in task_groups for a in g.args), f"--out={task_out}", *extra]
        tasks.append(
            {
                "groups": [g.name for g in task_groups],
                "out": task_out,
                "argv": [python, "-m", "data_pipeline", *argv],
            }
        )
    merge = None
    if num_tasks > 1:
        # The parts' manifests are only complete once every task has ended; the merge runs after.
        parts = [task["out"] for task in tasks]
        merge = {
            "out": out,
            "argv": [python, "-m", "data_pipeline", "merge", *parts, f"--out={out}"],
        }
    return {"version": PLAN_VERSION, "command": command, "out": out, "tasks": tasks, "merge": merge}


def make_backtranslate_plan(
    *,
    data_args: Sequence[str],
    out: str,
    num_tasks: int,
    python: str = sys.executable,
) -> dict:
    """The plan of ``data_pipeline backtranslate`` in ``num_tasks`` array tasks.

    Every task runs the same command into the same ``--out`` with ``--part i/N`` (chunks, not
    languages, are dealt: chunk k goes to task k mod N); the merge step runs it once more with
    ``--finalize``, which translates nothing and writes the manifest once every chunk is there.
    One task runs the command as it is (it writes the manifest itself).

    Raises:
        ValueError: ``num_tasks`` < 1, or ``data_args`` already holding ``--part`` /
            ``--finalize`` / ``--out``.
    """
    if num_tasks < 1:
        raise ValueError(f"--array ({num_tasks}) must be >= 1")
    for arg in data_args:
        if arg.split("=")[0] in ("--part", "--finalize", "--out"):
            raise ValueError(f"{arg.split('=')[0]} is set by launch.preprocess: leave it out")
    base = [python, "-m", "data_pipeline", BACKTRANSLATE, *data_args, f"--out={out}"]
    if num_tasks == 1:
        task = {"groups": ["all"], "out": out, "argv": base}
        return {"version": PLAN_VERSION, "command": BACKTRANSLATE, "out": out, "tasks": [task],
                "merge": None}  # fmt: skip
    tasks = [
        {
            "groups": [f"part {i}/{num_tasks}"],
            "out": out,
            "argv": [*base, f"--part={i}/{num_tasks}"],
        }
        for i in range(num_tasks)
    ]
    merge = {"out": out, "argv": [*base, "--finalize"]}
    return {"version": PLAN_VERSION, "command": BACKTRANSLATE, "out": out, "tasks": tasks,
            "merge": merge}  # fmt: skip


def task_index(plan: dict, *, task: int | None = None, environ=None) -> int:
    """The task to run: ``task`` when given, else this Slurm array task's index.

    Raises:
        ValueError: no task given outside an array job, or the array and the plan disagree.
    """
    count = len(plan["tasks"])
    if task is None:
        array = read_array_task(environ)
        if array is None:
            raise ValueError("--task (unset) must be given outside a Slurm array job")
        if array.count != count:
            raise ValueError(
                f"SLURM_ARRAY_TASK_COUNT ({array.count}) must equal the plan's tasks ({count})"
            )
        task = array.index
    if not 0 <= task < count:
        raise ValueError(f"--task ({task}) must be in [0, {count})")
    return task


def run_task(plan: dict, index: int) -> int:
    """Run task ``index`` of the plan; returns the data command's exit code."""
    argv = plan["tasks"][index]["argv"]
    print(f"[preprocess] task {index}/{len(plan['tasks'])}: {shlex.join(argv)}", flush=True)
    return subprocess.run(argv, check=False).returncode


def run_merge(plan: dict) -> int:
    """Merge the parts' manifests into ``<out>/manifest.json``; returns the merge's exit code.

    A plan without a merge (one task wrote ``--out`` itself) has nothing to do: 0.
    """
    merge = plan.get("merge")
    if not merge:
        return 0
    argv = merge["argv"]
    print(f"[preprocess] merge: {shlex.join(argv)}", flush=True)
    return subprocess.run(argv, check=False).returncode


def _script(
    comment: list[str],
    *,
    name: str,
    output: Path,
    workdir: Path,
    cpus: int,
    partition: str | None,
    time: str | None,
    after: str | None,
    extra: tuple[str, ...] = (),
    exec_line: str,
) -> str:
    """An sbatch script of one task per job (or array task): the directives both preprocessing
    scripts share, then ``exec_line``.

    Raises:
        ValueError: a bad time limit or dependency job id.
    """
    if time is not None:
        time_limit_seconds(time)
    if after is not None and not after.isdigit():
        raise ValueError(f"--after ({after!r}) must be a job id")
    directives = [f"--job-name={name}", *extra, "--ntasks=1", f"--cpus-per-task={cpus}"]
    # sbatch splits #SBATCH lines shell-like: a path with spaces (or "#") is quoted; the
    # directory part of --output is literal there ("%" doubled), the file name a pattern
    output_arg = f"{output_pattern_literal(str(output.parent))}/{output.name}"
    directives += [
        f"--output={sbatch_value(output_arg)}",
        "--open-mode=append",
        f"--chdir={sbatch_value(str(workdir))}",
    ]
    if partition:
        directives.append(f"--partition={partition}")
    if time:
        directives.append(f"--time={time}")
    if after:
        # Without it a job whose dependency failed would stay pending forever.
        directives += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    lines = ["#!/bin/bash", *comment, *(f"#SBATCH {d}" for d in directives), "", exec_line, ""]
    return "\n".join(lines)


def render_array_sbatch(
    plan_path: Path,
    plan: dict,
    *,
    job_dir: Path,
    workdir: Path,
    cpus: int,
    partition: str | None = None,
    time: str | None = None,
    after: str | None = None,
    python: str = sys.executable,
) -> str:
    """The array job's sbatch script: task i runs ``run-task PLAN`` and so plan task i.

    Raises:
        ValueError: a bad time limit or dependency job id.
    """
    command = plan["command"]
    count = len(plan["tasks"])
    return _script(
        [
            f"# Rosetta preprocessing generated by `python -m launch.preprocess`: {command} in "
            f"{count}",
            "# array task(s). Task i runs task i of the plan (its exact command is in the plan);",
            "# `python -m launch.preprocess run-task PLAN --task i` runs the same one locally.",
        ],
        name=f"rosetta-{command}",
        extra=(f"--array=0-{count - 1}",),
        output=job_dir / "logs" / f"{command}-%A_%a.out",
        workdir=workdir,
        cpus=cpus,
        partition=partition,
        time=time,
        after=after,
        exec_line=f"exec {shlex.quote(python)} -m launch.preprocess run-task "
        f"{shlex.quote(str(plan_path))}",
    )


def render_merge_sbatch(
    plan_path: Path,
    plan: dict,
    *,
    job_dir: Path,
    workdir: Path,
    after: str,
    partition: str | None = None,
    time: str | None = None,
    python: str = sys.executable,
) -> str:
    """The merge job's sbatch script: one task, started when array job ``after`` succeeded.

    ``afterok`` on an array job id waits for every task of the array.

    Raises:
        ValueError: the plan has no merge, a bad time limit or dependency job id.
    """
    if not plan.get("merge"):
        raise ValueError("the plan has one task and nothing to merge")
    command = plan["command"]
    return _script(
        [
            "# Rosetta preprocessing generated by `python -m launch.preprocess`: merges the "
            "manifests",
            f"# of the {len(plan['tasks'])} parts of array job {after} into "
            f"{plan['merge']['out']}.",
        ],
        name=f"rosetta-{command}-merge",
        output=job_dir / "logs" / f"{command}-merge-%j.out",
        workdir=workdir,
        cpus=1,
        partition=partition,
        time=time,
        after=after,
        exec_line=f"exec {shlex.quote(python)} -m launch.preprocess run-merge "
        f"{shlex.quote(str(plan_path))}",
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m launch.preprocess``."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.preprocess",
        description="Run data_pipeline jobs as Slurm array jobs (one task per slice of the "
        "languages) or locally with the same commands.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command,
            help=f"data_pipeline {command} as an array job",
            epilog="Options not listed here are passed to `python -m data_pipeline "
            f"{command}` unchanged.",
        )
        if command == "shard":
            p.add_argument("--tokenizer", required=True, help="tokenizer directory")
        p.add_argument("--input", action="append", default=[], metavar="LANG=PATH")
        p.add_argument("--parallel", action="append", default=[], metavar="SRC-TGT=PATH")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--array", type=int, default=1, help="array tasks (default 1)")
        p.add_argument("--workers", type=int, default=None, help="processes per task")
        p.add_argument("--partition", default=None, help="Slurm partition")
        p.add_argument("--time", default=None, help="time limit per task")
        p.add_argument("--after", default=None, help="start when this job id succeeded")
        p.add_argument("--job-dir", default=None, help="plan, script, logs (default OUT.jobs)")
        mode = p.add_mutually_exclusive_group(required=True)
        mode.add_argument("--submit", action="store_true", help="submit, print the job id")
        mode.add_argument("--local", action="store_true", help="run every task here, in order")
        mode.add_argument("--dry-run", action="store_true", help="print plan and script only")
    p = sub.add_parser(
        BACKTRANSLATE,
        help="data_pipeline backtranslate as an array job (chunks dealt to tasks) + finalize",
        epilog="Options not listed here (--translator, --tokenizer, --input, --to, --decode, "
        "...) are passed to `python -m data_pipeline backtranslate` unchanged.",
    )
    p.add_argument("--out", required=True, help="output directory (shared by every task)")
    p.add_argument("--array", type=int, default=1, help="array tasks (default 1)")
    p.add_argument("--workers", type=int, default=None, help="translator workers per task")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default=None, help="time limit per task")
    p.add_argument("--after", default=None, help="start when this job id succeeded")
    p.add_argument("--job-dir", default=None, help="plan, script, logs (default OUT.jobs)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--submit", action="store_true", help="submit, print the job id")
    mode.add_argument("--local", action="store_true", help="run every task here, in order")
    mode.add_argument("--dry-run", action="store_true", help="print plan and script only")
    p = sub.add_parser("run-task", help="run one task of a plan (what each array task runs)")
    p.add_argument("plan", help="plan JSON written by shard/train-tokenizer")
    p.add_argument("--task", type=int, default=None, help="task index (default: array task)")
    p = sub.add_parser("run-merge", help="merge the parts of a plan (what the merge job runs)")
    p.add_argument("plan", help="plan JSON written by shard")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        if args.command == "run-task":
            if extra:
                raise ValueError(f"run-task: unexpected arguments {' '.join(extra)}")
            plan = _load_plan(args.plan)
            return run_task(plan, task_index(plan, task=args.task))
        if args.command == "run-merge":
            if extra:
                raise ValueError(f"run-merge: unexpected arguments {' '.join(extra)}")
            return run_merge(_load_plan(args.plan))
        if args.command == "shard":
            extra = [f"--tokenizer={args.tokenizer}", *extra]
        if args.workers is not None:
            if args.workers < 1:
                raise ValueError(f"--workers ({args.workers}) must be >= 1")
            flag = "threads" if args.command == "train-tokenizer" else "workers"
            extra.append(f"--{flag}={args.workers}")
        if args.command == BACKTRANSLATE:
            plan = make_backtranslate_plan(data_args=extra, out=args.out, num_tasks=args.array)
        else:
            plan = make_plan(
                args.command,
                inputs=args.input,
                parallel=args.parallel,
                out=args.out,
                num_tasks=args.array,
                extra=extra,
            )
        job_dir = Path(args.job_dir or f"{args.out.rstrip('/')}.jobs").resolve()
        plan_path = job_dir / f"{args.command}.plan.json"
        script = render_array_sbatch(
            plan_path,
            plan,
            job_dir=job_dir,
            workdir=Path.cwd(),
            cpus=args.workers or 1,
            partition=args.partition,
            time=args.time,
            after=args.after,
        )
        if args.dry_run:
            print(json.dumps(plan, indent=1))
            print(script, end="")
            if plan["merge"]:
                # Its script names the array job's id, known only once that is submitted.
                merge = shlex.join(plan["merge"]["argv"])
                print(f"# then a merge job, held until every array task succeeded: {merge}")
            return 0
        (job_dir / "logs").mkdir(parents=True, exist_ok=True)
        _write(plan_path, json.dumps(plan, indent=1) + "\n")
        script_path = job_dir / f"{args.command}.sbatch"
        _write(script_path, script)
        if args.submit:
            array_job = submit(script_path)
            if not plan["merge"]:
                print(array_job)
                return 0
            merge_path = job_dir / f"{args.command}-merge.sbatch"
            merge = render_merge_sbatch(
                plan_path,
                plan,
                job_dir=job_dir,
                workdir=Path.cwd(),
                after=array_job,
                partition=args.partition,
                time=args.time,
            )
            _write(merge_path, merge)
            try:
                merge_job = submit(merge_path)
            except ValueError as err:
                raise ValueError(f"{err} (array job {array_job} is submitted)") from None
            print(f"array job {array_job}, merge job {merge_job}", file=sys.stderr)
            print(merge_job)
            return 0
        for index in range(len(plan["tasks"])):
            code = run_task(plan, index)
            if code != 0:
                return code
        return run_merge(plan)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _load_plan(path: str) -> dict:
    """A plan written by this module.

    Raises:
        ValueError: a plan of another version (re-run the shard/train-tokenizer command).
    """
    plan = json.loads(Path(path).read_text(encoding="utf-8"))
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(
            f"plan {path!r} has version {plan.get('version')} (this is {PLAN_VERSION}): write "
            "it again with the same command"
        )
    return plan


if __name__ == "__main__":
    sys.exit(main())
