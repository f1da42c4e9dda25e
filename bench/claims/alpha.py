"""Claim (XLM-R, mBERT): exponentially smoothed language sampling, alpha = 0.3 against the
natural distribution (alpha = 1.0) at equal tokens, lowers the held-out loss of the smallest
languages at a small cost to the largest.

``python -m bench.claims.alpha [--shards DIR --valid DIR --tokenizer DIR] [--steps N] [--seeds
S ...] [--json] [--out DIR]``: without ``--shards`` the bundled sample's twelve languages at their
natural sizes (tokenizer, train and held-out shards built under ``--out``). The tiny decoder
(``configs/tiny_decoder.yaml``, 4 layers, sequence 128, batch 16, fp32) trains ``--steps`` steps
per (alpha, seed); the held-out loss per language is read at the last step (``train.eval_batches``
batches per language of the held-out shards). Prints a table (``--json``: ``{"languages":
[{"lang", "q", "p_alpha_0.3", "p_alpha_1.0", "loss_alpha_0.3", "loss_alpha_1.0", ...}], ...}``)
and writes ``alpha.png`` (loss difference by language, smallest first) and ``alpha.json`` under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.claims.common import language_tokens, sample_corpus, train_run
from data_pipeline.manifest import load_manifest
from data_pipeline.sampling import language_probabilities
from pretrain.config import load_config
from tests.sample_data import REPO

ALPHAS = (0.3, 1.0)


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.shards:
        data = {"shards": Path(args.shards), "valid": Path(args.valid), "tok": args.tokenizer}
    else:
        data = sample_corpus(out / "data")
    tokens = language_tokens(data["shards"])
    vocab = load_manifest(data["shards"])["tokenizer"]["vocab_size"]
    losses: dict[float, dict[str, list[float]]] = {a: {} for a in ALPHAS}
    seconds = {}
    for alpha in ALPHAS:
        for seed in args.seeds:
            run_dir = out / "runs" / f"alpha{alpha}_seed{seed}"
            cfg = load_config(
                REPO / "configs" / "tiny_decoder.yaml",
                [
                    f"data.manifest={data['shards']}",
                    f"data.valid_manifest={data['valid']}",
                    f"data.alpha={alpha}",
                    f"train.run_dir={run_dir}",
                    "train.overwrite=true",
                    f"model.vocab_size={vocab}",
                    "model.num_layers=4",
                    "data.seq_len=128",
                    "data.batch_size=16",
                    f"train.steps={args.steps}",
                    f"train.seed={seed}",
                    "train.precision=fp32",
                    f"train.eval_every={args.steps}",
                    f"train.eval_batches={args.eval_batches}",
                    f"logging.every={args.steps}",
                    "logging.tensorboard=false",
                    "checkpoint.every=0",
                ],
            )
            start = time.perf_counter()
            records = train_run(cfg)
            seconds[(alpha, seed)] = time.perf_counter() - start
            valid = records[-1]["valid_loss_per_lang"]
            for lang, loss in valid.items():
                losses[alpha].setdefault(lang, []).append(loss)
    total = sum(tokens.values())
    probs = {a: language_probabilities(tokens, alpha=a) for a in ALPHAS}
    rows = []
    for lang in sorted(tokens, key=tokens.get):
        row = {"lang": lang, "tokens": tokens[lang], "q": tokens[lang] / total}
        for a in ALPHAS:
            values = losses[a].get(lang, [])
            row[f"p_alpha_{a}"] = probs[a][lang]
            row[f"loss_alpha_{a}"] = statistics.mean(values) if values else None
            row[f"loss_alpha_{a}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return {
        "languages": rows,
        "steps": args.steps,
        "tokens_per_run": args.steps * 16 * 128,
        "seeds": list(args.seeds),
        "seconds_per_run": statistics.mean(seconds.values()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["languages"]
    diff = [r["loss_alpha_0.3"] - r["loss_alpha_1.0"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(
        [r["lang"] for r in rows], diff, color=["tab:green" if d < 0 else "tab:red" for d in diff]
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("held-out loss, alpha 0.3 minus 1.0")
    ax.set_xlabel("language (smallest share first)")
    ax.set_title(
        f"alpha smoothing at equal tokens ({result['steps']} steps, seeds {result['seeds']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards")
    parser.add_argument("--valid")
    parser.add_argument("--tokenizer")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/claims/alpha")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.shards and not args.valid:
        parser.error("--shards needs --valid (held-out shards of the same tokenizer)")
    result = run(args)
    plot(result, Path(args.out) / "alpha.png")
    (Path(args.out) / "alpha.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['steps']} steps x {len(result['seeds'])} seeds, {result['tokens_per_run']:,} "
        f"tokens per run, {result['seconds_per_run']:.0f} s per run"
    )
    print("| lang | share q | p (alpha 0.3) | loss alpha 0.3 | loss alpha 1.0 | 0.3 - 1.0 |")
    print("|---|---|---|---|---|---|")
    for r in result["languages"]:
        a, b = r["loss_alpha_0.3"], r["loss_alpha_1.0"]
        print(f"| {r['lang']} | {r['q']:.3f} | {r['p_alpha_0.3']:.3f} | {a:.3f} ± "
              f"{r['loss_alpha_0.3_std']:.3f} | {b:.3f} ± {r['loss_alpha_1.0_std']:.3f} | "
              f"{a - b:+.3f} |")  # fmt: skip
    print(f"plot: {Path(args.out) / 'alpha.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
