"""The launch environment: the only module in Rosetta that reads SLURM_* and torchrun variables.

What to call: ``read_env(environ=None)`` -> :class:`LaunchEnv` (launcher, rank, world size,
local rank and size, node rank and count, master address and port, job id, node name and list,
GPUs on the node, restart count); ``read_array_task(environ=None)`` -> :class:`ArrayTask` or
None outside an array job, and ``task_slice(items, index=i, count=n)`` its round-robin share
(every item in exactly one slice); ``rendezvous_endpoint(environ=None)`` -> ``(host, port)``,
the same on every node without talking to the others; ``slurm_nodes``, ``expand_hostlist``,
``port_from_job_id`` and ``node_address`` are its pieces (``node_address``, and so
``rendezvous_endpoint``, asks ``scontrol show node`` and DNS for the first node's address).
``python -m launch.env`` exits 2 with one line on bad variables.

Everything else takes ranks, world size and addresses as arguments. Every function here takes the
environment as a mapping (default ``os.environ``) so that it is tested on recorded environments.

Where the variables come from, and which wins:

* torchrun (``torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (the node's rank), ``GROUP_WORLD_SIZE`` (nodes),
  ``MASTER_ADDR``, ``MASTER_PORT`` and ``TORCHELASTIC_*``. When they are present they win: under
  ``launch.slurm`` each node runs one torchrun, so ``SLURM_PROCID`` is the node, not the rank.
* ``srun`` alone (one task per rank) sets ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
  ``SLURM_NODEID``, ``SLURM_NNODES`` and the node list; the master is the first node and the port
  is derived from the job id (:func:`port_from_job_id`) unless ``MASTER_PORT`` is set.
* Neither: one process, rank 0 of 1.

``SLURM_RESTART_COUNT`` counts requeues of the job (preemption), ``TORCHELASTIC_RESTART_COUNT``
the restarts of the worker group inside one torchrun. ``SLURM_ARRAY_TASK_*`` select a slice of
the inputs for preprocessing array jobs (:func:`read_array_task`).

Bad values raise ``ValueError`` with one line naming the variable, its value and the rule.

Command line, used by the generated sbatch script on the first node of the allocation::

    python -m launch.env rendezvous      # prints HOST:PORT for torchrun's c10d rendezvous
    python -m launch.env show            # prints the derived environment as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

# Rendezvous ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): below the
# Linux ephemeral range (32768-60999), so an outgoing connection never holds one by chance.
PORT_BASE = 20000
PORT_SPAN = 10000

_T = TypeVar("_T")

# One bracket group: "prefix[ranges]" or a plain name; ranges are "a", "a-b", comma separated.
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, derived from the launcher's variables."""

    launcher: str
    """torchrun | slurm (srun without torchrun) | none (a plain process)."""
    rank: int
    """Global rank, 0 <= rank < world_size."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node, 0 <= local_rank < local_world_size."""
    local_world_size: int
    """Processes on this node."""
    node_rank: int
    """Index of this node, 0 <= node_rank < num_nodes."""
    num_nodes: int
    """Nodes in the job."""
    master_addr: str
    """Host of the rank-0 rendezvous."""
    master_port: int
    """Port of the rank-0 rendezvous."""
    job_id: str | None
    """SLURM job id, None outside Slurm."""
    node_name: str
    """This node's Slurm name (SLURMD_NODENAME), else the host name."""
    nodes: tuple[str, ...]
    """Node names of the allocation (the expanded node list), empty outside Slurm."""
    gpus_on_node: int | None
    """GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), None when not set."""
    restart_count: int
    """How often Slurm requeued the job (SLURM_RESTART_COUNT), 0 on the first start."""
    elastic_restart_count: int
    """How often torchrun restarted the worker group (TORCHELASTIC_RESTART_COUNT)."""


@dataclass(frozen=True)
class ArrayTask:
    """One task of a Slurm array job, as a 0-based slice index of ``count`` slices."""

    index: int
    """0-based position of this task: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN."""
    count: int
    """Number of tasks (slices): SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1."""
    task_id: int
    """SLURM_ARRAY_TASK_ID as Slurm numbers it."""
    array_job_id: str | None
    """SLURM_ARRAY_JOB_ID, the id shared by every task of the array."""


# ---------------------------------------------------------------------------------------------
# Hostlists


