"""``python -m data_pipeline mix DIR --alpha A [--tokens N] [--json]``: the language mix a run gets.

For each language of a shard directory: ``n_l`` (tokens in the manifest), ``q_l = n_l / N``,
``p_l = q_l^alpha / sum_k q_k^alpha`` and the share of ``N`` tokens actually streamed through the
loader (packed CLM rows, one process, one slot). ``--json`` prints exactly
``{"languages": [{"lang", "tokens", "q", "p", "realised"}, ...]}``.

Hooked into the CLI with ``add_mix_parser(subparsers)``; also runs alone as
``python -m data_pipeline.mix``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main_mix)
    return p


def main_mix(args: argparse.Namespace) -> int:
    """Run ``mix`` for parsed ``args``; print the table (or JSON); return 0.

    Raises:
        ValueError, FileNotFoundError: bad input (the CLI turns them into one line, exit 2).
    """
    rows = language_mix(
        args.dir, alpha=args.alpha, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed
    )
    if args.json:
        print(json.dumps({"languages": rows}))
        return 0
    print(f"alpha {args.alpha}, realised over {args.tokens:,} tokens")
    print(f"{'language':<10}{'tokens':>14}{'q':>9}{'p':>9}{'realised':>10}")
    for r in rows:
        print(
            f"{r['lang']:<10}{r['tokens']:>14,}{r['q']:>9.4f}{r['p']:>9.4f}{r['realised']:>10.4f}"
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
