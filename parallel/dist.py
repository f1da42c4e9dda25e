"""Process-group start-up and tear-down for the trainer and tools.

What to call: ``init_distributed(device_type="cpu")`` -> ``(rank, world_size)``, once per
process before the mesh is built: under torchrun (or SLURM through ``launch/``) it joins the
launched group (gloo; on CUDA ``cpu:gloo,cuda:nccl``, one group for both devices), otherwise it
makes a one-rank gloo group and returns ``(0, 1)``, so a single process runs the same code path
as N; a second call returns the group already joined. ``destroy_distributed()`` leaves the group
if one was joined. torch reads the rendezvous variables itself: no Rosetta code reads them
outside ``launch/env.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_distributed(*, device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun (or SLURM through launch/), else run alone.

    torch reads the rendezvous variables itself; Rosetta code never reads them outside
    ``launch/env.py``.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` for a plain single-process run, which gets a
        one-rank gloo group.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not dist.is_torchelastic_launched():
        # A one-rank group keeps one code path: the mesh and collectives work as for N ranks.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1
    # On GPUs, NCCL for CUDA tensors and gloo for the CPU ones (loader, preemption flag,
    # log-step metrics): one group, both devices.
    cuda = device_type == "cuda" and torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