def expand_hostlist(spec: str, *, variable: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm hostlist into node names, in order, keeping zero padding.

    ``gpu[001-004,010]`` -> gpu001 .. gpu004, gpu010; ``n[1-2],login1`` -> n1, n2, login1;
    ``a[01-03]-ib,b7`` -> a01-ib, a02-ib, a03-ib, b7; ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2.

    Args:
        spec: the hostlist.
        variable: the variable the hostlist came from, named in errors.

    Raises:
        ValueError: empty list, unbalanced brackets, an empty name, or a bad range (not digits,
            or descending).
    """
    text = spec.strip()
    if not text:
        raise ValueError(f"{variable} ({spec!r}) must name at least one node")
    hosts: list[str] = []
    for item in _split_top_level(text, spec=spec, variable=variable):
        hosts.extend(_expand_item(item, spec=spec, variable=variable))
    return hosts


def _split_top_level(text: str, *, spec: str, variable: str) -> list[str]:
    """Split at commas outside brackets."""
    items: list[str] = []
    depth = 0
    start = 0
    for pos, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{variable} ({spec!r}) must not nest brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{variable} ({spec!r}) has a ']' without a '['")
        elif char == "," and depth == 0:
            items.append(text[start:pos])
            start = pos + 1
    if depth != 0:
        raise ValueError(f"{variable} ({spec!r}) has a '[' without a ']'")
    items.append(text[start:])
    for item in items:
        if not item.strip():
            raise ValueError(f"{variable} ({spec!r}) has an empty host name between commas")
    return [item.strip() for item in items]


def _expand_item(item: str, *, spec: str, variable: str) -> list[str]:
    """Expand one comma-free-at-top-level item with any number of bracket groups."""
    open_pos = item.find("[")
    if open_pos < 0:
        return [item]
    close_pos = item.index("]", open_pos)
    prefix, body, rest = item[:open_pos], item[open_pos + 1 : close_pos], item[close_pos + 1 :]
    values: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(
                f"{variable} ({spec!r}): range {part!r} must be digits or digits-digits"
            )
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"{variable} ({spec!r}): range {part!r} must not descend")
        # Slurm pads to the width of the lower bound ("n[01-10]" -> n01 .. n10).
        width = len(low)
        values.extend(str(num).zfill(width) for num in range(int(low), int(high) + 1))
    tails = _expand_item(rest, spec=spec, variable=variable) if rest else [""]
    return [f"{prefix}{value}{tail}" for value in values for tail in tails]


# ---------------------------------------------------------------------------------------------
# Reading variables


def _get_int(
    env: Mapping[str, str], name: str, *, default: int | None = None, minimum: int = 0
) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} ({raw!r}) must be an integer") from None
    if value < minimum:
        raise ValueError(f"{name} ({raw!r}) must be >= {minimum}")
    return value


def _first_int(env: Mapping[str, str], names: Sequence[str], *, minimum: int = 0) -> int | None:
    for name in names:
        value = _get_int(env, name, minimum=minimum)
        if value is not None:
            return value
    return None


def _check_below(name: str, value: int, limit_name: str, limit: int) -> None:
    if value >= limit:
        raise ValueError(f"{name} ({value}) must be < {limit_name} ({limit})")


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port derived from a Slurm job id, the same on every node of the job.

    Raises:
        ValueError: the job id is not a number (``SLURM_JOB_ID`` names it).
    """
    try:
        number = int(job_id)
    except ValueError:
        raise ValueError(f"SLURM_JOB_ID ({job_id!r}) must be an integer") from None
    return PORT_BASE + number % PORT_SPAN


def slurm_nodes(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The expanded node list of the allocation (SLURM_JOB_NODELIST, else SLURM_NODELIST).

    Raises:
        ValueError: the node list is malformed, or its length differs from SLURM_NNODES.
    """
    env = os.environ if environ is None else environ
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            nodes = tuple(expand_hostlist(env[name], variable=name))
            num_nodes = _first_int(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), minimum=1)
            if num_nodes is not None and num_nodes != len(nodes):
                raise ValueError(
                    f"{name} ({env[name]!r}) names {len(nodes)} nodes but SLURM_NNODES is "
                    f"{num_nodes}"
                )
            return nodes
    return ()


def read_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Derive rank, world size, local rank, node rank, master address and port.

    Args:
        environ: the environment (default ``os.environ``).

    Raises:
        ValueError: a variable that is not an integer, or variables that disagree (rank not below
            world size, node id not below the node count, node list of the wrong length), naming
            the variable, its value and the rule.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None
    nodes = slurm_nodes(env)
    restart_count = _get_int(env, "SLURM_RESTART_COUNT", default=0)
    elastic_restarts = _get_int(env, "TORCHELASTIC_RESTART_COUNT", default=0)
    gpus_on_node = _get_int(env, "SLURM_GPUS_ON_NODE")
    assert restart_count is not None and elastic_restarts is not None

    if "RANK" in env or "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank = _get_int(env, "RANK", default=0)
        world_size = _get_int(env, "WORLD_SIZE", default=1, minimum=1)
        local_rank = _get_int(env, "LOCAL_RANK", default=rank)
        local_world_size = _get_int(env, "LOCAL_WORLD_SIZE", default=world_size, minimum=1)
        assert rank is not None and world_size is not None
        assert local_rank is not None and local_world_size is not None
        _check_below("RANK", rank, "WORLD_SIZE", world_size)
        _check_below("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world_size)
        if local_world_size > world_size:
            raise ValueError(
                f"LOCAL_WORLD_SIZE ({local_world_size}) must be <= WORLD_SIZE ({world_size})"
            )
        num_nodes = _get_int(env, "GROUP_WORLD_SIZE", minimum=1)
        if num_nodes is None:
            # Homogeneous nodes: torchrun starts the same number of processes on each.
            num_nodes = max(1, world_size // local_world_size)
        node_rank = _get_int(env, "GROUP_RANK")
        if node_rank is None:
            node_rank = rank // local_world_size
        _check_below("GROUP_RANK", node_rank, "GROUP_WORLD_SIZE", num_nodes)
        master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
        master_port = _get_int(env, "MASTER_PORT", minimum=1)
        if master_port is None:
            master_port = port_from_job_id(job_id) if job_id else 29500
    elif "SLURM_PROCID" in env:
        launcher = "slurm"
        rank = _get_int(env, "SLURM_PROCID")
        world_size = _first_int(env, ("SLURM_NTASKS", "SLURM_NPROCS"), minimum=1)
        if world_size is None:
            raise ValueError("SLURM_NTASKS (unset) must be set when SLURM_PROCID is")
        local_rank = _get_int(env, "SLURM_LOCALID", default=0)
        num_nodes = _first_int(env, ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"), minimum=1)
        num_nodes = num_nodes if num_nodes is not None else max(1, len(nodes))
        node_rank = _get_int(env, "SLURM_NODEID", default=0)
        assert rank is not None and local_rank is not None and node_rank is not None
        _check_below("SLURM_PROCID", rank, "SLURM_NTASKS", world_size)
        _check_below("SLURM_NODEID", node_rank, "SLURM_NNODES", num_nodes)
        local_world_size = _local_tasks(env, node_rank=node_rank, world_size=world_size)
        _check_below("SLURM_LOCALID", local_rank, "tasks on this node", local_world_size)
        master_addr = env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1")
        master_port = _get_int(env, "MASTER_PORT", minimum=1)
        if master_port is None:
            if not job_id:
                raise ValueError("SLURM_JOB_ID (unset) must be set when SLURM_PROCID is")
            master_port = port_from_job_id(job_id)
    else:
        launcher = "none"
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
        node_rank, num_nodes = 0, 1
        master_addr = env.get("MASTER_ADDR") or "127.0.0.1"
        master_port = _get_int(env, "MASTER_PORT", minimum=1) or 29500
    if master_port > 65535:
        raise ValueError(f"MASTER_PORT ({master_port}) must be <= 65535")
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=master_port,
        job_id=job_id,
        node_name=env.get("SLURMD_NODENAME") or socket.gethostname(),
        nodes=nodes,
        gpus_on_node=gpus_on_node,
        restart_count=restart_count,
        elastic_restart_count=elastic_restarts,
    )


def _local_tasks(env: Mapping[str, str], *, node_rank: int, world_size: int) -> int:
    """Tasks on this node from SLURM_TASKS_PER_NODE ("2(x3),1"), else SLURM_NTASKS_PER_NODE."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        name = (
            "SLURM_STEP_TASKS_PER_NODE"
            if env.get("SLURM_STEP_TASKS_PER_NODE")
            else "SLURM_TASKS_PER_NODE"
        )
        counts: list[int] = []
        for part in spec.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if match is None:
                raise ValueError(f"{name} ({spec!r}) must look like '4(x2),3'")
            counts.extend([int(match.group(1))] * int(match.group(2) or 1))
        if node_rank < len(counts):
            return counts[node_rank]
    per_node = _get_int(env, "SLURM_NTASKS_PER_NODE", minimum=1)
    return per_node if per_node is not None else world_size


def read_array_task(environ: Mapping[str, str] | None = None) -> ArrayTask | None:
    """This process's task of a Slurm array job, or None outside an array job.

    Raises:
        ValueError: a variable that is not an integer, a task id outside [min, max], a step
            other than 1, or a task count that disagrees with min and max.
    """
    env = os.environ if environ is None else environ
    task_id = _get_int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return None
    low = _get_int(env, "SLURM_ARRAY_TASK_MIN", default=task_id)
    high = _get_int(env, "SLURM_ARRAY_TASK_MAX", default=task_id)
    step = _get_int(env, "SLURM_ARRAY_TASK_STEP", default=1, minimum=1)
    count = _get_int(env, "SLURM_ARRAY_TASK_COUNT", minimum=1)
    assert low is not None and high is not None and step is not None
    if not low <= task_id <= high:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID ({task_id}) must be within SLURM_ARRAY_TASK_MIN ({low}) and "
            f"SLURM_ARRAY_TASK_MAX ({high})"
        )
    # Slices are numbered contiguously; "--array=0-9:2" or "1,5,7" would leave holes.
    if step != 1:
        raise ValueError(f"SLURM_ARRAY_TASK_STEP ({step}) must be 1 (use --array=0-N)")
    if count is not None and count != high - low + 1:
        raise ValueError(
            f"SLURM_ARRAY_TASK_COUNT ({count}) must equal SLURM_ARRAY_TASK_MAX - "
            f"SLURM_ARRAY_TASK_MIN + 1 ({high - low + 1}); the array must be contiguous"
        )
    return ArrayTask(
        index=task_id - low,
        count=high - low + 1,
        task_id=task_id,
        array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
    )


