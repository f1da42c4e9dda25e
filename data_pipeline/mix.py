"""``python -m data_pipeline mix DIR --alpha A [--tokens N] [--synthetic-ratio R]
[--parallel-upsample U] [--json]``: the language and pair mix a run gets.

For each language of a shard directory: ``n_l`` (tokens in the manifest), ``q_l = n_l / N``,
``p_l = q_l^alpha / sum_k q_k^alpha`` and the share of ``N`` tokens actually streamed through the
loader (packed CLM rows, one process, one slot). For each pair set (a directory with pair
shards): whether it is real or synthetic (back-translated), its tokens, its natural share among
the pair sets, its p as the loader's pair rows get it (``data.synthetic_ratio`` R,
``data.parallel_upsample`` U: see ``data_pipeline.loader``) and the share of the text tokens of
``N`` tokens' worth of TLM rows streamed that it gave. ``--json`` prints
``{"languages": [{"lang", "tokens", "q", "p", "realised"}, ...]}``, plus, when the directory has
pair sets, ``"pairs": [{"pair", "synthetic", "tokens", "q", "p", "realised"}, ...]`` (a
directory without monolingual shards reports ``"languages": []``).

Hooked into the CLI with ``add_mix_parser(subparsers)``; also runs alone as
``python -m data_pipeline.mix``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from data_pipeline.config import check_pair_mix
from data_pipeline.manifest import load_manifest
from data_pipeline.sampling import natural_probabilities
from data_pipeline.transforms import Vocab

DEFAULT_TOKENS = 1_000_000
DEFAULT_SEQ_LEN = 512


def language_mix(
    directory: str, *, alpha: float, tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> list[dict]:  # fmt: skip
    """Per language ``{"lang", "tokens", "q", "p", "realised"}``, sorted by language.

    ``realised`` is the token share over ``ceil(tokens / seq_len)`` packed rows of the loader.

    Raises:
        FileNotFoundError: no manifest. ValueError: a bad manifest, alpha or token count.
    """
    if tokens < 1 or seq_len < 1:
        raise ValueError(f"--tokens ({tokens}) and --seq-len ({seq_len}) must be >= 1")
    manifest = load_manifest(directory)
    # CLM packing needs only eos, fixed at 3 in every Rosetta tokenizer: no tokenizer load
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    # The loader imports torch: only when the realised share is actually streamed.
    from data_pipeline.loader import StreamingDataset

    vocab = Vocab(size=vocab_size, pad_id=0, eos_id=3, mask_id=3, special_ids=(0, 1, 2, 3))
    seq_len = min(seq_len, tokens)
    ds = StreamingDataset(
        directory,
        dp_rank=0,
        dp_world_size=1,
        seq_len=seq_len,
        batch_size=1,
        vocab=vocab,
        alpha=alpha,
        seed=seed,
    )
    it = iter(ds)
    for _ in range(math.ceil(tokens / seq_len)):
        next(it)
    streamed = ds.counters["tokens"]
    total = sum(streamed.values())
    n = {lang: s.tokens for lang, s in ds.sources.items() if s.kind == "mono"}
    q = natural_probabilities(n)
    return [
        {
            "lang": lang,
            "tokens": n[lang],
            "q": q[lang],
            "p": ds.mono_p[lang],
            "realised": streamed.get(lang, 0) / total,
        }
        for lang in sorted(n)
    ]


def pair_mix(
    directory: str, *, alpha: float, tokens: int = DEFAULT_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0, synthetic_ratio: float | None = None, parallel_upsample: float | None = None,
) -> list[dict]:  # fmt: skip
    """Per pair source ``{"pair", "synthetic", "tokens", "q", "p", "realised"}``, sorted by name
    (a merge of real and synthetic shards of one pair name gives ``<pair>`` and
    ``<pair>+synthetic``).

    ``realised`` is the share of the text tokens of ``ceil(tokens / seq_len)`` TLM rows of the
    loader (``tlm_share`` 1) that the pair source gave.

    Raises:
        FileNotFoundError: no manifest. ValueError: a bad manifest, alpha, token count, ratio or
            upsample factor, a ratio > 0 without a synthetic pair set, no pair set at all.
    """
    if tokens < 1 or seq_len < 1:
        raise ValueError(f"--tokens ({tokens}) and --seq-len ({seq_len}) must be >= 1")
    manifest = load_manifest(directory)
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    from data_pipeline.loader import StreamingDataset
    from data_pipeline.transforms import MaskingConfig

    # TLM rows mask tokens: a mask id is needed, not the tokenizer (the counts ignore masking)
    vocab = Vocab(size=vocab_size, pad_id=0, eos_id=3, mask_id=3, special_ids=(0, 1, 2, 3))
    seq_len = min(seq_len, tokens)
    ds = StreamingDataset(
        directory,
        dp_rank=0,
        dp_world_size=1,
        seq_len=seq_len,
        batch_size=1,
        objective="mlm",
        vocab=vocab,
        masking=MaskingConfig(tlm_share=1.0),
        alpha=alpha,
        seed=seed,
        synthetic_ratio=synthetic_ratio,
        parallel_upsample=parallel_upsample,
    )
    it = iter(ds)
    for _ in range(math.ceil(tokens / seq_len)):
        next(it)
    streamed = ds.counters["pair_tokens"]
    total = sum(streamed.values()) or 1
    n = {name: s.tokens for name, s in ds.sources.items() if s.kind == "pair"}
    q = natural_probabilities(n)
    synthetic = set(ds.synthetic_pairs)
    return [
        {
            "pair": name,
            "synthetic": name in synthetic,
            "tokens": n[name],
            "q": q[name],
            "p": ds.pair_p[name],
            "realised": streamed.get(name, 0) / total,
        }
        for name in sorted(n)
    ]


def add_mix_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``mix`` subcommand to a ``python -m data_pipeline`` parser."""
    p = subparsers.add_parser(
        "mix",
        help="show per-language n_l, q_l, p_l and the realised share through the loader",
        description="Show the language mix a run gets from a shard directory: tokens n_l, "
        "natural share q_l, smoothed p_l = q_l^alpha / sum q^alpha, and the share realised over "
        "N tokens streamed through the loader.",
    )
    p.add_argument("dir", help="shard directory (or its manifest.json)")
    p.add_argument("--alpha", type=float, required=True, help="smoothing exponent in (0, 1]")
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"tokens to stream for the realised share (default: {DEFAULT_TOKENS:,})",
    )
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per row")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default: 0)")
    p.add_argument(
        "--synthetic-ratio",
        type=float,
        default=None,
        help="share of pair rows from synthetic pair sets, in [0, 1) (data.synthetic_ratio)",
    )
    p.add_argument(
        "--parallel-upsample",
        type=float,
        default=None,
        help="real pair sets' weight multiplied by U >= 1 (data.parallel_upsample; fairseq's "
        "--upsample-primary)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main_mix)
    return p


def main_mix(args: argparse.Namespace) -> int:
    """Run ``mix`` for parsed ``args``; print the table (or JSON); return 0.

    Raises:
        ValueError, FileNotFoundError: bad input (the CLI turns them into one line, exit 2).
    """
    ratio, upsample = args.synthetic_ratio, args.parallel_upsample
    check_pair_mix(ratio, upsample)
    manifest = load_manifest(args.dir)
    settings = dict(alpha=args.alpha, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed)
    # a directory of synthetic pairs alone has no languages to mix
    rows = language_mix(args.dir, **settings) if manifest["languages"] else []
    out: dict = {"languages": rows}
    if manifest["pairs"] or ratio is not None or upsample is not None:
        out["pairs"] = pair_mix(
            args.dir, **settings, synthetic_ratio=ratio, parallel_upsample=upsample
        )
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"alpha {args.alpha}, realised over {args.tokens:,} tokens")
    print(f"{'language':<10}{'tokens':>14}{'q':>9}{'p':>9}{'realised':>10}")
    for r in rows:
        print(
            f"{r['lang']:<10}{r['tokens']:>14,}{r['q']:>9.4f}{r['p']:>9.4f}{r['realised']:>10.4f}"
        )
    if "pairs" in out:
        print(f"\npair rows: synthetic_ratio {ratio}, parallel_upsample {upsample}")
        print(f"{'pair':<20}{'kind':>10}{'tokens':>14}{'q':>9}{'p':>9}{'realised':>10}")
        for r in out["pairs"]:
            kind = "synthetic" if r["synthetic"] else "real"
            print(
                f"{r['pair']:<20}{kind:>10}{r['tokens']:>14,}{r['q']:>9.4f}{r['p']:>9.4f}"
                f"{r['realised']:>10.4f}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m data_pipeline.mix DIR --alpha A ...``."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline")
    add_mix_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mix", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
