"""Step time and peak memory per rank of the tiny decoder: torch FSDP2 vs DeepSpeed ZeRO-1/2/3.

Run from the repository root: ``python -m bench.bench_engines [--steps N] [--json]``. Each engine
trains ``configs/tiny_decoder.yaml`` (fp32, sequence 128, batch 8, the bundled sample's shards)
on 2 gloo ranks through the real trainer: ``--warmup`` steps, then ``--steps`` timed steps
(``Trainer.train_step`` plus its settle, wall clock, median over steps; every rank the same
steps). Peak memory per rank: the process's maximum resident set (``ru_maxrss``, the host's
figure on a CPU machine), the larger of the two ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from parallel.testing import run_distributed
from tests.distributed.trainer_runs import trainer_config
from tests.sample_data import REPO, build_sample_shards

ENGINES = {
    "torch FSDP2": (),
    "DeepSpeed ZeRO-1": ("parallel.engine=deepspeed", "parallel.zero_stage=1"),
    "DeepSpeed ZeRO-2": ("parallel.engine=deepspeed", "parallel.zero_stage=2"),
    "DeepSpeed ZeRO-3": ("parallel.engine=deepspeed", "parallel.zero_stage=3"),
}


def timed_steps(rank: int, world_size: int, cfg, warmup: int, steps: int) -> dict:
    """One rank: ``warmup`` untimed then ``steps`` timed trainer steps (median step time, peak
    RSS, last loss)."""
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    batches = iter(trainer.loader)
    times = []
    for index in range(warmup + steps):
        batch = [next(batches)]
        start = time.perf_counter()
        out = trainer.train_step(batch)
        trainer.settle(out)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loss": out["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        shards = build_sample_shards(root / "data")
        for name, extra in ENGINES.items():
            cfg = trainer_config(
                "tiny_decoder.yaml", shards, root / name.replace(" ", "_"),
                "train.precision=fp32", "data.seq_len=128", "data.batch_size=8",
                "model.num_layers=4", "checkpoint.every=0", "train.eval_every=0",
                f"train.steps={args.warmup + args.steps}", *extra,
            )  # fmt: skip
            ranks = run_distributed(
                timed_steps, world_size=2, args=(cfg, args.warmup, args.steps), timeout_s=900
            )
            rows.append(
                {
                    "engine": name,
                    "step_ms": 1000 * max(r["step_s"] for r in ranks),
                    "peak_rss_gib_per_rank": max(r["peak_rss_gib"] for r in ranks),
                    "last_loss": ranks[0]["loss"],
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| engine | step (ms, median) | peak RSS per rank (GiB) | loss after the steps |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['engine']} | {row['step_ms']:.0f} | "
                  f"{row['peak_rss_gib_per_rank']:.2f} | {row['last_loss']:.4f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
