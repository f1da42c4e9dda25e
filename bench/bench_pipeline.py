"""Pipeline idle fraction of torch pipelining schedules on CPU with uniform synthetic stages.

Each virtual stage sleeps ``t_f / v`` in forward and ``2 t_f / v`` in backward (sleep, not
compute: 2 shared cores would otherwise measure CPU contention, not the schedule). A rank's busy
time per step is ``m (t_f + t_b)``; the measured idle fraction is ``step_time / busy - 1``,
compared with the bubble of 1F1B ``(p - 1) / m`` and of interleaved 1F1B ``(p - 1) / (v m)``.

The schedule itself costs about 2 ms per action here (Python + gloo send/recv on 2 shared
cores), and a rank runs ``2 v m`` actions per step, so ``t_f`` must be long (about 1 s) for that
overhead to fall under a tenth of interleaved 1F1B's smaller bubble. The "overhead" column is
``(step - ideal step) / (2 v m)`` in ms, the ideal step being ``m (t_f + t_b) (1 + theory)``.
The shape-inference step runs with zero sleeps and is not timed.

Usage: ``python bench/bench_pipeline.py [--tf-ms 1000] [--steps 2] [--only 1F1B]``; prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.pipeline import stage_ids_of_rank
from parallel.testing import run_distributed


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class SyntheticStage(nn.Module):
    """A stage that takes ``forward_s`` forward and ``backward_s`` backward."""

    def __init__(self, *, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x * self.scale, self.forward_s, self.backward_s)


def _run(rank: int, world_size: int, schedule_name: str, v: int, m: int, tf_s: float, steps: int):
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    cfg = ParallelConfig(pp=world_size, pp_schedule=schedule_name, stages_per_rank=v)
    dims = ParallelDims.from_config(cfg, world_size=world_size)
    dims.build_mesh()
    num_stages = world_size * v
    ids = stage_ids_of_rank(rank, pp=world_size, stages_per_rank=v, schedule=schedule_name)
    stages = [
        PipelineStage(
            SyntheticStage(forward_s=tf_s / v, backward_s=2 * tf_s / v),
            i,
            num_stages,
            torch.device("cpu"),
            group=dims["pp"].get_group(),
        )
        for i in ids
    ]
    cls = getattr(pipelining, f"Schedule{schedule_name}")
    loss_fn = lambda out, tgt: (out - tgt).pow(2).mean()  # noqa: E731
    sched = cls(stages[0] if v == 1 else stages, n_microbatches=m, loss_fn=loss_fn)
    x, y = torch.randn(m, 8), torch.randn(m, 8)
    times = []
    for step in range(steps + 1):
        for stage in stages:  # the first step infers shapes: no sleeping
            stage.submod.forward_s = 0.0 if step == 0 else tf_s / v
            stage.submod.backward_s = 0.0 if step == 0 else 2 * tf_s / v
        torch.distributed.barrier()
        start = time.perf_counter()
        kwargs = {"target": y, "losses": []} if num_stages - 1 in ids else {}
        sched.step(*((x,) if 0 in ids else ()), **kwargs)
        torch.distributed.barrier()
        if step > 0:  # the first step infers shapes
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=1000.0, help="forward time of one rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only this schedule")
    args = parser.parse_args()
    tf_s = args.tf_ms / 1000
    print(
        "| schedule | p | v | m | t_f ms | step s | measured idle | theory | rel. error "
        "| overhead ms/action |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p, schedule, v, m in [
        (2, "1F1B", 1, 4),
        (2, "1F1B", 1, 8),
        (4, "1F1B", 1, 8),
        (2, "Interleaved1F1B", 2, 4),
        (2, "Interleaved1F1B", 2, 8),
        (4, "Interleaved1F1B", 2, 8),
    ]:
        if args.only is not None and schedule != args.only:
            continue
        step_s = max(run_distributed(_run, world_size=p, args=(schedule, v, m, tf_s, args.steps)))
        busy_s = m * 3 * tf_s
        idle = step_s / busy_s - 1
        theory = (p - 1) / (v * m)
        overhead_ms = (step_s - busy_s * (1 + theory)) / (2 * v * m) * 1000
        print(
            f"| {schedule} | {p} | {v} | {m} | {args.tf_ms:.0f} | {step_s:.3f} | {idle:.4f} | "
            f"{theory:.4f} | {abs(idle - theory) / theory:.1%} | {overhead_ms:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
