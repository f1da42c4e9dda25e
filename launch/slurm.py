"""Multi-node training under SLURM: write (and submit) an sbatch script for a run.

What to call: the command below (``main(argv)`` returns its exit code), or its tested pieces:
``prepare_config(config, overrides=..., world_size=n)`` (``ValueError`` naming the key, value
and rule), ``write_job(cfg, job)`` for a :class:`SlurmJob` (writes ``config.yaml``,
``slurm.sbatch`` and the logs directory; returns the script path) and ``render_sbatch(job)``
(deterministic: the same job gives the same text; ``check_job`` raises ``ValueError`` for a bad
job). Exit codes: 0 written/submitted, 2 bad config, arguments or sbatch failure (one line on
stderr).

    python -m launch.slurm --config configs/decoder_1b.yaml --nodes 4 --gpus-per-node 8 \
        --partition gpu --time 2-00:00:00 --submit [section.key=value ...]

The config is loaded and validated for ``nodes x gpus_per_node`` ranks first (on CPU nodes,
``train.device=cpu``, G is the number of processes per node and no GPUs are requested). Then
``<run_dir>/config.yaml`` (the resolved config, ``train.resume=auto``) and
``<run_dir>/slurm.sbatch`` are written; ``--submit`` runs sbatch and prints the job id,
``--dry-run`` prints the script and writes nothing.

How the job runs (also written in the script's header):

* **One srun task per node**, each running torchrun (``python -m torch.distributed.run``), which
  starts G processes on its node. The torchrun agents meet in a **c10d rendezvous hosted on the
  first node** of the allocation: host = that node's NodeAddr from ``scontrol show node`` (node
  names need not resolve), port = ``MASTER_PORT`` or derived from the job id, rendezvous id = the
  job id; ``python -m launch.env rendezvous`` computes it. Each node's task first prints
  ``[launch] node <name> (SLURM_NODEID <i>): torchrun`` to the job log, then execs torchrun.
* **Preemption and time limits.** ``--signal=B:USR1@<grace>`` makes Slurm send SIGUSR1 to the
  batch shell ``grace`` seconds before the time limit. The script traps it and sends SIGTERM
  once to the job step (``scancel --signal=TERM``): the torchrun agents pass SIGTERM to the
  training processes and give them ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (= grace) seconds before
  SIGKILL. The trainer saves a checkpoint and exits with :data:`EXIT_PREEMPTED`; torchrun reports
  any worker failure as its own exit 1, so the script does not rely on the code: when a signal
  arrived and the step did not end with 0, it runs ``scontrol requeue`` and exits
  :data:`EXIT_PREEMPTED`. The requeued job keeps its id, appends to the same log
  (``--open-mode=append``) and resumes from the latest complete checkpoint (``train.resume=auto``;
  ``SLURM_RESTART_COUNT`` counts the requeues). A SIGTERM to the batch shell itself (preemption
  without grace, ``scancel``) is recorded the same way; Slurm signals the step itself then, and
  sending a second SIGTERM would make torchrun abandon its workers, so the script does not.
  On Slurm 22.05, preemption with a GraceTime sends SIGTERM to the step only: the trainer still
  checkpoints, and Slurm's PreemptMode=REQUEUE requeues the job.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launch.sbatch import output_pattern_literal, sbatch_value, submit, time_limit_seconds
from pretrain.config import RunConfig, load_config, save_config, validate_config

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75
"""Exit code of a trainer that saved a checkpoint on SIGTERM/SIGUSR1 and stopped early.

75 is EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): the run is
not finished and resumes from its checkpoint. The generated batch script exits with it when it
requeues the job."""

SCRIPT_NAME = "slurm.sbatch"
CONFIG_NAME = "config.yaml"
DEFAULT_MODULE = "pretrain.train"
DEFAULT_GRACE_S = 120

_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script asks Slurm for and runs."""

    nodes: int
    """Nodes; one srun task (one torchrun) per node."""
    procs_per_node: int
    """Processes per node: GPUs per node, or CPU processes with ``gpus=False``."""
    gpus: bool
    """Request ``procs_per_node`` GPUs per node (False on CPU nodes)."""
    run_dir: Path
    """Absolute run directory: config.yaml, the script, logs/ and checkpoints/."""
    python: str
    """Python interpreter of the training processes (the venv's)."""
    workdir: Path
    """Working directory of the job (the repository root)."""
    module: str = DEFAULT_MODULE
    """Python module torchrun runs with ``--config <run_dir>/config.yaml``."""
    partition: str | None = None
    """Slurm partition; None uses the cluster's default."""
    time: str | None = None
    """Time limit in a Slurm --time form; None uses the partition's limit."""
    grace_s: int = DEFAULT_GRACE_S
    """Seconds between the preemption signal and the time limit / SIGKILL."""
    job_name: str = "rosetta"
    """Slurm job name."""

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT_NAME

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        """Where the job's log goes; ``%j`` is the job id (an sbatch filename pattern)."""
        return self.run_dir / "logs" / "slurm-%j.out"

    @property
    def output_pattern(self) -> str:
        """``--output``'s value: :attr:`log_path` with the run directory's own ``%`` doubled."""
        return output_pattern_literal(str(self.run_dir / "logs")) + "/slurm-%j.out"