def task_slice(items: Sequence[_T], *, index: int, count: int) -> list[_T]:
    """The items of slice ``index`` of ``count``: every count-th item, starting at ``index``.

    Round-robin rather than contiguous blocks, so that sorted inputs of uneven sizes spread
    evenly; the union over all slices is ``items``, each item in exactly one slice.

    Raises:
        ValueError: ``count`` < 1 or ``index`` outside [0, count).
    """
    if count < 1:
        raise ValueError(f"array task count ({count}) must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"array task index ({index}) must be in [0, {count})")
    return list(items[index::count])


# ---------------------------------------------------------------------------------------------
# Rendezvous host


def node_address(node: str, *, scontrol: str = "scontrol") -> str:
    """The address to reach Slurm node ``node`` at: its NodeAddr, else the name if it resolves.

    Node names need not resolve (several slurmd on one host, or clusters whose node names are
    not DNS names), while NodeAddr is what slurmctld itself uses to reach the node.

    Raises:
        ValueError: neither ``scontrol show node`` gives a NodeAddr nor does the name resolve.
    """
    try:
        shown = subprocess.run(
            [scontrol, "show", "node", node],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        match = re.search(r"\bNodeAddr=(\S+)", shown.stdout)
        if shown.returncode == 0 and match:
            return match.group(1)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        socket.getaddrinfo(node, None)
    except OSError:
        raise ValueError(
            f"node {node!r}: no NodeAddr from scontrol and the name does not resolve"
        ) from None
    return node


def rendezvous_endpoint(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """``(host, port)`` of torchrun's c10d rendezvous: the first node of the allocation.

    The port is MASTER_PORT when set, else derived from the job id, so every node computes the
    same endpoint without talking to the others.

    Raises:
        ValueError: not inside a Slurm allocation, or the node list / job id is malformed.
    """
    env = os.environ if environ is None else environ
    nodes = slurm_nodes(env)
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not nodes or not job_id:
        raise ValueError("SLURM_JOB_NODELIST (unset) must be set: run inside a Slurm job")
    port = _get_int(env, "MASTER_PORT", minimum=1) or port_from_job_id(job_id)
    return node_address(nodes[0]), port


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m launch.env rendezvous | show``; exit 2 with one line on bad variables."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.env",
        description="Print what Rosetta derives from the SLURM_* and torchrun variables.",
    )
    parser.add_argument("what", choices=("rendezvous", "show"))
    args = parser.parse_args(argv)
    try:
        if args.what == "rendezvous":
            host, port = rendezvous_endpoint()
            print(f"{host}:{port}")
        else:
            print(json.dumps(dataclasses.asdict(read_env()), indent=2))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
