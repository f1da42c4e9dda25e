"""Streaming loader throughput against plain webdataset iteration + zstd decode, same shards.

Measures, in one run, on one core (one process, torch and BLAS at one thread), over the sample
corpus shards (all 12 languages, 6 en-X pair sets):

- ``plain wds+zstd``: ``webdataset.WebDataset`` over every mono shard, each sample's payload
  zstd-decompressed and viewed as token ids (``np.frombuffer``): reading alone;
- ``loader clm``: packed CLM batches (``StreamingDataset``, objective clm), language-mixed;
- ``loader mlm``: MLM batches (BERT 80/10/10 masking), mono rows;
- ``loader tlm``: TLM batches (``tlm_share = 1``), pair shards, padded rows (non-pad tokens
  counted).

Each figure is the best of ``--repeats`` runs of at least ``--seconds`` seconds; the runs are
interleaved (plain, clm, mlm, tlm, plain, ...), so that load from other jobs on a shared machine
falls on every reader alike. Loader figures are steady-state: building the dataset (manifest,
tokenizer) and a few warm-up batches are not timed. Goals: packed CLM >= 0.7x plain
and >= 5 M tokens/s per core.

``--dp-world-size N`` measures rank 0 of N data-parallel ranks (the global language schedule
then deals each step's N x B rows over the ranks); ``--tlm-swap-prob P`` sets the TLM pair
direction draw (default: the loader's, 0.5).

Usage: python bench/bench_loader.py [--shards DIR] [--seq-len 2048] [--batch-size 8] [--json]
(without --shards, a tokenizer is trained and the sample corpus sharded first, about 40 s, into a
temporary directory, or into ``--build DIR`` to keep them for later ``--shards DIR/shards``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import zstandard

from data_pipeline.loader import StreamingDataset
from data_pipeline.manifest import load_manifest
from data_pipeline.transforms import MaskingConfig

SAMPLE = Path(__file__).resolve().parents[1] / "data_pipeline" / "sample"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _build_shards(out: Path, *, sample_tokens: int) -> Path:
    from data_pipeline.shard import ShardSettings, run_shard_job
    from data_pipeline.text_inputs import parse_mono_specs, parse_pair_specs
    from data_pipeline.tokenizer import train_tokenizer

    mono = [f"{p.name.split('.')[0]}={p}" for p in sorted((SAMPLE / "mono").glob("*.train.*"))]
    pairs = [f"{p.name.split('.')[0]}={p}" for p in sorted((SAMPLE / "parallel").glob("*.train.*"))]
    train_tokenizer(parse_mono_specs(mono), vocab_size=8000, out=out / "tok", alpha=0.3)
    run_shard_job(
        parse_mono_specs(mono),
        pairs=parse_pair_specs(pairs),
        tokenizer=out / "tok",
        out=out / "shards",
        workers=1,
        settings=ShardSettings(sample_tokens=sample_tokens),
        log=lambda line: None,
    )
    return out / "shards"


def _timed(run, *, seconds: float) -> float:
    """Tokens/s of one timed run of ``run(deadline) -> tokens``."""
    start = time.perf_counter()
    tokens = run(start + seconds)
    return tokens / (time.perf_counter() - start)


def plain_run(shards: Path):
    """``run(deadline) -> tokens``: webdataset iteration + zstd decode of every mono shard,
    repeated until the deadline."""
    manifest = load_manifest(shards)
    urls = [str(shards / e["path"]) for e in manifest["shards"] if e["kind"] == "mono"]
    decompress = zstandard.ZstdDecompressor().decompress

    def run(deadline: float) -> int:
        tokens = 0
        while time.perf_counter() < deadline:
            for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
                meta = json.loads(sample["json"])
                raw = decompress(sample["tok.zst"])
                ids = np.frombuffer(raw, dtype=np.uint16, offset=4 * (meta["num_docs"] + 1))
                tokens += len(ids)
        return tokens

    return run


def loader_run(
    shards: Path,
    *,
    kind: str,
    seq_len: int,
    batch_size: int,
    dp_world_size: int = 1,
    tlm_swap_prob: float | None = None,
):
    """``run(deadline) -> tokens``: non-padding tokens of the loader's batches of ``kind``
    (clm | mlm | tlm), one process. The dataset is built (manifest, tokenizer) and warmed up
    (a few batches) untimed; successive runs continue the same stream."""
    objective = "clm" if kind == "clm" else "mlm"
    masking = MaskingConfig(tlm_share=1.0 if kind == "tlm" else 0.0)
    extra = {} if tlm_swap_prob is None else {"tlm_swap_prob": tlm_swap_prob}
    ds = StreamingDataset(
        shards,
        dp_rank=0,
        dp_world_size=dp_world_size,
        seq_len=seq_len,
        batch_size=batch_size,
        objective=objective,
        masking=masking,
        **extra,
    )
    it = iter(ds)
    for _ in range(8):
        next(it)

    def emitted() -> int:
        return sum(ds.counters["tokens"].values())

    def run(deadline: float) -> int:
        # the loader's own count of non-padding tokens emitted (the sum of every batch's
        # tokens_per_lang, == attention_mask.sum()), read once per run: no per-batch reduction
        # is charged to the loader, as plain's len(ids) charges none to plain
        start = emitted()
        while time.perf_counter() < deadline:
            next(it)
        return emitted() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="shard directory (default: build from the sample corpus)")
    parser.add_argument(
        "--build",
        metavar="DIR",
        help="build the shards into DIR (kept; DIR/shards is then reusable with --shards)",
    )
    parser.add_argument("--sample-tokens", type=int, default=32768, help="when building shards")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dp-world-size", type=int, default=1, help="measure rank 0 of N")
    parser.add_argument("--tlm-swap-prob", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shards = Path(args.shards)
        else:
            shards = _build_shards(Path(args.build or tmp), sample_tokens=args.sample_tokens)
        manifest = load_manifest(shards)
        mono = [e for e in manifest["shards"] if e["kind"] == "mono"]
        tokens_per_sample = sum(e["tokens"] for e in mono) / sum(e["samples"] for e in mono)
        runs = {"plain": plain_run(shards)}
        for kind in ("clm", "mlm", "tlm"):
            runs[kind] = loader_run(
                shards,
                kind=kind,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                dp_world_size=args.dp_world_size,
                tlm_swap_prob=args.tlm_swap_prob,
            )
        # rounds interleave the readers, so that load from other jobs hits them alike
        best = dict.fromkeys(runs, 0.0)
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = max(best[name], _timed(run, seconds=args.seconds))
        plain = best.pop("plain")
        rates = best
    result = {
        "machine": _cpu_model(),
        "cores_used": 1,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dp_world_size": args.dp_world_size,
        "tokens_per_sample": round(tokens_per_sample),
        "plain_wds_zstd_tokens_per_s": plain,
        **{f"loader_{k}_tokens_per_s": v for k, v in rates.items()},
        "clm_vs_plain": rates["clm"] / plain,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"machine: {result['machine']}, 1 core; {tokens_per_sample:,.0f} tokens per sample; "
        f"load average {result['load_average_1min']}"
    )
    print(f"{'reader':<22}{'M tokens/s':>12}{'vs plain':>10}")
    print(f"{'plain wds+zstd':<22}{plain / 1e6:>12.2f}{1.0:>10.2f}")
    for kind, rate in rates.items():
        print(f"{'loader ' + kind:<22}{rate / 1e6:>12.2f}{rate / plain:>10.2f}")


if __name__ == "__main__":
    main()
