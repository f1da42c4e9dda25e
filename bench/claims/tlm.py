"""Claim (XLM): adding TLM (MLM on concatenated translation pairs) to MLM improves cross-lingual
alignment: sentence retrieval on held-out parallel pairs is more accurate at equal steps.

``python -m bench.claims.tlm [--steps N] [--seeds S ...] [--pairs N] [--langs L ...] [--out DIR]``:
the bundled sample (seven languages and the six en-X pair sets of ``bench.claims.common``;
``--langs`` a subset: the pair sets of those languages). Two arms of the tiny encoder
(``configs/tiny_encoder.yaml``, sequence 128, batch 16, fp32): MLM
(``objective.weights={mlm: 1}``) and MLM + TLM (``{mlm: 1, tlm: 1}``: half of every batch's
rows are pairs). After training, the final checkpoint is exported (``checkpoints_tools
export-hf``) and loaded as ``XLMRobertaModel``; each held-out pair set's first ``--pairs``
pairs are embedded (mean of the last hidden states over real tokens, cosine similarity), and
top-1 retrieval accuracy is the mean of both directions (en -> X and X -> en; chance is
1 / pairs). Prints a table per pair set and writes ``tlm.png`` and ``tlm.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.claims.common import (
    SAMPLE_PAIRS,
    export_final,
    held_out_pairs,
    parse_out,
    print_table,
    retrieval_parser,
    run_config,
    sample_corpus,
    save_result,
    spread,
    train_run,
)

LANGS = ("de", "en", "es", "fr", "ja", "ru", "zh")
ARMS = {"MLM": "{mlm: 1.0}", "MLM+TLM": "{mlm: 1.0, tlm: 1.0}"}


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of ``texts`` (batches of 32)."""
    rows = []
    for start in range(0, len(texts), 32):
        batch = tokenizer(
            texts[start : start + 32], padding=True, truncation=True, max_length=128,
            return_tensors="pt",
        )  # fmt: skip
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(rows)


def retrieval_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Top-1 accuracy of finding each sentence's translation among all, both directions."""
    src = embed(model, tokenizer, [p[0] for p in pairs])
    tgt = embed(model, tokenizer, [p[1] for p in pairs])
    sim = src @ tgt.T
    gold = torch.arange(len(pairs))
    forward = (sim.argmax(1) == gold).float().mean()
    backward = (sim.argmax(0) == gold).float().mean()
    return float((forward + backward) / 2)


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModel, AutoTokenizer

    out = Path(args.out)
    names = [name for name in SAMPLE_PAIRS if set(name.split("-")) <= set(args.langs)]
    data = sample_corpus(Path(args.data or out / "data"), args.langs, pairs=names)
    pair_sets = {name: held_out_pairs(name, args.pairs) for name in names}
    results: dict[str, dict[str, list[float]]] = {arm: {} for arm in ARMS}
    for arm, weights in ARMS.items():
        for seed in args.seeds:
            run_dir = out / "runs" / f"{arm.replace('+', '_')}_seed{seed}"
            extra = (f"objective.weights={weights}", "model.tie_embeddings=true")
            train_run(run_config("tiny_encoder.yaml", data, run_dir, steps=args.steps,
                                 seed=seed, extra=extra))  # fmt: skip
            hf_dir = export_final(run_dir, args.steps)
            model = AutoModel.from_pretrained(hf_dir).eval()
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            for name, pairs in pair_sets.items():
                accuracy = retrieval_accuracy(model, tokenizer, pairs)
                results[arm].setdefault(name, []).append(accuracy)
    return {
        "pairs": {name: {arm: results[arm][name] for arm in ARMS} for name in names},
        "pairs_per_set": {name: len(p) for name, p in pair_sets.items()},
        "steps": args.steps,
        "seeds": list(args.seeds),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["pairs"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.38
    for offset, arm in ((-width / 2, "MLM"), (width / 2, "MLM+TLM")):
        means = [statistics.mean(result["pairs"][n][arm]) for n in names]
        ax.bar([i + offset for i in range(len(names))], means, width, label=arm)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("top-1 retrieval accuracy")
    ax.set_title(f"sentence retrieval on held-out pairs ({result['steps']} steps)")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = retrieval_parser(__doc__, langs=LANGS, out="runs/claims/tlm")
    args, out = parse_out(parser, argv)
    result = save_result(run(args), out, "tlm", plot)
    print(f"{result['steps']} steps, seeds {result['seeds']}; chance = 1 / pairs")
    print_table(
        ["pair set", "pairs", "MLM", "MLM+TLM"],
        [[name, result["pairs_per_set"][name], spread(arms["MLM"]), spread(arms["MLM+TLM"])]
         for name, arms in result["pairs"].items()],
    )  # fmt: skip
    print(f"plot: {out / 'tlm.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
