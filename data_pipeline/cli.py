"""``python -m data_pipeline``: the data engineer's commands, thin wrappers over the API.

Exit codes: 0 done; 2 bad input (one line on stderr, no traceback: a bad option, a truncated or
corrupt ``.zst``/``.gz`` file, a TSV without tabs, line-aligned files of different lengths, an
``--out`` that is a file, a bad Megatron ``.bin``/``.idx``) or, for ``verify``, a faulty shard
directory (one line per fault).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NoReturn

from data_pipeline import backtranslate as bt
from data_pipeline.manifest import load_manifest, merge_manifests, summary_lines
from data_pipeline.megatron_dataset import (
    DEFAULT_SHARD_TOKENS,
    TOKEN_DTYPE_NAMES,
    export_megatron,
    import_megatron,
)
from data_pipeline.mix import add_mix_parser
from data_pipeline.shard import DEFAULT_SHARD_TEXT_MB, ShardSettings, default_workers, run_shard_job
from data_pipeline.shard_format import DEFAULT_SAMPLE_TOKENS
from data_pipeline.text_inputs import (
    DEFAULT_MAX_DOC_BYTES,
    FORMATS,
    parse_mono_specs,
    parse_pair_specs,
)
from data_pipeline.tokenizer import (
    DEFAULT_SAMPLE_CHARS,
    DEFAULT_SENTINELS,
    MODEL_TYPES,
    train_tokenizer,
)
from data_pipeline.verify import verify_directory

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other Rosetta error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see --help)\n")


def _add_reader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="monolingual input format: lines (one document per line), blank (blank-line "
        "separated), jsonl; auto = jsonl for *.jsonl/*.json, else lines (default: auto)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field with the document")
    p.add_argument(
        "--max-doc-bytes",
        type=int,
        default=DEFAULT_MAX_DOC_BYTES,
        help="skip (and count) documents longer than this many UTF-8 bytes (default: 4 MiB)",
    )


def _add_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parallel",
        action="append",
        metavar="SRC-TGT=PATH.tsv",
        help="parallel text: TSV (source<TAB>target), SRC-TGT=SRC_FILE,TGT_FILE (line-aligned), "
        "or a TSV PATH with {src} and {tgt}; repeatable",
    )


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    meta = train_tokenizer(
        parse_mono_specs(args.input or []),
        pairs=parse_pair_specs(args.parallel or []),
        vocab_size=args.vocab_size,
        out=args.out,
        alpha=args.alpha,
        model_type=args.model_type,
        num_sentinels=args.sentinels,
        sample_chars=args.sample_chars,
        character_coverage=args.character_coverage,
        seed=args.seed,
        fmt=args.format,
        text_field=args.text_field,
        max_doc_bytes=args.max_doc_bytes,
        num_threads=args.threads,
    )
    print(
        f"tokenizer {args.out}: vocab {meta['vocab_size']}, {len(meta['languages'])} languages, "
        f"alpha {meta['alpha']}, {time.perf_counter() - start:.1f} s"
    )
    print(f"{'language':<10}{'characters':>14}{'q':>8}{'p':>8}{'sampled':>14}")
    for lang, s in meta["sample"]["languages"].items():
        print(f"{lang:<10}{s['n']:>14,}{s['q']:>8.3f}{s['p']:>8.3f}{s['sampled']:>14,}")
    _print_rejects({"all inputs": meta["rejected"]})
    return 0


def _print_rejects(rejected: dict[str, dict[str, int]]) -> None:
    for name, counts in rejected.items():
        if any(counts.values()):
            detail = ", ".join(f"{n} {reason}" for reason, n in counts.items() if n)
            print(f"skipped input in {name}: {detail}")


def _cmd_shard(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if not args.shard_text_mb > 0:
        raise ValueError(f"--shard-text-mb ({args.shard_text_mb}) must be > 0")
    settings = ShardSettings(
        sample_tokens=args.sample_tokens,
        shard_text_bytes=max(1, int(args.shard_text_mb * (1 << 20))),
        fmt=args.format,
        text_field=args.text_field,
        max_doc_bytes=args.max_doc_bytes,
    )
    manifest = run_shard_job(
        parse_mono_specs(args.input or []),
        pairs=parse_pair_specs(args.parallel or []),
        tokenizer=args.tokenizer,
        out=args.out,
        workers=args.workers,
        settings=settings,
        log=(lambda line: None) if args.quiet else None,
    )
    elapsed = time.perf_counter() - start
    tokens = sum(e["tokens"] for e in manifest["shards"])
    print("\n".join(summary_lines(manifest)))
    _print_rejects(
        {k: v["rejected"] for k, v in {**manifest["languages"], **manifest["pairs"]}.items()}
    )
    print(f"wrote {args.out}/manifest.json: {tokens:,} tokens in {elapsed:.1f} s")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    problems, manifest = verify_directory(args.dir)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    samples = sum(e["samples"] for e in manifest["shards"])
    print(f"ok: {len(manifest['shards'])} shards, {samples} samples verified in {args.dir}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    if args.json:
        summary = {k: manifest[k] for k in ("languages", "pairs", "dtype", "tokenizer")}
        summary["num_shards"] = len(manifest["shards"])
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print("\n".join(summary_lines(manifest)))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    manifest = merge_manifests(args.parts, out=args.out)
    print("\n".join(summary_lines(manifest)))
    print(f"wrote {args.out}/manifest.json over {len(args.parts)} part(s)")
    return 0


def _cmd_export_megatron(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    outputs = export_megatron(
        args.shards,
        out=args.out,
        langs=args.lang,
        merged=args.merged,
        append_eod=args.append_eod,
        dtype=args.dtype,
        log=print,
    )
    for o in outputs:
        print(
            f"wrote {o['prefix']}.bin/.idx ({', '.join(o['langs'])}): {o['documents']:,} "
            f"documents, {o['tokens']:,} tokens, {o['dtype']}"
        )
    print(f"exported {len(outputs)} dataset(s) in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_import_megatron(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = import_megatron(
        args.prefix,
        lang=args.lang,
        out=args.out,
        tokenizer=args.tokenizer,
        sample_tokens=args.sample_tokens,
        shard_tokens=args.shard_tokens,
    )
    print("\n".join(summary_lines(manifest)))
    _print_rejects({args.lang: manifest["languages"][args.lang]["rejected"]})
    print(f"wrote {args.out}/manifest.json in {time.perf_counter() - start:.1f} s")
    return 0


def _parse_part(value: str) -> tuple[int, int]:
    task, sep, tasks = value.partition("/")
    if not (sep and task.isdigit() and tasks.isdigit() and int(task) < int(tasks)):
        raise ValueError(f"--part {value!r} must be I/N with 0 <= I < N")
    return int(task), int(tasks)


def _cmd_backtranslate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = bt.BTSettings(
        shard_docs=args.shard_docs,
        batch_tokens=args.batch_tokens,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        tag=args.tag,
        keep_text=args.keep_text,
        seed=args.seed,
        sample_tokens=args.sample_tokens,
        fmt=args.format,
        text_field=args.text_field,
        max_doc_bytes=args.max_doc_bytes,
        decode=bt.parse_decode(args.decode),
    )
    settings.check()
    part = _parse_part(args.part) if args.part else (0, 1)
    if args.finalize and args.part:
        raise ValueError("--finalize translates nothing: give it without --part")
    inputs = bt.parse_inputs(args.input or [])
    translator = bt.make_translator(
        args.translator,
        bt.translator_options(
            settings, timeout_s=args.timeout, threads=args.workers, target=args.to
        ),
    )
    rank, world_size, barrier, close = bt.torchrun_share()
    try:
        manifest = bt.run_backtranslate(
            inputs,
            translator=translator,
            tokenizer=args.tokenizer,
            to=args.to,
            out=args.out,
            settings=settings,
            part=part,
            rank=rank,
            world_size=world_size,
            translate=not args.finalize,
            finalize=rank == 0 and not args.part,
            barrier=barrier,
            workers=args.workers or 1,
            log=(lambda line: None) if args.quiet else None,
        )
    finally:
        close()
    elapsed = time.perf_counter() - start
    if manifest is None:
        print(f"rank {rank} of part {part[0]}/{part[1]}: done in {elapsed:.1f} s (no manifest)")
        return 0
    print("\n".join(summary_lines(manifest)))
    _print_rejects({k: v["rejected"] for k, v in manifest["pairs"].items()})
    print(f"wrote {args.out}/manifest.json: synthetic pairs {', '.join(manifest['pairs'])} in "
          f"{elapsed:.1f} s")  # fmt: skip
    return 0


def _add_backtranslate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backtranslate",
        help="translate monolingual text into synthetic parallel shards",
        description="Translate each --input language's documents into --to with a translator "
        "and write the pairs (source: the translation, target: the original) as parallel "
        "shards of pair sets <to>-<lang>, marked synthetic with their provenance. Pairs are "
        "filtered as fairseq's back-translation (empty translation, a side over "
        "max-len-a * original + max-len-b tokens, length ratio > 1.5; tokens of --tokenizer). "
        "Under torchrun every rank translates its share of the chunks and rank 0 writes the "
        "manifest. Re-running keeps finished chunks. Backends: apertium:PAIR (Debian's "
        "apertium, e.g. apertium:spa-eng), hf:DIR (a transformers seq2seq or causal-LM "
        "directory with safetensors weights), reverse: (a fake for tests), and any registered "
        "from outside (data_pipeline.backtranslate.register_backend, or a "
        "'rosetta.translators' entry point).",
    )
    p.add_argument("--translator", required=True, metavar="BACKEND:ARG")
    p.add_argument("--tokenizer", required=True, help="the run's tokenizer (of the shards written)")
    p.add_argument(
        "--input",
        action="append",
        metavar="LANG=PATH|SHARDS",
        help="a language's text (file or glob, as shard takes it) or a shard directory whose "
        "mono documents of LANG are decoded with its own tokenizer; repeatable",
    )
    p.add_argument("--to", required=True, metavar="LANG", help="the language translated into")
    p.add_argument("--out", required=True, help="shard directory to write")
    p.add_argument(
        "--decode",
        default="greedy",
        help="greedy | beam:N | sample[:top_k=K,top_p=P,temperature=T] (default: greedy; "
        "sampling without top_k is unrestricted, fairseq's --sampling)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=bt.DEFAULT_BATCH_TOKENS,
        help=f"padded tokens per translator call (default: {bt.DEFAULT_BATCH_TOKENS})",
    )
    p.add_argument("--max-len-a", type=float, default=bt.DEFAULT_MAX_LEN_A)
    p.add_argument(
        "--max-len-b",
        type=int,
        default=bt.DEFAULT_MAX_LEN_B,
        help="generation and the length filter stop at max-len-a * source tokens + max-len-b "
        f"(default: {bt.DEFAULT_MAX_LEN_A:g} and {bt.DEFAULT_MAX_LEN_B})",
    )
    p.add_argument("--tag", action="store_true", help="put the <bt> token before every source")
    p.add_argument(
        "--keep-text",
        action="store_true",
        help="also write text/<to>-<lang>.tsv (original TAB translation per kept pair)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="chunks translated at once (apertium: processes; default 1); hf: torch threads "
        "(default: torch's)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--shard-docs",
        type=int,
        default=bt.DEFAULT_SHARD_DOCS,
        help=f"input documents per output shard (default: {bt.DEFAULT_SHARD_DOCS:,})",
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=DEFAULT_SAMPLE_TOKENS,
        help=f"target tokens per sample (default: {DEFAULT_SAMPLE_TOKENS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=bt.DEFAULT_TIMEOUT_S,
        help=f"seconds a subprocess translator may take per batch (default: "
        f"{bt.DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="translate only the chunks of array task I of N and write no manifest "
        "(launch.preprocess backtranslate runs these, then --finalize)",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="translate nothing: write the manifest once every chunk is finished",
    )
    p.add_argument("--quiet", action="store_true", help="no line per shard")
    _add_reader_args(p)
    p.set_defaults(func=_cmd_backtranslate)


def _add_megatron_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-megatron",
        help="write mono shards as Megatron indexed datasets (.bin + .idx)",
        description="Write the mono documents of a shard directory as Megatron-LM indexed "
        "datasets, one sequence per document: OUT_<lang>.bin/.idx per language, or a single "
        "OUT.bin/.idx when one --lang is given or with --merged (languages in sorted order). "
        "Pair shards are not exported. The tokenizer is copied to tokenizer/ beside OUT.",
    )
    p.add_argument("shards", help="shard directory (or its manifest.json)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    p.add_argument(
        "--lang",
        action="append",
        metavar="L",
        help="export this language (repeatable; default: every language)",
    )
    p.add_argument(
        "--merged", action="store_true", help="one dataset OUT over the chosen languages"
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help="end each document with the tokenizer's eos (as Megatron's preprocess_data.py "
        "--append-eod; GPT training on the files usually wants it)",
    )
    p.add_argument(
        "--dtype",
        choices=TOKEN_DTYPE_NAMES,
        default=None,
        help="id dtype (default: uint16 below 65,500 vocabulary entries, else int32, as "
        "Megatron's preprocessing)",
    )
    p.set_defaults(func=_cmd_export_megatron)

    p = sub.add_parser(
        "import-megatron",
        help="read a Megatron indexed dataset (.bin + .idx) into shards with a manifest",
        description="Read PREFIX.bin/.idx (one language) into a new shard directory with its "
        "manifest and tokenizer. A Megatron document (its sequences joined) becomes one "
        "document; a trailing eos is dropped (shards store their own), empty documents are "
        "skipped and counted. Ids must come from the tokenizer. Join directories with merge.",
    )
    p.add_argument("prefix", help="path prefix of the .bin and .idx files")
    p.add_argument("--lang", required=True, help="the language of the documents")
    p.add_argument("--out", required=True, help="shard directory to create (new or empty)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory the ids come from (default: tokenizer/ beside PREFIX, as "
        "export-megatron leaves it)",
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=DEFAULT_SAMPLE_TOKENS,
        help=f"target tokens per sample (default: {DEFAULT_SAMPLE_TOKENS})",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"start a new shard after this many tokens (default: {DEFAULT_SHARD_TOKENS:,})",
    )
    p.set_defaults(func=_cmd_import_megatron)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data_pipeline`` parser, one subcommand per job."""
    parser = _Parser(
        prog="python -m data_pipeline",
        description="Rosetta data jobs: tokenizer training, sharding, verification, inspection, "
        "merging array-job parts, the language mix a run will get, and Megatron indexed "
        "datasets out and in.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "train-tokenizer",
        help="train a sentencepiece tokenizer on an alpha-smoothed language sample",
        description="Train a sentencepiece tokenizer (byte fallback, identity normalisation) with "
        "Rosetta's special tokens on an alpha-smoothed sample of the input languages. Both sides "
        "of --parallel pairs count as text of their languages, so a language seen only in pairs "
        "is a language of the tokenizer.",
    )
    p.add_argument(
        "--input",
        action="append",
        metavar="LANG=PATH",
        help="a language's text: file or glob (.gz/.zst ok); or a PATH with {lang}; repeatable",
    )
    _add_parallel_arg(p)
    p.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument("--alpha", type=float, default=0.3, help="language smoothing (default: 0.3)")
    p.add_argument("--model-type", default="unigram", choices=MODEL_TYPES)
    p.add_argument(
        "--sentinels",
        type=int,
        default=DEFAULT_SENTINELS,
        help=f"span-corruption sentinel tokens (default: {DEFAULT_SENTINELS})",
    )
    p.add_argument(
        "--sample-chars",
        type=int,
        default=DEFAULT_SAMPLE_CHARS,
        help=f"characters in the training sample at most (default: {DEFAULT_SAMPLE_CHARS:,})",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="trainer threads (default: all)")
    _add_reader_args(p)
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser(
        "shard",
        help="tokenize text into webdataset shards with a manifest",
        description="Tokenize monolingual and parallel text into webdataset tar shards of one "
        "language (pair) each, and write manifest.json. Re-running skips finished shards.",
    )
    p.add_argument("--tokenizer", required=True, help="directory from train-tokenizer")
    p.add_argument(
        "--input",
        action="append",
        metavar="LANG=PATH",
        help="a language's text: file or glob (.gz/.zst ok); or a PATH with {lang}; repeatable",
    )
    _add_parallel_arg(p)
    p.add_argument("--out", required=True, help="shard directory to write")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes (default: all cores, here {default_workers()})",
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=DEFAULT_SAMPLE_TOKENS,
        help=f"target tokens per sample (default: {DEFAULT_SAMPLE_TOKENS})",
    )
    p.add_argument(
        "--shard-text-mb",
        type=float,
        default=DEFAULT_SHARD_TEXT_MB,
        help="start a new shard after this many MB of input text (default: "
        f"{DEFAULT_SHARD_TEXT_MB}: about 15-20 M tokens, shards of 20-30 MB)",
    )
    p.add_argument("--quiet", action="store_true", help="no line per shard")
    _add_reader_args(p)
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser(
        "verify",
        help="check every shard's sha256 and decode every sample",
        description="Check a shard directory: every shard's sha256, every sample decodes, counts "
        "agree with the manifest. Prints one line per faulty shard and exits 2 if any.",
    )
    p.add_argument("dir", help="shard directory (or its manifest.json)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "inspect",
        help="print languages, documents, tokens and pairs of a shard directory",
        description="Print a shard directory's languages, documents, tokens and pairs.",
    )
    p.add_argument("dir", help="shard directory (or its manifest.json)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "merge",
        help="one manifest over several shard directories (parts of one job)",
        description="Write OUT/manifest.json listing the shards of several shard directories "
        "(e.g. the part_<i> directories of an array job), with counts summed and paths relative "
        "to OUT. Shards stay where they are; the parts must share one tokenizer.",
    )
    p.add_argument("parts", nargs="+", help="shard directories (or their manifest.json)")
    p.add_argument("--out", required=True, help="directory for the merged manifest.json")
    p.set_defaults(func=_cmd_merge)
    add_mix_parser(sub)
    _add_megatron_parsers(sub)
    _add_backtranslate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; return the exit code (user mistakes give 2 and one line)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
