"""Claim (Edunov et al. 2018; Caswell et al. 2019): back-translated target-side monolingual text
added to the real pairs raises a forward model's BLEU; tagging the synthetic sources helps more.

``python -m bench.claims.backtranslation [--out DIR] [--steps N] [--seeds S ...] [loop options]``
runs ``launch.backtranslation_loop`` (every option after ``--`` goes to it; default: the bundled
en-es pairs, our reverse checkpoint and apertium as the back-translators, untagged and tagged)
and writes ``backtranslation.json`` and ``backtranslation.png`` (BLEU per arm, mean and the
seeds' spread) under ``--out``; prints the arms' table: BLEU, the mismatched-reference baseline,
chrF and held-out translation loss, mean ± population std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from launch import backtranslation_loop as loop


def summary(result: dict) -> list[dict]:
    """One row per arm (``synthetic``: real, ckpt, ckpt+tag, ...): mean and std over seeds."""
    arms: dict[str, list[dict]] = {}
    for model in result["models"]:
        arms.setdefault(model["synthetic"], []).append(model)
    rows = []
    for arm, models in arms.items():
        row = {"arm": arm, "seeds": [m["seed"] for m in models]}
        for key in ("bleu", "bleu_mismatched", "chrf", "valid_loss"):
            values = [m[key] for m in models if m[key] is not None]
            row[key] = (statistics.mean(values), statistics.pstdev(values)) if values else None
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["arm"] for r in rows]
    means = [r["bleu"][0] for r in rows]
    spreads = [r["bleu"][1] for r in rows]
    ax.bar(names, means, yerr=spreads, capsize=4, color="#4c72b0", label="BLEU")
    ax.scatter(names, [r["bleu_mismatched"][0] for r in rows], color="#c44e52", zorder=3,
               label="mismatched references")  # fmt: skip
    ax.set_ylabel("BLEU (sacrebleu)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/claims/backtranslation")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("loop_args", nargs="*", help="options of launch.backtranslation_loop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    loop_argv = ["--out", str(out / "loop"), "--steps", str(args.steps), "--tagged",
                 "--seeds", ",".join(map(str, args.seeds)), "--quiet", *args.loop_args]  # fmt: skip
    result = loop.run_loop(loop.parse_args(loop_argv))
    result["summary"] = summary(result)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{result['pair']} forward models, {result['steps']} steps, seeds {args.seeds}"
    plot(result["summary"], out / "backtranslation.png", title=title)
    (out / "backtranslation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    keys = ("bleu", "bleu_mismatched", "chrf", "valid_loss")
    print("| synthetic pairs | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in result["summary"]:
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if row[k] else "-" for k in keys]
        print(f"| {row['arm']} | " + " | ".join(cells) + " |")
    print("\n| backend | tagged | documents | kept | source tokens | tokens/s |")
    print("|---|---|---|---|---|---|")
    for b in result["backends"]:
        print(f"| {b['backend']} | {b['tagged']} | {b['documents']} | {b['kept']} | "
              f"{b['source_tokens']} | {b['tokens_per_s']:.0f} |")  # fmt: skip
    if result["rule_based_reference"]:
        r = result["rule_based_reference"]
        print(f"\nreference {r['translator']}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