def check_job(job: SlurmJob) -> None:
    """Check the Slurm side of a job.

    Raises:
        ValueError: nodes or processes < 1, a bad module or job name, a bad time limit, a
            grace period that does not fit in the time limit, or a run or work directory with
            a line break.
    """
    if job.nodes < 1:
        raise ValueError(f"--nodes ({job.nodes}) must be >= 1")
    if job.procs_per_node < 1:
        raise ValueError(f"--gpus-per-node ({job.procs_per_node}) must be >= 1")
    if not _MODULE.match(job.module):
        raise ValueError(f"--module ({job.module!r}) must be a dotted Python module name")
    if not _NAME.match(job.job_name):
        raise ValueError(f"--job-name ({job.job_name!r}) must be letters, digits and _.+-")
    if job.partition is not None and not _NAME.match(job.partition):
        raise ValueError(f"--partition ({job.partition!r}) must be letters, digits and _.+-")
    if job.grace_s < 1:
        raise ValueError(f"--grace ({job.grace_s}) must be >= 1 second")
    for name, path in (("train.run_dir", job.run_dir), ("--workdir", job.workdir)):
        if "\n" in str(path) or "\r" in str(path):
            raise ValueError(f"{name} ({str(path)!r}) must not hold a line break (sbatch script)")
    if job.time is not None:
        limit = time_limit_seconds(job.time)
        if job.grace_s >= limit:
            raise ValueError(
                f"--grace ({job.grace_s} s) must be shorter than --time ({job.time}, {limit} s)"
            )


