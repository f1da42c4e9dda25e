"""Tiny synthetic shard directories (no tokenizer needed) for loader tests and dry runs.

What to call: ``write_synthetic_shards(out, docs={lang: n}, pairs=...)`` for a shard directory
of random ids with a valid manifest, ``synthetic_vocab(size)`` for the ``transforms.Vocab`` that
goes with it.

Writes real Rosetta shards (``shard_format.ShardWriter``) and a manifest that
``manifest.load_manifest`` accepts, from random token ids, so that tests control every document.
Document ``i`` of language ``l`` lives in file ``<l>.txt`` with ordinal ``i`` (``source`` and
``first_doc`` in sample metadata), as the sharding job would record a one-document-per-line file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST_FORMAT, write_manifest
from data_pipeline.shard_format import (
    MONO_EXT,
    PAIR_EXT,
    ShardWriter,
    dtype_name,
    encode_mono_payload,
    encode_pair_payload,
)
from data_pipeline.transforms import Vocab

NUM_SPECIAL = 10
"""Ids 0..9 are special in synthetic data: pad 0, unk 1, bos 2, eos 3, mask 4, the rest tags."""
SYNTHETIC_EOS = 3


def synthetic_vocab(size: int = 512) -> Vocab:
    """The :class:`Vocab` of synthetic shards: even ids start words (whole-word masking)."""
    word_start_V = np.arange(size) % 2 == 0
    return Vocab(
        size=size,
        pad_id=0,
        eos_id=SYNTHETIC_EOS,
        mask_id=4,
        special_ids=tuple(range(NUM_SPECIAL)),
        word_start_V=word_start_V,
    )


def _docs(rng: np.random.Generator, num_docs: int, *, max_len: int, vocab: int) -> list:
    lengths = rng.integers(1, max_len + 1, num_docs)
    return [rng.integers(NUM_SPECIAL, vocab, n).astype(np.uint16) for n in lengths]


def _groups(lengths: list[int], *, sample_tokens: int) -> list[tuple[int, int]]:
    """Consecutive document ranges of about ``sample_tokens`` (a long document alone)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > sample_tokens:
            out.append((start, i))
            start, total = i, 0
        total += n
    out.append((start, len(lengths)))
    return out


