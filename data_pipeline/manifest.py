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

Synthetic pairs (``data_pipeline.backtranslate``): the pair set says ``"synthetic": true`` and
holds its ``"provenance"``; its shard entries say ``"synthetic": true`` too. ``merge_manifests``
keeps a synthetic set apart from a real set of the same name: it becomes ``"<name>+synthetic"``
(``SYNTHETIC_SUFFIX``) in ``pairs`` and in its shard entries' ``"pair"``, the name the loader
samples and counts it under (``data.synthetic_ratio``, ``data.parallel_upsample``), with its
``src``/``tgt``, counts and provenance; the real ``"<name>"`` keeps only real shards and counts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "rosetta-shards/1"
SYNTHETIC_SUFFIX = "+synthetic"
"""Appended by ``merge_manifests`` to the name of a synthetic pair set merged beside a real set of
the same name (``en-de`` and ``en-de+synthetic``); the loader's source name for it."""


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
        width = max(10, 2 + max(map(len, manifest["pairs"])))
        lines += [
            "",
            f"{'pair':<{width}}{'pairs':>12}{'src tokens':>14}{'tgt tokens':>14}{'samples':>9}"
            f"{'shards':>8}{'rejected':>10}",
        ]
        for name, v in sorted(manifest["pairs"].items()):
            lines.append(
                f"{name:<{width}}{v['documents']:>12,}{v['src_tokens']:>14,}{v['tgt_tokens']:>14,}"
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


def _pair_set_kinds(directory: Path, manifest: dict) -> dict[str, bool]:
    """Pair set name -> True when the set is synthetic, for every set of one part (named in
    ``pairs`` or by a shard entry), by the loader's rule: shard entries' ``"synthetic"`` flags
    when any entry of the set has one (an entry without it is real), else the set's own flag.

    Raises:
        ValueError: one set holds both real and synthetic shards.
    """
    shards: dict[str, list[dict]] = {}
    for entry in manifest["shards"]:
        if entry["kind"] != "mono":
            shards.setdefault(entry["pair"], []).append(entry)
    kinds = {}
    for name in sorted(set(manifest["pairs"]) | set(shards)):
        own = bool(manifest["pairs"].get(name, {}).get("synthetic", False))
        mine = shards.get(name, [])
        keyed = any("synthetic" in e for e in mine)
        flags = {bool(e.get("synthetic", False)) if keyed else own for e in mine} or {own}
        if len(flags) == 2:
            raise ValueError(
                f"merge: pair set {name!r} of {str(directory)!r} holds real and synthetic shards "
                "in one entry (merged before they were kept apart): merge its parts again"
            )
        kinds[name] = flags.pop()
    return kinds


def merge_manifests(parts: list[str | os.PathLike], *, out: str | os.PathLike) -> dict:
    """Write ``out/manifest.json`` listing the shards of several shard directories.

    For a job split into parts (e.g. ``launch.preprocess`` array tasks writing ``out/part_<i>``),
    or real and back-translated data joined: shard paths become relative to ``out``,
    per-language and per-pair counts are summed, and the first part's tokenizer is copied to
    ``out/tokenizer``. Shards are not copied or moved. Real and synthetic pair sets never share
    an entry: a synthetic set whose name also names a real set (in any part) is merged as
    ``<name>+synthetic`` (``SYNTHETIC_SUFFIX``), its shard entries renamed alike.

    Raises:
        FileNotFoundError: a part has no manifest.
        ValueError: no parts, parts with different tokenizers or token dtypes, the same shard
            listed twice, a pair set holding both real and synthetic shards (a merge made before
            they were kept apart), or two synthetic sets of one name with different provenance.
    """
    if not parts:
        raise ValueError("merge: give at least one shard directory")
    out = Path(out)
    loaded = [(manifest_path(p).parent, load_manifest(p)) for p in parts]
    first_dir, first = loaded[0]
    merged: dict = {k: v for k, v in first.items() if k not in ("languages", "pairs", "shards")}
    merged.update(languages={}, pairs={}, shards=[])
    kinds = [_pair_set_kinds(directory, manifest) for directory, manifest in loaded]
    real = {name for part in kinds for name, fake in part.items() if not fake}
    suffixed = {name for part in kinds for name in part if name.endswith(SYNTHETIC_SUFFIX)}

    def merged_name(name: str, fake: bool) -> str:
        base = name.removesuffix(SYNTHETIC_SUFFIX)
        if fake and (base in real or base + SYNTHETIC_SUFFIX in suffixed):
            return base + SYNTHETIC_SUFFIX
        return name

    seen: set[str] = set()
    for (directory, manifest), part_kinds in zip(loaded, kinds):
        for key in ("model_sha256", "vocab_size"):
            if manifest["tokenizer"][key] != first["tokenizer"][key]:
                raise ValueError(
                    f"manifest {str(directory)!r}: tokenizer {key} {manifest['tokenizer'][key]} "
                    f"differs from {first['tokenizer'][key]} in {str(first_dir)!r}: parts must "
                    "share one tokenizer"
                )
        for name, stats in manifest["languages"].items():
            _add_counts(merged["languages"].setdefault(name, {}), stats)
        for name, stats in manifest["pairs"].items():
            into = merged["pairs"].setdefault(merged_name(name, part_kinds[name]), {})
            if into and part_kinds[name] and into.get("provenance") != stats.get("provenance"):
                raise ValueError(
                    f"merge: synthetic pair set {name!r} of {str(directory)!r} has a provenance "
                    "other than that of the set of its name merged before it, and one entry "
                    "keeps one provenance: merge each back-translation job's output apart"
                )
            _add_counts(into, stats)
        for entry in manifest["shards"]:
            path = Path(os.path.relpath((directory / entry["path"]).resolve(), out.resolve()))
            if path.as_posix() in seen:
                raise ValueError(f"merge: shard {path.as_posix()!r} is listed twice")
            seen.add(path.as_posix())
            entry = {**entry, "path": path.as_posix()}
            if entry["kind"] != "mono" and part_kinds[entry["pair"]]:
                entry.update(pair=merged_name(entry["pair"], True), synthetic=True)
            merged["shards"].append(entry)
    out.mkdir(parents=True, exist_ok=True)  # after every check: a refused merge writes nothing
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
