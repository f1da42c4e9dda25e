"""A stand-in for the trainer's preemption path in the Slurm tests (no torch: it starts fast).

First start (no checkpoint in run_dir): write ``started_<restart>_<rank>``, then wait for SIGTERM
or SIGUSR1; on it, write ``checkpoint_<rank>`` (the "checkpoint") and exit with
:data:`EXIT_PREEMPTED`. A start that finds its checkpoint writes ``resumed_<rank>`` with the
restart count and ``train.resume`` it saw, and exits 0. Gives up (exit 1) after 60 s without a
signal.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import yaml

from launch.env import read_env

# The trainer's documented code for "checkpointed on a signal, resume me"; the test checks that
# it equals launch.slurm.EXIT_PREEMPTED, as the trainer's own constant must.
EXIT_PREEMPTED = 75

_stop: list[int] = []


def _on_signal(signum: int, frame: object) -> None:
    # Only note it: the loop checkpoints at its next step boundary, as the trainer will.
    _stop.append(signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGUSR1, _on_signal)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    train = yaml.safe_load(Path(args.config).read_text())["train"]
    env = read_env()
    run_dir = Path(train["run_dir"])
    state = {"restart_count": env.restart_count, "resume": train["resume"], "node": env.node_name}
    if (run_dir / f"checkpoint_{env.rank}").exists():
        (run_dir / f"resumed_{env.rank}").write_text(json.dumps(state))
        return 0
    (run_dir / f"started_{env.restart_count}_{env.rank}").write_text(json.dumps(state))
    deadline = time.monotonic() + 60
    while not _stop and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _stop:
        return 1
    state["signal"] = signal.Signals(_stop[0]).name
    (run_dir / f"checkpoint_{env.rank}").write_text(json.dumps(state))
    return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
