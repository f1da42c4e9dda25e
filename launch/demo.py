"""``make demo``: the main job on the embedded sample corpus, end to end as far as it is built.

What to call: ``python -m launch.demo --out demo_out`` (``make demo``; ``main(argv)`` returns 0
when every step succeeded). Every step is a real CLI command, printed before it runs; a failing
step stops the demo (``subprocess.CalledProcessError`` naming the command). Reruns reuse
finished work (the tokenizer, the finished shards) but train from scratch: ``<out>/run`` is
deleted first. At the end it prints the first and last loss and where every output lies.

Steps:

1. train a sentencepiece tokenizer on the alpha-smoothed sample languages (monolingual text and
   both sides of the en-X pairs);
2. shard the training and validation text (and the en-X parallel pairs) into webdataset shards;
3. verify and inspect the shards;
4. plan the tiny MoE run for 2 processes (``pretrain.train --dry-run``), then train it with
   expert parallelism on 2 CPU processes: a first job stops at step 60 with a checkpoint, a
   second job resumes from it to step 100; validation loss, loss curves per language.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.checkpoint import complete_checkpoints
from pretrain.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_pipeline" / "sample"
DEMO_VOCAB = 8000


def run_command(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"  ({time.monotonic() - start:.1f} s)", flush=True)


def _inputs(split: str) -> list[str]:
    files = sorted((SAMPLE / "mono").glob(f"*.{split}.txt*"))
    if not files:
        raise SystemExit(f"error: no sample corpus under {SAMPLE / 'mono'}")
    args = []
    for path in files:
        args += ["--input", f"{path.name.split('.')[0]}={path}"]
    return args


def _parallel(split: str) -> list[str]:
    args = []
    for path in sorted((SAMPLE / "parallel").glob(f"*.{split}.tsv*")):
        args += ["--parallel", f"{path.name.split('.')[0]}={path}"]
    return args


def prepare_corpus(out: Path) -> tuple[Path, Path, Path]:
    """Steps 1-3 (tokenizer, train and validation shards with the en-X pairs, verify +
    inspect), reusing finished work under ``out``; returns ``(tokenizer, shards,
    shards_valid)``."""
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    tokenizer = out / "tokenizer"
    shards = out / "shards"
    shards_valid = out / "shards_valid"

    if not any(tokenizer.glob("*.json")):
        run_command(
            [py, "-m", "data_pipeline", "train-tokenizer", *_inputs("train"),
             *_parallel("train"), "--vocab-size", str(DEMO_VOCAB), "--sample-chars", "3000000",
             "--alpha", "0.3", "--out", str(tokenizer)]
        )  # fmt: skip
    else:
        print(f"reusing tokenizer {tokenizer}")
    # The sharding job skips finished shards, so a re-run only checks them.
    run_command(
        [py, "-m", "data_pipeline", "shard", "--tokenizer", str(tokenizer), *_inputs("train"),
         *_parallel("train"), "--out", str(shards)]
    )  # fmt: skip
    run_command(
        [py, "-m", "data_pipeline", "shard", "--tokenizer", str(tokenizer), *_inputs("valid"),
         *_parallel("valid"), "--out", str(shards_valid)]
    )  # fmt: skip
    run_command([py, "-m", "data_pipeline", "verify", str(shards)])
    run_command([py, "-m", "data_pipeline", "inspect", str(shards)])
    return tokenizer, shards, shards_valid


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output directory (reused if present)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    py = sys.executable
    tokenizer, shards, shards_valid = prepare_corpus(out)

    run_dir = out / "run"
    overrides = [
        f"data.manifest={shards}",
        f"data.valid_manifest={shards_valid}",
        f"data.tokenizer={tokenizer}",
        f"train.run_dir={run_dir}",
        f"model.vocab_size={DEMO_VOCAB}",
        "parallel.ep=2",
        "train.steps=100",
        "checkpoint.every=25",
        "train.eval_every=50",
        "logging.every=10",
    ]
    config = str(REPO / "configs" / "tiny_moe.yaml")
    run_command(
        [py, "-m", "pretrain.train", "--config", config, "--dry-run", "--world-size", "2",
         *overrides]
    )  # fmt: skip
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts from scratch every time
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pretrain.train"]
    # First job: stop at step 60 with a checkpoint (as a time-limited job would) ...
    run_command([*torchrun, "--config", config, *overrides, "train.stop_at=60"])
    # ... second job: resume from the latest complete checkpoint and finish.
    run_command([*torchrun, "--config", config, *overrides, "train.resume=auto"])

    records = read_metrics(run_dir / "metrics.jsonl")
    first, last = records[0], records[-1]
    print(
        f"\nloss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
        f"{last['step']} (validation {last.get('valid_loss', float('nan')):.3f})"
    )
    print("\nDemo outputs:")
    print(f"  tokenizer           {tokenizer}")
    print(f"  training shards     {shards} (manifest.json)")
    print(f"  validation shards   {shards_valid}")
    print(f"  run directory       {run_dir}")
    print(f"    config            {run_dir / 'config.yaml'}")
    print(f"    metrics           {run_dir / 'metrics.jsonl'}")
    print(f"    loss curves       {run_dir / 'loss.png'}, loss_<lang>.png and loss_by_lang.png")
    saved = ", ".join(str(p) for _, p in complete_checkpoints(run_dir / "checkpoints"))
    print(f"    checkpoints       {saved}")
    print(f"    per-rank logs     {run_dir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
