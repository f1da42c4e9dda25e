"""Sharding job throughput against plain sentencepiece encoding of the same text.

Measures, in one run on the embedded sample corpus (all training text: 12 languages plus six
en-X parallel sets):

- ``plain``: ``SentencePieceProcessor.encode(texts, num_threads=1)`` over every document and
  both sides of every pair, held in memory: tokenizing alone, one core (the reference);
- ``plain-gc-off``: the same with Python's cyclic garbage collector off, as the job runs its
  chunks (``shard._gc_paused``); the job also skips sentencepiece's per-document Python lists
  (``shard._encode_via_buffers``), so this is the stricter yardstick of the two;
- ``job-1``: ``run_shard_job(..., workers=1)``: reading the .zst inputs, chunking,
  tokenizing, packing, zstd, tar writing, sha256 and the manifest, one core;
- ``job-N``: the same with N worker processes; per-core rate = tokens / wall / N.

Each figure is the best of ``--repeats`` runs, taken round robin. Besides wall-clock rates it
reports tokens per CPU second (user + system, pool workers included), which background load
on a shared machine disturbs far less. Goal: job per-core >= 0.8x plain.

Usage: python bench/bench_shard.py [--tokenizer DIR] [--repeats 3] [--workers N]
[--shard-text-mb 64] [--breakdown] [--json] (without --tokenizer, one is trained first: vocab
8000, alpha 0.3, about 20 s on 2 cores). ``--breakdown`` also times a one-worker job's steps
one by one, best of ``--repeats`` passes each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import sentencepiece
import zstandard

from data_pipeline import shard
from data_pipeline.shard import ShardSettings, default_workers, run_shard_job
from data_pipeline.text_inputs import parse_mono_specs, parse_pair_specs
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "data_pipeline" / "sample"
MONO = str(SAMPLE / "mono" / "{lang}.train.txt.zst")
PAIRS = str(SAMPLE / "parallel" / "{src}-{tgt}.train.tsv.zst")


def _texts() -> list[str]:
    texts: list[str] = []
    decompress = zstandard.ZstdDecompressor().decompress
    for path in sorted((SAMPLE / "mono").glob("*.train.txt.zst")):
        texts += decompress(path.read_bytes()).decode("utf-8").splitlines()
    for path in sorted((SAMPLE / "parallel").glob("*.train.tsv.zst")):
        for line in decompress(path.read_bytes()).decode("utf-8").splitlines():
            texts += line.split("\t")
    return texts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="tokenizer directory (default: train one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--shard-text-mb", type=float, default=64.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time the job's steps one by one (CPU)"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = tmp / "tokenizer"
            start = time.perf_counter()
            train_tokenizer(parse_mono_specs([MONO]), vocab_size=8000, out=tok_dir, alpha=0.3)
            print(f"trained tokenizer in {time.perf_counter() - start:.1f} s")
        sp = load_tokenizer(tok_dir).sp

        texts = _texts()
        mono, pairs = parse_mono_specs([MONO]), parse_pair_specs([PAIRS])
        settings = ShardSettings(shard_text_bytes=int(args.shard_text_mb * (1 << 20)))
        variants = ["plain", "plain-gc-off"] + [f"job-{w}" for w in sorted({1, args.workers})]
        wall = dict.fromkeys(variants, float("inf"))
        cpu = dict.fromkeys(variants, float("inf"))
        tokens: dict[str, int] = {}
        load_before = os.getloadavg()
        # round robin, so that every variant sees the same background load
        for _ in range(args.repeats):
            for variant in variants:
                out = tmp / variant
                shutil.rmtree(out, ignore_errors=True)  # a fresh run, nothing to resume
                cpu_start, start = _cpu_seconds(), time.perf_counter()
                if variant.startswith("plain"):
                    with shard._gc_paused() if variant == "plain-gc-off" else nullcontext():
                        ids = sp.encode(texts, num_threads=1)
                        n = sum(map(len, ids))
                        del ids
                else:
                    manifest = run_shard_job(
                        mono,
                        pairs=pairs,
                        tokenizer=tok_dir,
                        out=out,
                        workers=int(variant.split("-")[1]),
                        settings=settings,
                        log=lambda line: None,
                    )
                    n = sum(e["tokens"] for e in manifest["shards"])
                wall[variant] = min(wall[variant], time.perf_counter() - start)
                cpu[variant] = min(cpu[variant], _cpu_seconds() - cpu_start)
                tokens[variant] = n
        load_after = os.getloadavg()
        breakdown = (
            _breakdown(tok_dir, mono, pairs, settings, tmp, repeats=args.repeats)
            if args.breakdown
            else None
        )

    assert len(set(tokens.values())) == 1, f"token counts differ: {tokens}"
    num_tokens = tokens["plain"]
    plain_rate = num_tokens / wall["plain"]
    plain_cpu_rate = num_tokens / cpu["plain"]
    result = {
        "cpu": _cpu_model(),
        "cores": default_workers(),
        "sentencepiece": sentencepiece.__version__,
        "texts": len(texts),
        "tokens": num_tokens,
        "shard_text_mb": args.shard_text_mb,
        "repeats": args.repeats,
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "variants": {},
    }
    for variant in variants:
        workers = 1 if variant.startswith("plain") else int(variant.split("-")[1])
        per_core = num_tokens / wall[variant] / workers
        result["variants"][variant] = {
            "workers": workers,
            "wall_s": round(wall[variant], 3),
            "tokens_per_s": round(num_tokens / wall[variant]),
            "tokens_per_s_per_core": round(per_core),
            "per_core_vs_plain": round(per_core / plain_rate, 3),
            "cpu_s": round(cpu[variant], 3),
            "tokens_per_cpu_s": round(num_tokens / cpu[variant]),
            "per_cpu_s_vs_plain": round(num_tokens / cpu[variant] / plain_cpu_rate, 3),
        }
    if breakdown:
        result["breakdown_cpu_s"] = breakdown
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['cpu']} ({result['cores']} cores), sentencepiece {result['sentencepiece']}")
    print(f"{len(texts):,} texts (documents and pair sides), {num_tokens:,} tokens")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(
        f"{'':<16}{'wall s':>8}{'tokens/s':>12}{'per core':>12}{'vs plain':>10}"
        f"{'CPU s':>8}{'tok/CPU s':>12}{'vs plain':>10}"
    )
    for variant, r in result["variants"].items():
        print(
            f"{variant:<16}{r['wall_s']:>8.2f}{r['tokens_per_s']:>12,}"
            f"{r['tokens_per_s_per_core']:>12,}{r['per_core_vs_plain']:>10.2f}"
            f"{r['cpu_s']:>8.2f}{r['tokens_per_cpu_s']:>12,}{r['per_cpu_s_vs_plain']:>10.2f}"
        )
    if breakdown:
        print("one-worker job, CPU s per step (plain encode of the same chunks = 100%):")
        for step, seconds in breakdown.items():
            print(f"  {step:<26}{seconds:>7.3f}{seconds / breakdown['plain_encode']:>8.0%}")


def _breakdown(
    tok_dir, mono, pairs, settings: ShardSettings, tmp: Path, *, repeats: int
) -> dict[str, float]:
    """CPU seconds of each step of a one-worker job, step by step over the same chunks.

    ``plain_encode`` (sentencepiece's ``encode`` on each chunk's texts, collector on, as in
    ``plain``) is the yardstick, not a step of the job; ``encode_to_numpy`` is the job's own
    tokenizing, from texts to one id array and offsets per chunk; ``whole`` is the job's
    chunks processed as the job does (cutting included). Each figure is the best of
    ``repeats`` passes.
    """
    from data_pipeline.text_inputs import Rejects

    clock = time.process_time
    names = ("cut", "fingerprint", "parse", "plain_encode", "encode_to_numpy", "pack_write")
    names += ("whole",)
    best = dict.fromkeys(names, float("inf"))
    out = tmp / "breakdown"
    for _ in range(repeats):
        steps = dict.fromkeys(names, 0.0)
        rejects = {m.lang: Rejects() for m in mono} | {p.name: Rejects() for p in pairs}
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shard._init_worker(str(tok_dir), str(out), settings)
        worker = shard._WORKER
        start = clock()
        tasks = list(shard._tasks(mono, pairs, settings, rejects))
        steps["cut"] = clock() - start
        for task in tasks:
            _breakdown_task(task, worker, steps, clock)
        shutil.rmtree(out)  # or the whole pass would keep the shards just written
        out.mkdir()
        start = clock()
        for task in tasks:
            shard._process(task)
        steps["whole"] = clock() - start + steps["cut"]
        best = {k: min(best[k], steps[k]) for k in names}
    return {k: round(v, 3) for k, v in best.items()}


def _breakdown_task(task, worker, steps: dict[str, float], clock) -> None:
    """Add one chunk's CPU seconds per step to ``steps``."""
    with shard._gc_paused():  # as in the job
        start = clock()
        chunk = shard._fingerprint(task, worker)
        steps["fingerprint"] += clock() - start
        start = clock()
        docs, runs, rejects = shard._parse(task, worker)
        steps["parse"] += clock() - start
        batches = [docs.texts] + ([docs.tgt_texts] if docs.tgt_texts is not None else [])
        start = clock()
        mono = docs.tgt_texts is None  # as in the job: mono samples store eos
        encoded = [worker.encode(texts, eos=mono) for texts in batches]
        steps["encode_to_numpy"] += clock() - start
        if docs.texts:
            start = clock()
            shard._write_shard(
                worker.out / f"{task.stem}.tar",
                task,
                docs,
                runs,
                encoded,
                rejected=rejects.as_dict(),
                chunk=chunk,
                dtype=worker.dtype,
                sample_tokens=worker.settings.sample_tokens,
                eos_id=worker.tokenizer.sp.eos_id(),
            )
            steps["pack_write"] += clock() - start
    for texts in batches:
        start = clock()
        ids = worker.tokenizer.sp.encode(texts, num_threads=1)
        del ids
        steps["plain_encode"] += clock() - start


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