def write_synthetic_shards(
    out: str | os.PathLike,
    *,
    docs: dict[str, int],
    pairs: dict[str, int] | None = None,
    sample_tokens: int = 256,
    samples_per_shard: int = 4,
    max_doc_len: int = 60,
    vocab_size: int = 512,
    seed: int = 0,
    store_eos: bool = True,
) -> dict:
    """Write mono (and pair) shards of random ids and their manifest under ``out``.

    Args:
        out: directory to create.
        docs: documents per language, e.g. ``{"en": 400, "el": 20}``.
        pairs: pairs per language pair, e.g. ``{"en-de": 100}``.
        sample_tokens: target tokens per sample; samples_per_shard: samples per shard.
        max_doc_len: documents (and each side of a pair) have 1..max_doc_len tokens.
        store_eos: mono samples as the sharding job writes them (each document followed by
            eos); False writes the earlier layout without eos, which readers still take.

    Returns:
        ``{"mono": {lang: [doc ids array, ...]}, "pairs": {name: [(src, tgt), ...]}}``: the
        documents written, in file order.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.dtype("<u2")
    shards, languages, pair_stats = [], {}, {}
    written: dict = {"mono": {}, "pairs": {}}

    def flush(name: str, kind: str, groups: list, make) -> int:
        num_shards = 0
        for first in range(0, len(groups), samples_per_shard):
            path = out / f"{kind}_{name}_{num_shards:05d}.tar"
            entry = {"path": path.name, "kind": kind, "samples": 0, "documents": 0, "tokens": 0}
            with ShardWriter(path, dtype=dtype) as writer:
                for lo, hi in groups[first : first + samples_per_shard]:
                    meta, payload, tokens = make(lo, hi)
                    ext = MONO_EXT if kind == "mono" else PAIR_EXT
                    writer.add_sample(meta, payload=payload, ext=ext)
                    entry["samples"] += 1
                    entry["documents"] += hi - lo
                    entry["tokens"] += tokens
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["bytes"] = path.stat().st_size
            shards.append((entry, name))
            num_shards += 1
        return num_shards

    for lang, num_docs in sorted(docs.items()):
        doc_list = _docs(rng, num_docs, max_len=max_doc_len, vocab=vocab_size)
        written["mono"][lang] = doc_list
        lengths = [len(d) for d in doc_list]

        def make_mono(lo: int, hi: int, doc_list=doc_list, lang=lang) -> tuple:
            # each document followed by eos, as the sharding job stores them
            eos = np.array([SYNTHETIC_EOS] if store_eos else [], dtype=dtype)
            ids = np.concatenate([part for d in doc_list[lo:hi] for part in (d, eos)])
            lengths = [len(d) + len(eos) for d in doc_list[lo:hi]]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            num_tokens = sum(len(d) for d in doc_list[lo:hi])
            meta = {
                "kind": "mono",
                "lang": lang,
                "source": f"{lang}.txt",
                "first_doc": lo,
                "num_docs": hi - lo,
                "num_tokens": num_tokens,
                "dtype": dtype_name(dtype),
                "chunk": "0" * 16,
            }
            if store_eos:
                meta["eos"] = SYNTHETIC_EOS
            return meta, encode_mono_payload(ids, doc_offsets=offsets), num_tokens

        groups = _groups(lengths, sample_tokens=sample_tokens)
        n = flush(lang, "mono", groups, make_mono)
        languages[lang] = {
            "documents": num_docs,
            "tokens": sum(lengths),
            "samples": len(groups),
            "shards": n,
            "rejected": {},
        }
    for name, num_pairs in sorted((pairs or {}).items()):
        src_lang, tgt_lang = name.split("-")
        src = _docs(rng, num_pairs, max_len=max_doc_len, vocab=vocab_size)
        tgt = _docs(rng, num_pairs, max_len=max_doc_len, vocab=vocab_size)
        written["pairs"][name] = list(zip(src, tgt))

        def make_pair(lo: int, hi: int, src=src, tgt=tgt, sl=src_lang, tl=tgt_lang) -> tuple:
            so = np.concatenate([[0], np.cumsum([len(d) for d in src[lo:hi]])])
            to = np.concatenate([[0], np.cumsum([len(d) for d in tgt[lo:hi]])])
            s, t = np.concatenate(src[lo:hi]), np.concatenate(tgt[lo:hi])
            meta = {
                "kind": "pair",
                "src": sl,
                "tgt": tl,
                "source": f"{sl}-{tl}.tsv",
                "first_doc": lo,
                "num_docs": hi - lo,
                "src_tokens": len(s),
                "tgt_tokens": len(t),
                "dtype": dtype_name(dtype),
                "chunk": "0" * 16,
            }
            payload = encode_pair_payload(s, src_offsets=so, tgt=t, tgt_offsets=to)
            return meta, payload, len(s) + len(t)

        lengths = [len(a) + len(b) for a, b in zip(src, tgt)]
        groups = _groups(lengths, sample_tokens=sample_tokens)
        n = flush(name, "pair", groups, make_pair)
        pair_stats[name] = {
            "src": src_lang,
            "tgt": tgt_lang,
            "documents": num_pairs,
            "tokens": sum(lengths),
            "src_tokens": int(sum(map(len, src))),
            "tgt_tokens": int(sum(map(len, tgt))),
            "samples": len(groups),
            "shards": n,
            "rejected": {},
        }
    entries = []
    for entry, name in shards:
        if entry["kind"] == "mono":
            entry["lang"] = name
        else:
            entry["pair"] = name
        entries.append(entry)
    write_manifest(
        out,
        {
            "format": MANIFEST_FORMAT,
            "tokenizer": {"dir": "tokenizer", "model_sha256": "0" * 64, "vocab_size": vocab_size},
            "dtype": dtype_name(dtype),
            "sample_tokens": sample_tokens,
            "shard_chars": 0,
            "languages": languages,
            "pairs": pair_stats,
            "shards": entries,
        },
    )
    return written
