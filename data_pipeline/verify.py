"""``verify``: check a shard directory against its manifest, sample by sample.

What to call: ``verify_directory(dir) -> (faults, manifest)`` (``python -m data_pipeline verify``):
one line per fault (tokenizer, shard checksum, count, undecodable sample); no faults means every
sample decodes and every count and checksum of the manifest holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.manifest import load_manifest, manifest_path
from data_pipeline.shard import SHARD_NAME_RE
from data_pipeline.shard_format import MONO_EXT, PAIR_EXT, decode_sample, iter_raw_samples
from data_pipeline.tokenizer import load_tokenizer, sha256_file


def _check_shard(path: Path, entry: dict, *, vocab_size: int, dtype: str) -> str | None:
    """The first fault of one shard as a line, or None when it is sound."""
    name = entry["path"]
    if not path.is_file():
        return f"shard {name}: missing"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"shard {name}: sha256 {digest[:16]} != manifest {str(entry['sha256'])[:16]}"
    samples = documents = tokens = 0
    decompressor = zstandard.ZstdDecompressor()
    try:
        for key, meta, ext, payload in iter_raw_samples(path):
            where = f"shard {name} sample {key}"
            want = (MONO_EXT, "lang", entry.get("lang"))
            if entry["kind"] == "pair":
                want = (PAIR_EXT, "src", entry.get("pair", "-").split("-")[0])
            if meta.get("kind") != entry["kind"] or ext != want[0] or meta.get(want[1]) != want[2]:
                return (
                    f"{where}: kind/language {meta.get('kind')}/{meta.get(want[1])} "
                    f"!= manifest {entry['kind']}/{want[2]}"
                )
            if meta.get("dtype") != dtype:
                return f"{where}: dtype {meta.get('dtype')} != manifest {dtype}"
            sample = decode_sample(meta, payload=payload, where=where, decompressor=decompressor)
            arrays = (
                [sample["tokens"]]
                if entry["kind"] == "mono"
                else [sample["src_tokens"], sample["tgt_tokens"]]
            )
            for ids in arrays:
                if ids.size and int(np.max(ids)) >= vocab_size:
                    return f"{where}: token id {int(np.max(ids))} >= vocab size {vocab_size}"
                tokens += ids.size
            if "eos" in sample:  # stored after every document, and nowhere else
                if np.count_nonzero(sample["tokens"] == sample["eos"]) != sample["num_docs"]:
                    return f"{where}: eos {sample['eos']} inside a document"
                tokens -= sample["num_docs"]
            samples += 1
            documents += sample["num_docs"]
    except ValueError as err:
        return str(err)
    for what, got in (("samples", samples), ("documents", documents), ("tokens", tokens)):
        if got != entry.get(what):
            return f"shard {name}: {got} {what} != manifest {entry.get(what)}"
    return None


def verify_directory(directory: str | os.PathLike) -> tuple[list[str], dict]:
    """Check a shard directory: its tokenizer (present, loads, the manifest's sha256 and vocab
    size), and every shard: sha256, every sample decodes, counts match.

    Returns:
        ``(problems, manifest)``: one line per fault found (empty when all is well).

    Raises:
        FileNotFoundError: no manifest.json there.
        ValueError: the manifest is unreadable.
    """
    manifest = load_manifest(directory)
    root = manifest_path(directory).parent
    problems: list[str] = []
    tok = manifest.get("tokenizer", {})
    tok_dir = root / tok.get("dir", "tokenizer")
    # the trainer loads the tokenizer from here: a directory without it cannot be trained on
    try:
        loaded = load_tokenizer(tok_dir)
    except (FileNotFoundError, ValueError) as err:
        problems.append(str(err) if tok_dir.is_dir() else f"tokenizer {tok_dir}: missing")
    else:
        if loaded.model_sha256 != tok.get("model_sha256"):
            problems.append(
                f"tokenizer {tok_dir}: model sha256 {loaded.model_sha256[:16]} != manifest "
                f"{str(tok.get('model_sha256'))[:16]}"
            )
        if loaded.vocab_size != tok.get("vocab_size"):
            problems.append(
                f"tokenizer {tok_dir}: vocab size {loaded.vocab_size} != manifest "
                f"{tok.get('vocab_size')}"
            )
    vocab_size = int(tok.get("vocab_size", 1 << 32))
    listed = set()
    for entry in manifest["shards"]:
        listed.add(entry["path"])
        fault = _check_shard(
            root / entry["path"], entry, vocab_size=vocab_size, dtype=manifest["dtype"]
        )
        if fault:
            problems.append(fault)
    for kind, table, key in (
        ("mono", manifest["languages"], "lang"),
        ("pair", manifest["pairs"], "pair"),
    ):
        for name, stats in table.items():
            mine = [e for e in manifest["shards"] if e["kind"] == kind and e.get(key) == name]
            for what in ("documents", "tokens"):
                total = sum(e.get(what, 0) for e in mine)
                if total != stats.get(what):
                    problems.append(
                        f"manifest {kind} {name}: {what} {stats.get(what)} != sum over its "
                        f"shards {total}"
                    )
    for path in sorted(root.iterdir()):
        if SHARD_NAME_RE.match(path.name) and path.name not in listed:
            problems.append(f"shard {path.name}: in the directory but not in the manifest")
    return problems, manifest
