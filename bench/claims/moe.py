"""Claim (Switch Transformer, GShard): at equal active parameters per token, a Mixture-of-Experts
decoder reaches a lower loss than the dense one in the same steps; the experts specialise by
language.

``python -m bench.claims.moe [--shards DIR --valid DIR] [--steps N] [--seeds S ...] [--out DIR]``:
without ``--shards`` the bundled sample's twelve languages (``bench.claims.common``). Three arms on
``configs/tiny_moe.yaml`` (hidden 64, 2 layers, sequence 128, batch 16, fp32): dense (FFN 176),
Switch top-1 (4 experts of FFN 176) and GShard top-2 (4 experts of FFN 88): the same active FFN
parameters per token. Prints train loss at a few steps and at equal wall time, the held-out loss
at the end and each MoE arm's expert load by language (last log window, layer 0); writes
``moe.png`` (loss vs step and vs wall time) and ``moe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.claims.common import sample_corpus, train_run
from data_pipeline.manifest import load_manifest
from pretrain.config import load_config
from tests.sample_data import REPO

ARMS = {
    "dense": ("model.moe.num_experts=0",),
    "switch top-1": ("model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.router=switch",
                     "model.moe.expert_ffn_hidden_size=176"),
    "gshard top-2": ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.router=gshard",
                     "model.moe.expert_ffn_hidden_size=88"),
}  # fmt: skip
BATCH, SEQ, EVERY = 16, 128, 10


def _curve(records: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """Steps, train losses and the wall time at each (from each window's tokens/s)."""
    steps, losses, times, clock, last = [], [], [], 0.0, 0
    for record in records:
        clock += (record["step"] - last) * BATCH * SEQ / record["tokens_per_s"]
        last = record["step"]
        steps.append(record["step"])
        losses.append(record["loss"])
        times.append(clock)
    return steps, losses, times


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    data = (
        {"shards": Path(args.shards), "valid": Path(args.valid)}
        if args.shards
        else sample_corpus(Path(args.data or out / "data"))
    )
    vocab = load_manifest(data["shards"])["tokenizer"]["vocab_size"]
    arms = {}
    for name, extra in ARMS.items():
        runs = []
        for seed in args.seeds:
            cfg = load_config(
                REPO / "configs" / "tiny_moe.yaml",
                [
                    f"data.manifest={data['shards']}",
                    f"data.valid_manifest={data['valid']}",
                    f"train.run_dir={out / 'runs' / name.replace(' ', '_')}_seed{seed}",
                    "train.overwrite=true",
                    f"model.vocab_size={vocab}",
                    f"data.seq_len={SEQ}",
                    f"data.batch_size={BATCH}",
                    f"train.steps={args.steps}",
                    f"train.seed={seed}",
                    f"train.eval_every={args.steps}",
                    "train.eval_batches=4",
                    f"logging.every={EVERY}",
                    "logging.tensorboard=false",
                    "checkpoint.every=0",
                    *extra,
                ],
            )
            records = train_run(cfg)
            steps, losses, times = _curve(records)
            runs.append(
                {
                    "seed": seed,
                    "steps": steps,
                    "loss": losses,
                    "seconds": times,
                    "valid_loss": records[-1].get("valid_loss"),
                    "load_by_lang": records[-1].get("moe_load_by_lang", {}).get("layers.0.moe"),
                }
            )
        arms[name] = runs
    return {"arms": arms, "steps": args.steps, "seeds": list(args.seeds)}


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and population std of the values that are not NaN (NaN, NaN for none)."""
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.pstdev(values)


def _report_steps(steps: int) -> list[int]:
    return sorted({s for s in (50, 100) if s < steps} | {steps})


def summary(result: dict) -> list[dict]:
    rows = []
    shortest = min(
        statistics.mean(r["seconds"][-1] for r in runs) for runs in result["arms"].values()
    )
    for name, runs in result["arms"].items():
        row = {"arm": name}
        for step in _report_steps(result["steps"]):
            values = [r["loss"][r["steps"].index(step)] for r in runs if step in r["steps"]]
            row[f"loss@{step}"] = (statistics.mean(values), statistics.pstdev(values))
        at_time = []
        for r in runs:  # the last logged loss within the fastest arm's total time
            inside = [loss for loss, t in zip(r["loss"], r["seconds"]) if t <= shortest]
            at_time.append(inside[-1] if inside else float("nan"))
        row["loss@equal_time"] = _spread(at_time)  # NaN: no log inside (few log steps)
        valid = [r["valid_loss"] for r in runs]
        row["valid_loss"] = (statistics.mean(valid), statistics.pstdev(valid))
        row["seconds"] = statistics.mean(r["seconds"][-1] for r in runs)
        rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs in result["arms"].items():
        r = runs[0]
        by_step.plot(r["steps"], r["loss"], label=name)
        by_time.plot(r["seconds"], r["loss"], label=name)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall time (s, 2 CPU cores)")
    for ax in (by_step, by_time):
        ax.set_ylabel("train loss")
        ax.legend()
    fig.suptitle(f"dense vs MoE at equal active parameters (seed {result['seeds'][0]})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards")
    parser.add_argument("--valid")
    parser.add_argument("--data", help="where the sample corpus is built / reused")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/claims/moe")
    args = parser.parse_args(argv)
    if args.shards and not args.valid:
        parser.error("--shards needs --valid (held-out shards of the same tokenizer)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    result["summary"] = summary(result)
    plot(result, out / "moe.png")
    (out / "moe.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    keys = [f"loss@{s}" for s in _report_steps(result["steps"])]
    keys += ["loss@equal_time", "valid_loss"]
    print("| arm | " + " | ".join(keys) + " | wall s |")
    print("|---" * (len(keys) + 2) + "|")
    for row in result["summary"]:
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in keys]
        print(f"| {row['arm']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    for name, runs in result["arms"].items():
        if runs[0]["load_by_lang"]:
            print(f"{name}, layer 0 expert load by language (seed {runs[0]['seed']}):")
            for lang, shares in sorted(runs[0]["load_by_lang"].items()):
                print(f"  {lang}: " + " ".join(f"{x:.2f}" for x in shares))
    print(f"plot: {out / 'moe.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
