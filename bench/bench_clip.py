"""Gradient clipping cost on 2 gloo ranks: ``parallel.parallelize.clip_grad_norm_`` (one
all-reduce per group of gradients sharing a device mesh and placements) against the previous
implementation, kept below as the baseline (one ``full_tensor()`` collective per DTensor
gradient).

For each layout (tp 2 with sequence parallel, FSDP2 over dp 2) a decoder is built, one backward
fills its gradients, then each implementation clips them ``--calls`` times (alternating, after
``--warmup`` calls each); a training step (forward, backward, clip, SGD) is timed the same way.
Times are medians over ranks' max, in ms; "all-reduces" counts ``dist.all_reduce`` calls plus
DTensor functional all-reduces in one clip. The two norms are checked to agree (1e-5).

Usage: ``python bench/bench_clip.py [--layers 8] [--hidden 64] [--calls 50] [--steps 10]``;
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import (
    _unique_params,
    clip_grad_norm_,
    loss_context,
    parallelize_model,
)
from parallel.testing import run_distributed
from pretrain.models import ModelConfig, build_model, tp_plan

LAYOUTS = {"tp 2 (+SP)": {"tp": 2}, "FSDP2 dp 2": {}}


@torch.no_grad()
def baseline_clip_grad_norm_(
    parts: nn.Module, *, max_norm: float, dims: ParallelDims | None
) -> torch.Tensor:
    """The previous ``clip_grad_norm_`` (2-norm): one ``full_tensor()`` per DTensor gradient."""
    params = _unique_params([parts])
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for param in params:
        norm = torch.linalg.vector_norm(param.grad, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total = total + norm.float().to(device) ** 2
    if dims is not None and dims.pp > 1:
        dist.all_reduce(total, group=dims["pp"].get_group())
    total_norm = total.sqrt()
    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for param in params:
        grad = param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(coef.to(device=local.device, dtype=local.dtype))
    return total_norm


def _model_config(layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(
        family="decoder",
        vocab_size=512,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=4 * hidden,
        max_seq_len=64,
        qk_norm=True,
    )


def _count_all_reduces(fn) -> int:
    from torch.distributed import _functional_collectives as funcol

    calls = [0]
    originals = (dist.all_reduce, funcol.all_reduce)

    def counted(original):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        return wrapper

    dist.all_reduce, funcol.all_reduce = (counted(o) for o in originals)
    try:
        fn()
    finally:
        dist.all_reduce, funcol.all_reduce = originals
    return calls[0]


def _bench(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    cfg = _model_config(args.layers, args.hidden)
    out = {}
    for label, par in LAYOUTS.items():
        pcfg = ParallelConfig(**par)
        dims = ParallelDims.from_config(pcfg, world_size=world_size)
        dims.build_mesh()
        with torch.device("meta"):
            model = build_model(copy.deepcopy(cfg))
        parallelize_model(model, dims=dims, cfg=pcfg, tp_plan=tp_plan(cfg), seed=0)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (8 // dims.dp, 33), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def backward() -> None:
            opt.zero_grad()
            logits = model(tokens[:, :-1])
            with loss_context(dims):
                F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

        impls = {
            "baseline": lambda: baseline_clip_grad_norm_(model, max_norm=1.0, dims=dims),
            "grouped": lambda: clip_grad_norm_(model, max_norm=1.0, dims=dims),
        }
        backward()
        # max_norm inf first: both see the same unclipped gradients.
        norms = {
            "baseline": baseline_clip_grad_norm_(model, max_norm=float("inf"), dims=dims).item(),
            "grouped": clip_grad_norm_(model, max_norm=float("inf"), dims=dims).item(),
        }
        times: dict[str, list[float]] = {name: [] for name in impls}
        for i in range(args.warmup + args.calls):
            for name, fn in impls.items():
                dist.barrier()
                start = time.perf_counter()
                fn()
                elapsed = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i >= args.warmup:
                    times[name].append(elapsed.item() * 1e3)
        steps: dict[str, list[float]] = {name: [] for name in impls}
        for i in range(2 + args.steps):
            for name, fn in impls.items():
                dist.barrier()
                start = time.perf_counter()
                backward()
                fn()
                opt.step()
                elapsed = torch.tensor(time.perf_counter() - start)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if i >= 2:
                    steps[name].append(elapsed.item() * 1e3)
        out[label] = {
            name: {
                "clip_ms": statistics.median(times[name]),
                "step_ms": statistics.median(steps[name]),
                "all_reduces": _count_all_reduces(fn),
                "norm": norms[name],
            }
            for name, fn in impls.items()
        }
        out[label]["dtensor_grads"] = sum(
            isinstance(p.grad, DTensor) for p in model.parameters() if p.grad is not None
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    result = run_distributed(_bench, world_size=2, args=(args,), timeout_s=600)[0]
    print(f"decoder, {args.layers} layers, hidden {args.hidden}, 2 gloo ranks")
    print()
    print(
        "| layout | DTensor grads | all-reduces per clip (baseline -> grouped) | clip ms "
        "(baseline) | clip ms (grouped) | step ms (baseline) | step ms (grouped) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, row in result.items():
        base, new = row["baseline"], row["grouped"]
        assert abs(base["norm"] - new["norm"]) <= 1e-5 * max(1.0, base["norm"]), (label, row)
        print(
            f"| {label} | {row['dtensor_grads']} | {base['all_reduces']} -> "
            f"{new['all_reduces']} | {base['clip_ms']:.2f} | {new['clip_ms']:.2f} | "
            f"{base['step_ms']:.1f} | {new['step_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
