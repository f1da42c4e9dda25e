"""Claim (T5, Raffel et al. 2020, section 3.3): for an encoder-decoder, span corruption is a
better pre-training objective than a causal-LM-style one (prefix LM) at equal tokens, measured
by the loss of a short translation fine-tune.

``python -m bench.claims.encdec [--steps N] [--finetune-steps N] [--seeds S ...] [--pairs N]
[--langs L ...] [--data DIR] [--out DIR]``: the bundled sample (``--langs``, default de en es fr,
and their en-X pair sets of ``bench.claims.common``). Two arms of the tiny mT5-shaped
encoder-decoder (``configs/tiny_encdec.yaml``: hidden 64, 2 + 2 layers, source 128, batch 16,
fp32), pre-trained on the monolingual text only through the real trainer:

- ``span corruption``: ``objective.weights={t5: 1}`` for ``--steps`` steps;
- ``prefix LM``: ``{prefix_lm: 1}`` (T5's prefix LM: a raw cut split at a uniform point) for as
  many steps as give the same raw monolingual tokens (its rows cut 127 tokens, span
  corruption's 141 at source length 128).

Each final checkpoint is exported (``export-hf``: ``MT5ForConditionalGeneration``) and
fine-tuned in transformers on the en-X train pairs (both directions, ``--finetune-steps`` steps
of 16 pairs, AdamW 1e-3, fixed order by seed); the claim's figure is the mean token loss on the
first ``--pairs`` held-out pairs of each set (both directions), before and after the fine-tune.
Prints a table and writes ``encdec.png`` and ``encdec.json`` under ``--out``.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from bench.claims import common
from data_pipeline.manifest import load_manifest
from tests.sample_data import SAMPLE, first_lines

LANGS = ("de", "en", "es", "fr")
ARMS = ("span corruption", "prefix LM")


def _pairs(name: str, split: str, count: int) -> list[tuple[str, str]]:
    lines = first_lines(SAMPLE / "parallel" / f"{name}.{split}.tsv.zst", count)
    rows = [tuple(line.split("\t", 1)) for line in lines if "\t" in line]
    return [(a, b) for a, b in rows if a.strip() and b.strip()]


def _both_ways(pairs):
    return [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]


def translation_loss(model, tokenizer, pairs, *, batch: int = 32) -> float:
    """Mean token cross-entropy of the targets given the sources (teacher forcing)."""
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            enc = tokenizer([a for a, _ in chunk], text_target=[b for _, b in chunk],
                            padding=True, truncation=True, max_length=64,
                            return_tensors="pt")  # fmt: skip
            labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        labels=labels)  # fmt: skip
            count = int((labels != -100).sum())
            total += float(out.loss) * count
            tokens += count
    return total / tokens


def finetune(model, tokenizer, pairs, *, steps: int, seed: int) -> float:
    """``steps`` AdamW steps on batches of 16 of ``pairs`` (shuffled by ``seed``); seconds."""
    rng = random.Random(seed)
    order = list(pairs)
    rng.shuffle(order)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        chunk = [order[(step * 16 + i) % len(order)] for i in range(16)]
        enc = tokenizer([a for a, _ in chunk], text_target=[b for _, b in chunk], padding=True,
                        truncation=True, max_length=64, return_tensors="pt")  # fmt: skip
        labels = enc["labels"].masked_fill(enc["labels"] == tokenizer.pad_token_id, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     labels=labels).loss  # fmt: skip
        optim.zero_grad()
        loss.backward()
        optim.step()
    return time.perf_counter() - start


def _raw_len(data, weights: str) -> int:
    from pretrain.config import validate_config
    from pretrain.data import build_train_loader

    cfg = common.run_config("tiny_encdec.yaml", data, Path("unused"), steps=100, seed=0,
                            extra=(f"objective.weights={weights}",))  # fmt: skip
    validate_config(cfg)
    return build_train_loader(cfg, dp_rank=0, dp_world_size=1).dataset.mono_raw_len


def run(args) -> dict:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = Path(args.out)
    names = [n for n in common.SAMPLE_PAIRS if set(n.split("-")) <= set(args.langs)]
    data = common.sample_corpus(Path(args.data or out / "data"), args.langs, pairs=names)
    mono = load_manifest(data["shards"])["languages"]  # pre-training reads this text only
    recipes = {"span corruption": "{t5: 1.0}", "prefix LM": "{prefix_lm: 1.0}"}
    raw = {arm: _raw_len(data, w) for arm, w in recipes.items()}
    steps = {arm: round(args.steps * raw["span corruption"] / raw[arm]) for arm in ARMS}
    train = _both_ways([p for n in names for p in _pairs(n, "train", 2000)])
    held = _both_ways([p for n in names for p in _pairs(n, "valid", args.pairs)])
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            run_dir = out / "runs" / f"{arm.split()[0]}_{seed}"
            extra = (f"objective.weights={recipes[arm]}",)
            cfg = common.run_config("tiny_encdec.yaml", data, run_dir, steps=steps[arm],
                                    seed=seed, extra=extra)  # fmt: skip
            start = time.perf_counter()
            records = common.train_run(cfg)
            seconds = time.perf_counter() - start
            hf_dir = common.export_final(run_dir, steps[arm])
            model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir)
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            before = translation_loss(model, tokenizer, held)
            tune_s = finetune(model, tokenizer, train, steps=args.finetune_steps, seed=seed)
            after = translation_loss(model, tokenizer, held)
            runs[arm].append({
                "seed": seed, "steps": steps[arm], "pretrain_seconds": seconds,
                "pretrain_loss": records[-1]["loss"], "held_out_before": before,
                "held_out_after": after, "finetune_seconds": tune_s,
            })  # fmt: skip
    return {
        "runs": runs,
        "raw_tokens_per_row": raw,
        "languages": sorted(mono),
        "pair_sets": names,
        "held_out_pairs": len(held),
        "finetune_steps": args.finetune_steps,
        "seeds": list(args.seeds),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, arm in enumerate(ARMS):
        runs = result["runs"][arm]
        for j, key in enumerate(("held_out_before", "held_out_after")):
            values = [r[key] for r in runs]
            label = key.replace("held_out_", "") if i == 0 else None
            ax.bar(i * 3 + j, statistics.mean(values), yerr=statistics.pstdev(values),
                   color=f"C{j}", label=label)  # fmt: skip
    ax.set_xticks([0.5, 3.5], list(ARMS))
    ax.set_ylabel("held-out translation loss (nats)")
    ax.set_title(f"after {result['finetune_steps']} fine-tune steps")
    ax.legend()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = common.retrieval_parser(__doc__, langs=LANGS, out="runs/claims/encdec")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.set_defaults(steps=300, pairs=100)
    args, out = common.parse_out(parser, argv)
    result = common.save_result(run(args), out, "encdec", plot)
    print(f"seeds {result['seeds']}; {result['held_out_pairs']} held-out pairs (both ways)")
    common.print_table(
        ["arm", "pre-training steps", "held-out loss before", "after fine-tune"],
        [[arm, runs[0]["steps"], common.spread(r["held_out_before"] for r in runs),
          common.spread(r["held_out_after"] for r in runs)]
         for arm, runs in result["runs"].items()],
    )  # fmt: skip
    print(f"plot: {out / 'encdec.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
