"""Build the embedded multilingual sample corpus from Debian's LibreOffice help packages.

Not run by tests or ``make demo``: its output is committed under ``data_pipeline/sample/``.
Re-run it by hand (as root, with apt reaching Debian) to rebuild the corpus::

    python data_pipeline/sample/build_corpus.py --work /tmp/lo --out data_pipeline/sample

Steps: ``apt-get download libreoffice-help-<lang>`` for every language below, ``dpkg -x`` each
package, then read the HTML help pages under ``usr/share/libreoffice/help/<lang>/text/`` (in
Debian 12 they ship as pre-rendered ``.html``, not ``.xhp``). Every heading and paragraph carries
an id (``hd_id...`` / ``par_id...``) that is the same in every language, so ``(page, id)`` aligns
paragraphs across languages: one source gives monolingual text and en-X pairs.

Rules (all deterministic, no RNG state; choices hash the paragraph key):
- a paragraph whose text equals the English one is untranslated and is dropped (from the
  monolingual text and from the pairs); so are paragraphs with fewer than 2 words / 4 characters;
- exact duplicate texts (help pages embed each other's paragraphs) are kept once per language;
- validation split: a paragraph key whose sha1 falls in the lowest ``VALID_PERCENT`` percent;
- imbalance: each language keeps the fraction ``KEEP[lang]`` of its training paragraphs
  (chosen by hash) so that the largest and the smallest language differ by well over 10x;
- pairs: en-X for ``PAIR_LANGS``, from all aligned translated paragraphs (not subsampled),
  split into train/valid by the same key hash.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import zstandard

# code used in Rosetta -> Debian package suffix / help directory name
LANGS = {
    "en": ("en-us", "en-US"),
    "de": ("de", "de"),
    "fr": ("fr", "fr"),
    "es": ("es", "es"),
    "it": ("it", "it"),
    "pl": ("pl", "pl"),
    "ru": ("ru", "ru"),
    "el": ("el", "el"),
    "ja": ("ja", "ja"),
    "zh": ("zh-cn", "zh-CN"),
    "ko": ("ko", "ko"),
    "hi": ("hi", "hi"),
}
# Deliberate imbalance: high-resource languages keep everything, the tail is cut hard, the way
# web crawls look (fractions of each language's translated, deduplicated training paragraphs).
KEEP = {
    "en": 1.0,
    "de": 1.0,
    "fr": 0.7,
    "es": 0.5,
    "ru": 0.5,
    "ja": 0.3,
    "it": 0.3,
    "zh": 0.25,
    "pl": 0.2,
    "ko": 0.08,
    "hi": 0.3,
    "el": 0.04,
}
PAIR_LANGS = ("de", "fr", "es", "ru", "ja", "zh")
VALID_PERCENT = 5
# a validation split keeps the language's fraction too, but never fewer than this many
# paragraphs (when there are that many), so that every language's held-out loss means something
VALID_MIN = 200
# pairs per en-X set are capped to keep the committed corpus small (< 8 MB compressed)
MAX_TRAIN_PAIRS = 6000
MAX_VALID_PAIRS = 300
ID_RE = re.compile(r"^(par|hd)_id")
VOID = {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed", "source", "wbr"}
ZSTD_LEVEL = 19


class _HelpPageParser(html.parser.HTMLParser):
    """Collects ``{id: text}`` for every element whose id starts with ``par_id``/``hd_id``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._stack: list[tuple[str, str | None, bool]] = []  # (tag, para id, skip text)
        self._open: dict[str, list[str]] = {}

    def _skipping(self) -> bool:
        return any(skip for _, _, skip in self._stack)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        a = dict(attrs)
        elem_id = a.get("id") or ""
        # switchinline spans hold one variant per OS, all hidden; the help viewer shows the
        # "default" one, so keep that and drop the MAC/WIN/UNIX variants.
        skip = tag in ("script", "style") or ("hidden" in a and not elem_id.startswith("default"))
        para = elem_id if ID_RE.match(elem_id) and elem_id not in self._open else None
        if para is not None:
            self._open[para] = []
        self._stack.append((tag, para, skip))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        # tolerate unbalanced markup: pop up to the matching tag
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                for _, para, _ in self._stack[i:]:
                    if para is not None:
                        text = " ".join("".join(self._open.pop(para)).split())
                        self.paragraphs.setdefault(para, text)
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if self._skipping():
            return
        for parts in self._open.values():
            parts.append(data)


def parse_page(path: Path) -> dict[str, str]:
    """Return ``{paragraph id: whitespace-normalised text}`` of one help page."""
    parser = _HelpPageParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.paragraphs


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def _is_valid(key: str) -> bool:
    return _key_hash("valid:" + key) % 100 < VALID_PERCENT


def _keep(key: str, lang: str) -> bool:
    return (_key_hash(f"keep:{lang}:" + key) % 10_000) < KEEP[lang] * 10_000


def _usable(text: str) -> bool:
    return len(text) >= 4 and (len(text.split()) >= 2 or not text.isascii())


