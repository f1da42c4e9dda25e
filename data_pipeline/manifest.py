"""The shard directory's ``manifest.json``: what was written, with checksums and counts.

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
