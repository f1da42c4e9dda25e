"""The shard directory's ``manifest.json``: what was written, with checksums and counts.

What to call: ``load_manifest(path)`` (a directory or its ``manifest.json``; checked),
``write_manifest(dir, manifest)`` (atomic: written whole or not at all), ``merge_manifests`` (the
parts of an array job), ``summary_lines`` (what ``inspect`` prints).

Layout (keys sorted on disk; no timestamps or absolute paths, so the same inputs give the same
bytes)::

    {
      "format": "rosetta-shards/1",
      "tokenizer": {"dir": "tokenizer", "model_sha256": "...", "vocab_size": 8000},
      "dtype": "uint16",
      "sample_tokens": 32768,
      "shard_text_bytes": 67108864,
      "languages": {"en": {"documents": int, "tokens": int, "samples": int, "shards": int,
                           "rejected": {"invalid_utf8": int, "empty": int, "too_long": int, ...}}},
      "pairs": {"en-de": {"src": "en", "tgt": "de", "documents": int (pairs), "tokens": int
                          (src + tgt), "src_tokens": int, "tgt_tokens": int, "samples": int,
                          "shards": int, "rejected": {...}}},
      "shards": [{"path": "mono_en_00000.tar", "kind": "mono", "lang": "en", "sha256": "...",
                  "bytes": int, "samples": int, "documents": int, "tokens": int}, ...]
    }

Pair shard entries carry ``"pair": "en-de"`` instead of ``"lang"``, plus ``src_tokens`` and
``tgt_tokens``. Shard paths are relative to the manifest's directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "rosetta-shards/1"


def manifest_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a file, else ``path/manifest.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / MANIFEST_FILE


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest`` to ``directory/manifest.json`` atomically; return its path."""
    final = Path(directory) / MANIFEST_FILE
    tmp = final.with_name(f".{MANIFEST_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, final)
    return final


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and check a manifest (a ``manifest.json`` or the directory holding it).

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: not JSON, or not a Rosetta shard manifest (format, required keys).
    """
    file = manifest_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"manifest {str(file)!r}: no such file")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"manifest {str(file)!r} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {str(file)!r} must have format {MANIFEST_FORMAT!r}")
    for key, kind in (("languages", dict), ("pairs", dict), ("shards", list), ("dtype", str)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"manifest {str(file)!r}: key {key!r} must be a {kind.__name__}")
    for entry in manifest["shards"]:
        if not isinstance(entry, dict) or not {"path", "kind", "sha256"} <= entry.keys():
            raise ValueError(
                f"manifest {str(file)!r}: shard entry {entry!r} lacks path/kind/sha256"
            )
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """Human-readable table of a manifest: languages, pairs, shards and totals."""
    lines = [
        f"tokenizer: vocab {manifest['tokenizer']['vocab_size']}, dtype {manifest['dtype']}, "
        f"model sha256 {manifest['tokenizer']['model_sha256'][:12]}",
        f"{len(manifest['shards'])} shards, target {manifest['sample_tokens']} tokens per sample",
        "",
        f"{'language':<10}{'documents':>12}{'tokens':>14}{'share':>8}{'samples':>9}"
        f"{'shards':>8}{'rejected':>10}",
    ]
    langs = manifest["languages"]
    total_tokens = sum(v["tokens"] for v in langs.values()) or 1
    for lang, v in sorted(langs.items()):
        lines.append(
            f"{lang:<10}{v['documents']:>12,}{v['tokens']:>14,}{v['tokens'] / total_tokens:>8.1%}"
            f"{v['samples']:>9,}{v['shards']:>8}{sum(v['rejected'].values()):>10,}"
        )
    if langs:
        lines.append(
            f"{'total':<10}{sum(v['documents'] for v in langs.values()):>12,}"
            f"{sum(v['tokens'] for v in langs.values()):>14,}"
        )
    if manifest["pairs"]:
        lines += [
            "",
            f"{'pair':<10}{'pairs':>12}{'src tokens':>14}{'tgt tokens':>14}{'samples':>9}"
            f"{'shards':>8}{'rejected':>10}",
        ]
        for name, v in sorted(manifest["pairs"].items()):
            lines.append(
                f"{name:<10}{v['documents']:>12,}{v['src_tokens']:>14,}{v['tgt_tokens']:>14,}"
                f"{v['samples']:>9,}{v['shards']:>8}{sum(v['rejected'].values()):>10,}"
            )
    return lines


def _add_counts(total: dict, part: dict) -> None:
    for key, value in part.items():
        if key == "rejected":
            into = total.setdefault("rejected", {})
            for reason, n in value.items():
                into[reason] = into.get(reason, 0) + n
        elif key == "sources":
            total["sources"] = sorted(set(total.get("sources", [])) | set(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total.setdefault(key, value)


def merge_manifests(parts: list[str | os.PathLike], *, out: str | os.PathLike) -> dict:
    """Write ``out/manifest.json`` listing the shards of several shard directories.

    For a job split into parts (e.g. ``launch.preprocess`` array tasks writing ``out/part_<i>``):
    shard paths become relative to ``out``, per-language and per-pair counts are summed, and the
    first part's tokenizer is copied to ``out/tokenizer``. Shards are not copied or moved.

    Raises:
        FileNotFoundError: a part has no manifest.
        ValueError: no parts, parts with different tokenizers or token dtypes, or the same shard
            listed twice.
    """
    if not parts:
        raise ValueError("merge: give at least one shard directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [(manifest_path(p).parent, load_manifest(p)) for p in parts]
    first_dir, first = loaded[0]
    merged: dict = {k: v for k, v in first.items() if k not in ("languages", "pairs", "shards")}
    merged.update(languages={}, pairs={}, shards=[])
    seen: set[str] = set()
    for directory, manifest in loaded:
        for key in ("model_sha256", "vocab_size"):
            if manifest["tokenizer"][key] != first["tokenizer"][key]:
                raise ValueError(
                    f"manifest {str(directory)!r}: tokenizer {key} {manifest['tokenizer'][key]} "
                    f"differs from {first['tokenizer'][key]} in {str(first_dir)!r}: parts must "
                    "share one tokenizer"
                )
        for table in ("languages", "pairs"):
            for name, stats in manifest[table].items():
                _add_counts(merged[table].setdefault(name, {}), stats)
        for entry in manifest["shards"]:
            path = Path(os.path.relpath((directory / entry["path"]).resolve(), out.resolve()))
            if path.as_posix() in seen:
                raise ValueError(f"merge: shard {path.as_posix()!r} is listed twice")
            seen.add(path.as_posix())
            merged["shards"].append({**entry, "path": path.as_posix()})
    src_tok = first_dir / first["tokenizer"].get("dir", "tokenizer")
    dst_tok = out / "tokenizer"
    if src_tok.resolve() != dst_tok.resolve() and src_tok.is_dir():
        dst_tok.mkdir(exist_ok=True)
        for file in sorted(src_tok.iterdir()):
            tmp = dst_tok / f".{file.name}.tmp-{os.getpid()}"
            shutil.copyfile(file, tmp)
            os.replace(tmp, dst_tok / file.name)
    merged["tokenizer"] = {**first["tokenizer"], "dir": "tokenizer"}
    write_manifest(out, merged)
    return merged