def fetch(work: Path) -> Path:
    """Download and unpack the help packages into ``work``; return the help root."""
    debs = work / "debs"
    root = work / "x"
    debs.mkdir(parents=True, exist_ok=True)
    pkgs = [f"libreoffice-help-{deb}" for deb, _ in LANGS.values()]
    subprocess.run(["apt-get", "download", *pkgs], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root / "usr/share/libreoffice/help"


def load_language(help_root: Path, dirname: str) -> dict[str, str]:
    """Return ``{"page/relpath#id": text}`` for one language."""
    base = help_root / dirname / "text"
    out: dict[str, str] = {}
    for page in sorted(base.rglob("*.html")):
        rel = page.relative_to(base).as_posix()
        for pid, text in parse_page(page).items():
            out[f"{rel}#{pid}"] = text
    return out


def _write_zst(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    os.replace(tmp, path)


def build(help_root: Path, out: Path) -> dict:
    """Write the corpus under ``out`` and return its statistics."""
    cache = help_root.parent / "rosetta_paragraphs.json"
    if cache.exists():
        texts = json.loads(cache.read_text())
    else:
        texts = {lang: load_language(help_root, d) for lang, (_, d) in LANGS.items()}
        cache.write_text(json.dumps(texts))
    english = texts["en"]
    stats: dict = {"languages": {}, "pairs": {}}
    (out / "mono").mkdir(parents=True, exist_ok=True)
    (out / "parallel").mkdir(parents=True, exist_ok=True)
    for lang, paras in texts.items():
        seen: set[str] = set()
        split: dict[str, list[str]] = {"train": [], "valid": []}
        valid_candidates: list[tuple[int, str, str]] = []
        counts = {"extracted": len(paras), "untranslated": 0, "duplicate": 0, "short": 0}
        counts["subsampled_out"] = 0
        for key in paras:  # page order, then reading order within a page
            text = paras[key]
            if lang != "en" and english.get(key) == text:
                counts["untranslated"] += 1
                continue
            if not _usable(text):
                counts["short"] += 1
                continue
            if text in seen:
                counts["duplicate"] += 1
                continue
            seen.add(text)
            if _is_valid(key):
                valid_candidates.append((_key_hash(f"keep:{lang}:" + key), key, text))
            elif _keep(key, lang):
                split["train"].append(text)
            else:
                counts["subsampled_out"] += 1
        # the paragraphs _keep() would pick come first in hash order; take at least VALID_MIN
        valid_candidates.sort()
        num_valid = max(round(KEEP[lang] * len(valid_candidates)), VALID_MIN)
        picked = sorted(valid_candidates[:num_valid], key=lambda c: c[1])
        split["valid"] = [text for _, _, text in picked]
        counts["subsampled_out"] += len(valid_candidates) - len(picked)
        for name, lines in split.items():
            _write_zst(out / "mono" / f"{lang}.{name}.txt.zst", lines)
            counts[f"{name}_documents"] = len(lines)
            counts[f"{name}_chars"] = sum(len(line) for line in lines)
        counts["keep_fraction"] = KEEP[lang]
        stats["languages"][lang] = counts
    for lang in PAIR_LANGS:
        seen_pairs: set[tuple[str, str]] = set()
        split = {"train": [], "valid": []}
        for key in texts[lang]:
            src, tgt = english.get(key), texts[lang][key]
            if src is None or src == tgt or not (_usable(src) and _usable(tgt)):
                continue
            if (src, tgt) in seen_pairs:
                continue
            seen_pairs.add((src, tgt))
            assert "\t" not in src + tgt, key  # whitespace was normalised by the parser
            split["valid" if _is_valid(key) else "train"].append(f"{src}\t{tgt}")
        # a deterministic subset, spread over all pages (hash order), not the first pages
        for name, cap in (("train", MAX_TRAIN_PAIRS), ("valid", MAX_VALID_PAIRS)):
            lines = split[name]
            if len(lines) > cap:
                chosen = set(sorted(lines, key=lambda line: _key_hash("pair:" + line))[:cap])
                split[name] = [line for line in lines if line in chosen]
        for name, lines in split.items():
            _write_zst(out / "parallel" / f"en-{lang}.{name}.tsv.zst", lines)
        stats["pairs"][f"en-{lang}"] = {f"{k}_pairs": len(v) for k, v in split.items()}
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch dir for .deb files")
    ap.add_argument("--out", type=Path, required=True, help="usually data_pipeline/sample")
    ap.add_argument("--help-root", type=Path, help="already unpacked .../libreoffice/help")
    args = ap.parse_args()
    help_root = args.help_root or fetch(args.work)
    stats = build(help_root, args.out)
    # the licence texts and Debian's copyright statement travel with the data
    licences = Path("/usr/share/common-licenses")
    shutil.copyfile(licences / "MPL-2.0", args.out / "LICENSE-MPL-2.0.txt")
    shutil.copyfile(licences / "Apache-2.0", args.out / "LICENSE-Apache-2.0.txt")
    copyright_file = help_root.parents[1] / "doc" / "libreoffice-help-en-us" / "copyright"
    shutil.copyfile(copyright_file, args.out / "DEBIAN-COPYRIGHT.txt")
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    json.dump(stats, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
