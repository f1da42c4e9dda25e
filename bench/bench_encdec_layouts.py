"""CPU step time of the tiny encoder-decoder per parallel layout: 1 process, TP2 (+SP), EP2
(the Switch-shaped MoE preset), PP2 (1F1B, 2 microbatches) and FSDP2 on 2 gloo ranks.

Run from the repository root: ``python -m bench.bench_encdec_layouts [--steps N] [--json]``.
Each layout trains ``configs/tiny_encdec.yaml`` (``tiny_encdec_moe.yaml`` for EP2; fp32, source
128, batch 8 per data-parallel rank, ``objective.weights={t5: 3, translation: 1}``, the bundled
sample's shards) through the real trainer: ``--warmup`` steps, then ``--steps`` timed steps
(``Trainer.train_step`` plus its settle, median; the slower rank).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.bench_engines import timed_steps
from parallel.testing import run_distributed
from tests.distributed.trainer_runs import trainer_config
from tests.sample_data import build_sample_shards

LAYOUTS = {
    "1 process": ("tiny_encdec.yaml", 1, ()),
    "TP2 + SP": ("tiny_encdec.yaml", 2, ("parallel.tp=2", "parallel.dp_shard=1")),
    "EP2 (Switch top-1)": ("tiny_encdec_moe.yaml", 2, ("parallel.ep=2",)),
    "PP2 1F1B": (
        "tiny_encdec.yaml",
        2,
        ("parallel.pp=2", "parallel.dp_shard=1", "parallel.microbatches=2"),
    ),
    "FSDP2 dp2": ("tiny_encdec.yaml", 2, ("parallel.dp_shard=2",)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        shards = build_sample_shards(root / "data")
        for name, (preset, world, extra) in LAYOUTS.items():
            cfg = trainer_config(
                preset, shards, root / name.split()[0],
                "train.precision=fp32", "data.seq_len=128", "data.batch_size=8",
                "objective.weights={t5: 3, translation: 1}", "checkpoint.every=0",
                "train.eval_every=0", f"train.steps={args.warmup + args.steps}", *extra,
            )  # fmt: skip
            ranks = run_distributed(
                timed_steps, world_size=world, args=(cfg, args.warmup, args.steps), timeout_s=900
            )
            rows.append(
                {
                    "layout": name,
                    "ranks": world,
                    "step_ms": 1000 * max(r["step_s"] for r in ranks),
                    "last_loss": ranks[0]["loss"],
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| layout | ranks | step (ms, median) | loss after the steps |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['layout']} | {row['ranks']} | {row['step_ms']:.0f} | "
                  f"{row['last_loss']:.4f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