def render_sbatch(job: SlurmJob) -> str:
    """The sbatch script of ``job`` (deterministic: the same job gives the same text).

    Raises:
        ValueError: see :func:`check_job`.
    """
    check_job(job)
    q = shlex.quote
    world = job.nodes * job.procs_per_node
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus:
        directives.append(f"--gpus-per-node={job.procs_per_node}")
    else:
        directives.append(f"--cpus-per-task={job.procs_per_node}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.time:
        directives.append(f"--time={job.time.strip()}")
    directives += [
        # sbatch splits #SBATCH lines shell-like: a path with spaces (or "#") is quoted
        f"--output={sbatch_value(job.output_pattern)}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{job.grace_s}",
        f"--chdir={sbatch_value(str(job.workdir))}",
    ]
    kind = "GPUs" if job.gpus else "CPU processes"
    header = f"""#!/bin/bash
# Rosetta job generated by `python -m launch.slurm`: {job.module} on {job.nodes} node(s) x
# {job.procs_per_node} {kind} = {world} ranks. Run directory: {job.run_dir}
#
# Layout: one srun task per node; each runs torchrun, which starts {job.procs_per_node} process(es)
# on its node. The torchrun agents meet in a c10d rendezvous hosted on the FIRST node of the
# allocation: host = its NodeAddr (scontrol show node), port = MASTER_PORT or derived from the
# job id, id = the job id (`python -m launch.env rendezvous` computes host:port).
#
# Preemption: Slurm sends SIGUSR1 to this shell {job.grace_s} s before the time limit
# (--signal=B:USR1@{job.grace_s}). The trap sends SIGTERM once to the job step; torchrun passes it
# to the training processes and waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT s before SIGKILL. The
# trainer saves a checkpoint and exits {EXIT_PREEMPTED} (launch.slurm.EXIT_PREEMPTED). When a
# signal arrived and the step did not exit 0, this script requeues the job (same id, log appended)
# and exits {EXIT_PREEMPTED}; the next start resumes with train.resume=auto. A SIGTERM to this shell
# (scancel, preemption without grace) is recorded but not forwarded: Slurm signals the step itself.
"""
    body = f"""
set -uo pipefail  # no -e: the step's exit status is inspected below

PY={q(job.python)}
RUN_DIR={q(str(job.run_dir))}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.grace_s}
export PYTHONUNBUFFERED=1

echo "[launch] job $SLURM_JOB_ID start ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST"
RDZV_ENDPOINT=$("$PY" -m launch.env rendezvous) || exit {EXIT_BAD_INPUT}
echo "[launch] c10d rendezvous at $RDZV_ENDPOINT"

SIGNALLED=""
on_signal() {{
    [ -n "$SIGNALLED" ] && return
    SIGNALLED=$1
    echo "[launch] got SIG$1"
    if [ "$1" = USR1 ]; then
        scancel --signal=TERM "$SLURM_JOB_ID"
    fi
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# Each node's task names its node (the log then shows which nodes took part) and execs torchrun,
# so that Slurm's signals reach torchrun itself.
NODE_START='echo "[launch] node $SLURMD_NODENAME (SLURM_NODEID $SLURM_NODEID): torchrun"; exec "$@"'
srun --ntasks-per-node=1 --wait={job.grace_s} \\
    bash -c "$NODE_START" torchrun \\
    "$PY" -m torch.distributed.run \\
    --nnodes={job.nodes} --nproc-per-node={job.procs_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID" \\
    --max-restarts=0 \\
    -m {job.module} --config "$RUN_DIR/{CONFIG_NAME}" &
STEP_PID=$!
# wait returns early (128 + signal) when a trap runs; wait again until the step has ended.
while :; do
    wait "$STEP_PID"
    RC=$?
    kill -0 "$STEP_PID" 2>/dev/null || break
done

if [ -n "$SIGNALLED" ] && [ "$RC" -ne 0 ]; then
    echo "[launch] stopped by SIG$SIGNALLED (step exit $RC): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit {EXIT_PREEMPTED}
fi
echo "[launch] step exit $RC"
exit "$RC"
"""
    lines = [header] + [f"#SBATCH {d}" for d in directives]
    return "\n".join(lines) + "\n" + body


def prepare_config(
    config: str | Path, *, overrides: Sequence[str] = (), world_size: int
) -> RunConfig:
    """Load and validate the run's config for ``world_size`` ranks, as the job will run it.

    ``train.run_dir`` becomes absolute (the job may start in another directory) and
    ``train.resume`` ``none`` becomes ``auto``, so that a requeued job resumes.

    Raises:
        ValueError: one line naming the key, its value and the rule (see ``pretrain.config``).
    """
    cfg = load_config(config, overrides)
    validate_config(cfg, world_size=world_size)
    cfg.train.run_dir = str(Path(cfg.train.run_dir).resolve())
    if cfg.train.resume == "none":
        cfg.train.resume = "auto"
    return cfg


def write_job(cfg: RunConfig, job: SlurmJob) -> Path:
    """Write ``<run_dir>/config.yaml`` and ``<run_dir>/slurm.sbatch``; returns the script path.

    The logs directory is created too: Slurm does not create the directory of ``--output``.

    Raises:
        ValueError: see :func:`check_job`.
    """
    text = render_sbatch(job)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "logs").mkdir(exist_ok=True)
    save_config(cfg, job.config_path)
    tmp = job.script_path.with_name(f".{SCRIPT_NAME}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o755)
    tmp.replace(job.script_path)
    return job.script_path


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m launch.slurm``."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Write (and submit) the sbatch script of a multi-node Rosetta run.",
        epilog="Overrides are section.key=value pairs after the options. On CPU nodes "
        "(train.device=cpu) --gpus-per-node is the number of processes per node. The trainer "
        f"exits {EXIT_PREEMPTED} after checkpointing on SIGTERM/SIGUSR1; the job then requeues.",
    )
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs (CPU: processes) per node"
    )
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument(
        "--time",
        default=None,
        help="time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
        "(seconds and minutes < 60, hours < 24 after days)",
    )
    parser.add_argument(
        "--grace",
        type=int,
        default=DEFAULT_GRACE_S,
        help=f"seconds of warning before the time limit (default {DEFAULT_GRACE_S})",
    )
    parser.add_argument(
        "--module", default=DEFAULT_MODULE, help=f"module to run (default {DEFAULT_MODULE})"
    )
    parser.add_argument("--job-name", default=None, help="Slurm job name (default rosetta-RUN)")
    parser.add_argument(
        "--workdir",
        default=None,
        help="working directory of the job, where --module is found (default: this one)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="submit with sbatch, print job id")
    mode.add_argument("--dry-run", action="store_true", help="print the script, write nothing")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.nodes < 1:
            raise ValueError(f"--nodes ({args.nodes}) must be >= 1")
        if args.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node ({args.gpus_per_node}) must be >= 1")
        cfg = prepare_config(
            args.config, overrides=args.overrides, world_size=args.nodes * args.gpus_per_node
        )
        run_dir = Path(cfg.train.run_dir)
        job = SlurmJob(
            nodes=args.nodes,
            procs_per_node=args.gpus_per_node,
            gpus=cfg.train.device != "cpu",
            run_dir=run_dir,
            python=sys.executable,
            workdir=Path(args.workdir).resolve() if args.workdir else Path.cwd(),
            module=args.module,
            partition=args.partition,
            time=args.time,
            grace_s=args.grace,
            job_name=args.job_name or f"rosetta-{run_dir.name}",
        )
        if args.dry_run:
            print(render_sbatch(job), end="")
            return 0
        script = write_job(cfg, job)
        if args.submit:
            print(submit(script))
        else:
            print(f"wrote {script} and {job.config_path}; submit with: sbatch {script}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
