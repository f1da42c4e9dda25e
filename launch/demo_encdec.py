"""``make demo-encdec``: a tiny encoder-decoder trained on the sample corpus, then translating.

What to call: ``python -m launch.demo_encdec --out demo_out [--steps N] [--pair en-es]``
(``main(argv)`` returns 0 when every step succeeded). Every step is a real CLI command, printed
before it runs (the tokenizer and shards of ``make demo``, reused when present); the run
directory ``<out>/run_encdec`` is deleted first, so a rerun trains from scratch.

Steps:

1. the corpus steps of ``launch.demo`` (tokenizer, train and validation shards with the en-X
   pairs, verify, inspect);
2. train ``configs/tiny_encdec.yaml`` (mT5-shaped, 2 + 2 layers of width 64) on one process
   with T5 span corruption on the monolingual rows and translation on the pair rows
   (``objective.weights={t5: 1, translation: 1}``);
3. load the final checkpoint and print greedy translations (``pretrain.generate``) of the first
   held-out sentences of the pair set, beside their references. A model this small, trained
   for minutes on a few thousand pairs, translates badly: the demo shows the path, not quality.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import torch
import zstandard

from launch.demo import DEMO_VOCAB, REPO, SAMPLE, prepare_corpus, run_command
from pretrain.checkpoint import complete_checkpoints
from pretrain.plots import read_metrics


def held_out_pairs(pair: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` pairs of the sample's held-out ``pair`` file (source TAB target)."""
    path = SAMPLE / "parallel" / f"{pair}.valid.tsv.zst"
    if not path.is_file():
        raise SystemExit(f"error: --pair {pair}: no held-out pairs at {path}")
    with open(path, "rb") as handle:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(handle), "utf-8")
        pairs = []
        for line in text:
            source, _, target = line.rstrip("\n").partition("\t")
            pairs.append((source, target))
            if len(pairs) == count:
                break
    return pairs


def translate(checkpoint: Path, tokenizer_dir: Path, texts: list[str], *, target: str) -> list[str]:
    """Greedy translations of ``texts`` into ``target`` by the model of ``checkpoint``."""
    from checkpoints_tools.dcp_io import open_checkpoint
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.generate import generate
    from pretrain.models import build_model

    opened = open_checkpoint(checkpoint)
    model = build_model(opened.model_cfg)
    model.load_state_dict(opened.load_model_state(), strict=True)
    tok = load_tokenizer(tokenizer_dir)
    eos, pad = tok.special_ids["eos"], tok.special_ids["pad"]
    sources = [ids + [eos] for ids in tok.encode(texts)]
    with torch.no_grad():
        outputs = generate(
            model.float().eval(),
            sources,
            decoder_start_id=tok.lang_ids[target],
            eos_id=eos,
            pad_id=pad,
            max_len_a=1.5,
            max_len_b=10,
        )
    return [tok.decode([i for i in ids if i != eos]) for ids in outputs]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m launch.demo_encdec", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output directory (reused if present)")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--pair", default="en-es", help="held-out pair set to translate")
    parser.add_argument("--count", type=int, default=5, help="sentences to translate")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tokenizer, shards, shards_valid = prepare_corpus(out)
    run_dir = out / "run_encdec"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts from scratch every time
    config = str(REPO / "configs" / "tiny_encdec.yaml")
    run_command(
        [sys.executable, "-m", "pretrain.train", "--config", config,
         f"data.manifest={shards}", f"data.valid_manifest={shards_valid}",
         f"data.tokenizer={tokenizer}", f"train.run_dir={run_dir}",
         f"model.vocab_size={DEMO_VOCAB}", "objective.weights={t5: 1, translation: 1}",
         f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
         f"train.eval_every={args.steps}", "logging.every=50"]
    )  # fmt: skip
    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    print(
        f"\nloss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
        f"{last['step']} (validation {last.get('valid_loss', float('nan')):.3f})"
    )
    step, checkpoint = complete_checkpoints(run_dir / "checkpoints")[-1]
    source_lang, target_lang = args.pair.split("-", 1)
    pairs = held_out_pairs(args.pair, args.count)
    outputs = translate(checkpoint, tokenizer, [s for s, _ in pairs], target=target_lang)
    print(f"\nGreedy {source_lang} -> {target_lang} translations, step {step}:")
    for (source, reference), output in zip(pairs, outputs, strict=True):
        print(f"  source     {source}\n  reference  {reference}\n  model      {output}\n")
    print(f"run directory {run_dir} (config.yaml, metrics.jsonl, loss curves, checkpoints)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
