"""Pipeline idle fraction of torch pipelining schedules on CPU with uniform synthetic stages.

Each virtual stage sleeps ``t_f / v`` in forward and ``2 t_f / v`` in backward (sleep, not
compute: 2 shared cores would otherwise measure CPU contention, not the schedule). The backward
is two halves, ``t_f / v`` each: one on the path to the stage input (B, the input gradient) and
one on a path only to a weight (W), so the zero-bubble schedules, which run W apart from B
(``stage_backward_input`` / ``stage_backward_weight``), have a W to move into the bubbles; the
other schedules run both halves in one backward. (torch runs the first stage's B and W together
at W time: its input needs no gradient.) A rank's busy time per step is ``m (t_f + t_b)``; the
measured idle fraction is ``step_time / busy - 1``, compared with the bubble of 1F1B
``(p - 1) / m``, of interleaved 1F1B ``(p - 1) / (v m)`` and of the two zero-bubble schedules
``(p - 1) / (3 v m)``: ZB-H1's ``(p - 1)(T_F + T_B - T_W)`` per rank (Qi et al. 2024,
arXiv:2401.10241; "ZB1P", over v chunks) with ``T_F = T_B = T_W``. That is also a floor for any
schedule here: the rank holding stage p - 1 cannot start before p - 1 chunk forwards
(``(p - 1) t_f / v``) and every rank has the same work, so ZB-V's ``(p - 1)(T_F + T_B - 2 T_W)
= 0`` cannot show in a step's wall time. A second reference, "torch's order, ideal", replays the
schedule's own action list (``pipeline_order``) with these durations and no overhead.

The schedule itself costs about 2 ms per action here (Python + gloo send/recv on 2 shared
cores), and a rank runs ``2 v m`` actions per step (``3 v m`` with a separate W), so ``t_f``
must be long (about 1 s) for that overhead to fall under a tenth of interleaved 1F1B's smaller
bubble. The "overhead" column is ``(step - ideal step) / actions`` in ms, the ideal step being
``m (t_f + t_b) (1 + torch's order, ideal)`` (the theory for single-stage schedules).
The shape-inference step runs with zero sleeps and is not timed.

Usage: ``python bench/bench_pipeline.py [--tf-ms 1000] [--steps 2] [--only 1F1B,ZBVZeroBubble]
[--max-m 8] [--pp 2]``; prints a Markdown table (rel. error "-" where theory is 0).
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
    """A stage that takes ``forward_s`` forward and ``backward_s`` backward: half on the input
    path (B), half on a path to the weight ``scale`` alone (W)."""

    def __init__(self, *, forward_s: float, backward_s: float) -> None:
        super().__init__()
        # in_scale keeps the input path in the graph on the first stage (its input needs no
        # gradient); its own weight gradient is a multiply, not a sleep.
        self.in_scale = nn.Parameter(torch.ones(1))
        self.scale = nn.Parameter(torch.ones(1))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _Sleep.apply(x * self.in_scale, self.forward_s, self.backward_s / 2)
        return h * _Sleep.apply(self.scale, 0.0, self.backward_s / 2)


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
    order = getattr(sched, "pipeline_order", None)  # multi-stage schedules: every rank's actions
    if order is not None:
        order = {r: [None if a is None else str(a) for a in acts] for r, acts in order.items()}
    return statistics.median(times), order


def simulated_idle(order: dict[int, list[str | None]], *, num_stages: int, v: int, m: int) -> float:
    """Idle fraction of torch's own action order (``schedule.pipeline_order``: ``"2F0"``,
    ``"2I0"``, ``"2W0"``, ``"2B0"`` = stage, action, microbatch) with ideal durations and no
    overhead: F, I (input gradient) and W (weight gradient) take ``t_f / v``, a full backward B
    ``2 t_f / v``; as torch runs it, stage 0's I does nothing and its W is the whole backward.
    Each rank runs its actions in order, each when its inputs are ready."""
    import re

    def duration(stage: int, kind: str) -> float:
        if stage == 0 and kind in ("I", "W"):
            return 0.0 if kind == "I" else 2 / v
        return {"F": 1 / v, "I": 1 / v, "W": 1 / v, "B": 2 / v}[kind]

    pending = {
        r: [re.fullmatch(r"(\d+)([A-Z])(\d+)", a).groups() for a in acts if a]
        for r, acts in order.items()
    }
    done: dict[tuple[int, str, int], float] = {}
    clock = dict.fromkeys(order, 0.0)
    while any(pending.values()):
        progressed = False
        for rank, actions in pending.items():
            while actions:
                stage, kind, mb = int(actions[0][0]), actions[0][1], int(actions[0][2])
                deps = []
                if kind == "F" and stage > 0:
                    deps.append([(stage - 1, "F", mb)])
                if kind in ("B", "I"):
                    deps.append([(stage, "F", mb)])
                    if stage < num_stages - 1:
                        deps.append([(stage + 1, "B", mb), (stage + 1, "I", mb)])
                if kind == "W":
                    deps.append([(stage, "I", mb)])
                ready = [next((done[k] for k in alts if k in done), None) for alts in deps]
                if any(t is None for t in ready):
                    break
                start = max([clock[rank], *ready])
                clock[rank] = start + duration(stage, kind)
                done[stage, kind, mb] = clock[rank]
                actions.pop(0)
                progressed = True
        if not progressed:
            raise RuntimeError("the action order deadlocks")
    return max(clock.values()) / (3 * m) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=1000.0, help="forward time of one rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default=None, help="run only these schedules (comma list)")
    parser.add_argument("--max-m", type=int, default=None, help="skip configurations with more")
    parser.add_argument("--pp", type=int, default=None, help="run only this pipeline degree")
    args = parser.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    tf_s = args.tf_ms / 1000
    print(
        "| schedule | p | v | m | t_f ms | step s | measured idle | theory | rel. error "
        "| torch's order, ideal | overhead ms/action |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p, schedule, v, m in [
        (2, "1F1B", 1, 4),
        (2, "1F1B", 1, 8),
        (4, "1F1B", 1, 8),
        (2, "Interleaved1F1B", 2, 4),
        (2, "Interleaved1F1B", 2, 8),
        (4, "Interleaved1F1B", 2, 8),
        (2, "InterleavedZeroBubble", 2, 4),
        (2, "InterleavedZeroBubble", 2, 8),
        (2, "ZBVZeroBubble", 2, 4),
        (2, "ZBVZeroBubble", 2, 8),
    ]:
        if only is not None and schedule not in only:
            continue
        if (args.max_m is not None and m > args.max_m) or args.pp not in (None, p):
            continue
        results = run_distributed(_run, world_size=p, args=(schedule, v, m, tf_s, args.steps))
        step_s = max(step for step, _ in results)
        order = results[0][1]
        busy_s = m * 3 * tf_s
        idle = step_s / busy_s - 1
        theory = theoretical_idle(schedule, p=p, v=v, m=m)
        ideal = theory
        if order is not None:
            ideal = simulated_idle(order, num_stages=p * v, v=v, m=m)
        actions = (3 if "ZeroBubble" in schedule else 2) * v * m  # F, B(, W) per microbatch
        # Overhead against torch's own order: what the measurement adds to the schedule.
        overhead_ms = (step_s - busy_s * (1 + ideal)) / actions * 1000
        error = f"{abs(idle - theory) / theory:.1%}" if theory > 0 else "-"
        print(
            f"| {schedule} | {p} | {v} | {m} | {args.tf_ms:.0f} | {step_s:.3f} | {idle:.4f} | "
            f"{theory:.4f} | {error} | {ideal:.4f} | {overhead_ms:.1f} |",
            flush=True,
        )


def theoretical_idle(schedule: str, *, p: int, v: int, m: int) -> float:
    """Bubble / busy time per rank with T_F = T_B = T_W (module docstring)."""
    if "ZeroBubble" in schedule:
        return (p - 1) / (3 * v * m)
    return (p - 1) / (v * m)


if __name__ == "__main__":
    main()
