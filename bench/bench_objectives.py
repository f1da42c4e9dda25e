"""What each pre-training objective costs on this CPU: loader batches per second and training
step time of the tiny presets, one process.

Run from the repository root: ``python -m bench.bench_objectives [--steps N] [--json]``. Every
objective runs through the real loader and trainer on the bundled sample's shards (fp32,
``data.seq_len`` 128, batch 8): the loader's ``--batches`` batches after ``--warmup`` (batches
per second, in process, no workers), then ``--warmup`` untimed and ``--steps`` timed trainer
steps (``Trainer.train_step`` plus its settle, median). The encoder rows (MLM, TLM, span,
SpanBERT, BTMLM, NSP, SOP, ELECTRA: the tiny encoder as its discriminator, with its quarter-width
generator; SimCSE and XLCo beside MLM rows) share ``configs/tiny_encoder.yaml``, so their step
times compare directly with MLM's; CLM is the tiny decoder and T5 / BART / translation the tiny
encoder-decoder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.bench_engines import timed_steps
from parallel.testing import run_distributed
from tests.distributed.trainer_runs import trainer_config
from tests.sample_data import build_sample_shards

OBJECTIVES = {
    # name: (preset, objective.* overrides)
    "mlm": ("tiny_encoder.yaml", ("objective.weights={mlm: 1}",)),
    "mlm + tlm (3:1)": ("tiny_encoder.yaml", ("objective.weights={mlm: 3, tlm: 1}",)),
    "span": ("tiny_encoder.yaml", ("objective.weights={span: 1}",)),
    "spanbert": ("tiny_encoder.yaml", ("objective.weights={spanbert: 1}",)),
    "mlm + span + tlm (1:2:1)": (
        "tiny_encoder.yaml",
        ("objective.weights={mlm: 1, span: 2, tlm: 1}",),
    ),
    "btmlm": ("tiny_encoder.yaml", ("objective.weights={btmlm: 1}",)),
    "nsp": ("tiny_encoder.yaml", ("objective.weights={nsp: 1}",)),
    "sop": ("tiny_encoder.yaml", ("objective.weights={sop: 1}",)),
    "electra": ("tiny_encoder.yaml", ("objective.weights={electra: 1}",)),
    "simcse + mlm (1:1)": (
        "tiny_encoder.yaml",
        ("objective.weights={simcse: 1, mlm: 1}", "model.dropout=0.1"),
    ),
    "xlco + mlm (1:3)": ("tiny_encoder.yaml", ("objective.weights={xlco: 1, mlm: 3}",)),
    "clm (decoder)": ("tiny_decoder.yaml", ("objective.weights={clm: 1}",)),
    "t5 (encoder-decoder)": ("tiny_encdec.yaml", ("objective.weights={t5: 1}",)),
    "bart (encoder-decoder)": (
        "tiny_mbart.yaml",
        ("objective.weights={bart: 1}", "objective.bart.language_token=true"),
    ),
    "translation (encoder-decoder)": ("tiny_encdec.yaml", ("objective.weights={translation: 1}",)),
}


def loader_rate(cfg, *, warmup: int, batches: int) -> float:
    """Batches per second of the run's training loader (in process)."""
    from pretrain.config import validate_config
    from pretrain.data import build_train_loader

    validate_config(cfg)
    it = iter(build_train_loader(cfg, dp_rank=0, dp_world_size=1))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="loader timings: best of N")
    parser.add_argument("--only", nargs="*", help="objective names (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        shards = build_sample_shards(root / "data")
        for index, (name, (preset, extra)) in enumerate(OBJECTIVES.items()):
            if args.only and name.split()[0] not in args.only:
                continue
            cfg = trainer_config(
                preset, shards, root / f"run{index}", "train.precision=fp32",
                "data.seq_len=128", "data.batch_size=8", "model.dropout=0.0",
                "checkpoint.every=0", "train.eval_every=0",
                f"train.steps={args.warmup + args.steps}", *extra,
            )  # fmt: skip
            rate = max(
                loader_rate(cfg, warmup=args.warmup, batches=args.batches)
                for _ in range(args.repeat)
            )
            ranks = run_distributed(
                timed_steps, world_size=1, args=(cfg, args.warmup, args.steps), timeout_s=900
            )
            rows.append(
                {
                    "objective": name,
                    "preset": preset,
                    "loader_batches_per_s": rate,
                    "step_ms": 1000 * ranks[0]["step_s"],
                }
            )
    mlm = next((r["step_ms"] for r in rows if r["objective"] == "mlm"), None)
    for row in rows:
        same_model = mlm and row["preset"] == "tiny_encoder.yaml"
        row["step_vs_mlm"] = row["step_ms"] / mlm if same_model else None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| objective | preset | loader batches/s | step (ms, median) | step vs MLM |")
    print("|---|---|---|---|---|")
    for row in rows:
        ratio = "" if row["step_vs_mlm"] is None else f"{row['step_vs_mlm']:.2f}x"
        print(f"| {row['objective']} | {row['preset']} | {row['loader_batches_per_s']:.0f} | "
              f"{row['step_ms']:.0f} | {ratio} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
