"""Claim (ELECTRA, Clark et al. 2020): replaced token detection learns more per step than masked
LM, so an ELECTRA discriminator beats an MLM encoder at equal steps, and at equal compute too.

``python -m bench.claims.electra [--steps N] [--seeds S ...] [--pairs N] [--probe-train N]
[--probe-test N] [--langs L ...] [--data DIR] [--out DIR]``: the bundled sample (seven languages
and the six en-X pair sets of ``bench.claims.common``). Three arms of the tiny encoder body
(``configs/tiny_encoder.yaml``: hidden 64, 2 layers, sequence 128, batch 16, fp32), each run
through the real trainer:

- ``MLM``: ``objective.weights={mlm: 1}`` (BERT 80/10/10), ``--steps`` steps;
- ``ELECTRA``: ``{electra: 1}`` with ELECTRA's recipe (a generator of a quarter of the width,
  85% mask / 15% kept masking, discriminator weight 50), ``--steps`` steps;
- ``MLM (equal time)``: MLM for as many steps as fit in the ELECTRA run's wall time of the same
  seed (ELECTRA's step runs the generator and the model twice over the rows).

The probes do not use a masked-LM head (ELECTRA's discriminator has none): each final checkpoint
is exported (``export-hf``: ``XLMRobertaModel`` / ``ElectraModel`` bodies) and its mean-pooled
last hidden states over real tokens are (1) the sentence embeddings of claim 2's retrieval on
held-out parallel pairs (top-1, both directions, mean over the pair sets; chance 1 / pairs) and
(2) the frozen features of a language-identification linear probe: a logistic regression
trained on ``--probe-train`` held-out paragraphs per language (the sample's ``*.valid`` files,
fixed seed, full-batch L-BFGS), accuracy on the next ``--probe-test``. Prints a table and
writes ``electra.png`` and ``electra.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.claims import common
from bench.claims.tlm import LANGS, embed, retrieval_accuracy
from tests.sample_data import SAMPLE, first_lines

ARMS = ("MLM", "ELECTRA", "MLM (equal time)")
RECIPES = {
    "MLM": ("objective.weights={mlm: 1.0}",),
    "ELECTRA": (
        "objective.weights={electra: 1.0}",
        "objective.mask_replace_prob=0.85",
        "objective.mask_random_prob=0.0",
    ),
}


def lid_probe(model, tokenizer, texts: dict[str, list[str]], *, train: int) -> float:
    """Accuracy of a logistic regression on frozen mean-pooled features: the first ``train``
    texts of each language fit it, the rest test it."""
    langs = sorted(texts)
    feats, labels = [], []
    for label, lang in enumerate(langs):
        feats.append(embed(model, tokenizer, texts[lang]))
        labels.append(torch.full((len(texts[lang]),), label))
    fit_x = torch.cat([f[:train] for f in feats])
    fit_y = torch.cat([y[:train] for y in labels])
    test_x = torch.cat([f[train:] for f in feats])
    test_y = torch.cat([y[train:] for y in labels])
    torch.manual_seed(0)
    head = torch.nn.Linear(fit_x.shape[1], len(langs))
    optim = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200)

    def closure():
        optim.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(fit_x), fit_y)
        loss = loss + 1e-3 * head.weight.square().sum()
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        return float((head(test_x).argmax(1) == test_y).float().mean())


def _train(data: dict[str, Path], run_dir: Path, recipe, *, steps: int, seed: int) -> float:
    """Train one arm; its wall seconds."""
    cfg = common.run_config(
        "tiny_encoder.yaml", data, run_dir, steps=steps, seed=seed, extra=recipe
    )
    start = time.perf_counter()
    common.train_run(cfg)
    return time.perf_counter() - start


def _probe(run_dir: Path, steps: int, pair_sets, texts, *, train: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    hf_dir = common.export_final(run_dir, steps)
    model = AutoModel.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    retrieval = {name: retrieval_accuracy(model, tokenizer, p) for name, p in pair_sets.items()}
    return {
        "model_class": type(model).__name__,
        "retrieval": retrieval,
        "retrieval_mean": statistics.mean(retrieval.values()),
        "lid_accuracy": lid_probe(model, tokenizer, texts, train=train),
    }


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    names = [name for name in common.SAMPLE_PAIRS if set(name.split("-")) <= set(args.langs)]
    data = common.sample_corpus(Path(args.data or out / "data"), args.langs, pairs=names)
    pair_sets = {name: common.held_out_pairs(name, args.pairs) for name in names}
    count = args.probe_train + args.probe_test
    texts = {
        lang: first_lines(SAMPLE / "mono" / f"{lang}.valid.txt.zst", count) for lang in args.langs
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        seconds = {}
        for arm in ARMS:
            if arm == "MLM (equal time)":
                steps = max(1, round(args.steps * seconds["ELECTRA"] / seconds["MLM"]))
                recipe = RECIPES["MLM"]
            else:
                steps, recipe = args.steps, RECIPES[arm]
            run_dir = out / "runs" / f"{arm.split()[0]}{'_time' if 'time' in arm else ''}_{seed}"
            seconds[arm] = _train(data, run_dir, recipe, steps=steps, seed=seed)
            probe = _probe(run_dir, steps, pair_sets, texts, train=args.probe_train)
            runs[arm].append({"seed": seed, "steps": steps, "seconds": seconds[arm], **probe})
    return {
        "runs": runs,
        "pairs_per_set": {name: len(p) for name, p in pair_sets.items()},
        "probe": {"train_per_lang": args.probe_train, "test_per_lang": args.probe_test,
                  "langs": list(args.langs)},
        "seeds": list(args.seeds),
    }  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "retrieval_mean", "retrieval (mean over pair sets)"),
                           (axes[1], "lid_accuracy", "language-ID linear probe")):  # fmt: skip
        means = [statistics.mean(r[key] for r in result["runs"][arm]) for arm in ARMS]
        spread = [statistics.pstdev([r[key] for r in result["runs"][arm]]) for arm in ARMS]
        ax.bar(range(len(ARMS)), means, yerr=spread, color=["C0", "C1", "C2"])
        ax.set_xticks(range(len(ARMS)), [a.replace(" (", "\n(") for a in ARMS])
        ax.set_title(title)
        ax.set_ylabel("accuracy")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.retrieval_parser(__doc__, langs=LANGS, out="runs/claims/electra")
    parser.add_argument("--probe-train", type=int, default=8)
    parser.add_argument("--probe-test", type=int, default=100)
    args, out = common.parse_out(parser, argv)
    result = common.save_result(run(args), out, "electra", plot)
    print(f"seeds {result['seeds']}; retrieval chance = 1 / pairs, LID chance = 1 / languages")
    common.print_table(
        ["arm", "steps", "seconds", "retrieval (mean)", "LID probe"],
        [[arm, "/".join(str(r["steps"]) for r in runs),
          f"{statistics.mean(r['seconds'] for r in runs):.0f}",
          common.spread(r["retrieval_mean"] for r in runs),
          common.spread(r["lid_accuracy"] for r in runs)]
         for arm, runs in result["runs"].items()],
    )  # fmt: skip
    print(f"plot: {out / 'electra.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
