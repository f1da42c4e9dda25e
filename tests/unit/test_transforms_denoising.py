"""BART / mBART denoising on real documents of the sample corpus: text infilling (masked share,
Poisson(3) span lengths, one mask per span, insertions), sentence permutation, rotation, and
mBART's language tag; each checked against a rule written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.transforms import (
    BART_DENOISING,
    MBART_DENOISING,
    DenoisingConfig,
    Vocab,
    decoder_inputs,
    denoise,
    rotate_document,
    sentence_end_table,
    sentence_end_table_from_tokenizer,
    text_infill,
    word_starts,
)
from tests.sample_data import SAMPLE, first_lines

LANGS = ("en", "de", "ja")
# chi-square 0.999 quantiles (no scipy here): a false alarm once in a thousand seeds
CHI2_999 = {9: 27.877, 10: 29.588}


@pytest.fixture(scope="module")
def docs(tok_dir: Path) -> list[np.ndarray]:
    """Real documents, each ending in eos: every 4 sample lines of a language make one."""
    tok = load_tokenizer(str(tok_dir))
    eos = tok.special_ids["eos"]
    out = []
    for lang in LANGS:
        lines = first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 160)
        for i in range(0, len(lines), 4):
            ids = [t for line in tok.encode(lines[i : i + 4]) for t in line]
            out.append(np.array(ids + [eos], dtype=np.int64))
    return out


def _infill(doc: np.ndarray, vocab: Vocab, rng: np.random.Generator, ratio: float = 0.3):
    special = vocab.special_mask_V()[doc]
    starts = word_starts(doc[None], vocab=vocab, max_word_pieces=8)[0]
    source, spans = text_infill(
        doc,
        rng=rng,
        word_start_N=starts,
        maskable_N=~special,
        mask_id=vocab.mask_id,
        mask_ratio=ratio,
        poisson_lambda=3.0,
    )
    return source, spans, starts, special


def ref_infilled(doc: list[int], starts: list, ends: list, inserts: list, mask: int) -> list:
    """Each span's first token as one mask, its other tokens gone; masks at the insertions."""
    out = []
    for t, token in enumerate(doc):
        inside = any(s < t < e for s, e in zip(starts, ends))
        if inside:
            continue
        out.append(mask if t in starts else token)
    result, rest = [], iter(out)
    for pos in range(len(out) + len(inserts)):
        result.append(mask if pos in inserts else next(rest))
    return result


def ref_sentences(doc: list[int], ends: set[int], eos: int) -> list[tuple]:
    """Sentences of the body (all but a final eos): a sentence ends after an end token not
    followed by another end token, and at the end of the body."""
    body = doc[:-1] if doc and doc[-1] == eos else doc
    out, current = [], []
    for t, token in enumerate(body):
        current.append(token)
        following_is_end = t + 1 < len(body) and body[t + 1] in ends
        if token in ends and not following_is_end:
            out.append(tuple(current))
            current = []
    if current:
        out.append(tuple(current))
    return out


def as_concatenation(body: list[int], sentences: list[tuple]) -> list[int] | None:
    """An order of all ``sentences`` whose concatenation is ``body`` (depth-first), or None."""

    def search(at: int, left: frozenset) -> list[int] | None:
        if not left:
            return [] if at == len(body) else None
        for k in sorted(left):
            sentence = sentences[k]
            if tuple(body[at : at + len(sentence)]) == sentence:
                rest = search(at + len(sentence), left - {k})
                if rest is not None:
                    return [k, *rest]
        return None

    return search(0, frozenset(range(len(sentences))))


def test_infilling_follows_the_reference_with_one_mask_per_span(
    docs: list[np.ndarray], vocab: Vocab
) -> None:
    total_inserts = 0
    for seed, doc in enumerate(docs):
        source, spans, starts, special = _infill(doc, vocab, np.random.default_rng(seed))
        s, e = spans.start_S.tolist(), spans.end_S.tolist()
        want = ref_infilled(doc.tolist(), s, e, set(spans.insert_I.tolist()), vocab.mask_id)
        assert source.tolist() == want
        assert len(s) == np.count_nonzero(spans.lengths_K) and len(set(s)) == len(s)
        assert len(spans.insert_I) == np.count_nonzero(spans.lengths_K == 0)
        total_inserts += len(spans.insert_I)
        # whole words: a span starts at a word and ends at a word start, a special or the end
        ends_ok = np.append(starts | special, True)
        assert starts[s].all() and ends_ok[e].all()
        assert not any(special[a:b].any() for a, b in zip(s, e))  # never over eos
        assert source[-1] == vocab.eos_id
        # masks: one per group of overlapping spans, plus the insertions
        groups, reach = 0, -1
        for a, b in sorted(zip(s, e)):
            groups += a >= reach
            reach = max(reach, b)
        assert np.count_nonzero(source == vocab.mask_id) == groups + len(spans.insert_I)
    assert total_inserts > 0  # P(0 words) = e^-3: zero-length spans happen


@pytest.mark.parametrize("ratio", [0.3, 0.35])
def test_masked_share_of_words(docs: list[np.ndarray], vocab: Vocab, ratio: float) -> None:
    words = covered = 0
    for seed in range(3):
        for i, doc in enumerate(docs):
            rng = np.random.default_rng(1000 * seed + i)
            _, spans, starts, special = _infill(doc, vocab, rng, ratio)
            word_pos = np.flatnonzero(starts & ~special)
            assert spans.lengths_K.sum() == int(np.ceil(len(word_pos) * ratio))
            inside = np.zeros(len(doc), dtype=bool)
            for a, b in zip(spans.start_S.tolist(), spans.end_S.tolist()):
                inside[a:b] = True
            words += len(word_pos)
            covered += int(inside[word_pos].sum())
    # overlapping spans and spans cut at eos cover a little less than the budget
    assert ratio - 0.04 < covered / words <= ratio + 0.01


def test_span_lengths_follow_poisson_3(tok_dir: Path, vocab: Vocab) -> None:
    tok = load_tokenizer(str(tok_dir))
    lines = first_lines(SAMPLE / "mono" / "en.train.txt.zst", 200)
    doc = np.array([t for line in tok.encode(lines) for t in line] + [vocab.eos_id])
    drawn = []
    rng = np.random.default_rng(0)
    for _ in range(80):
        _, spans, _, _ = _infill(doc, vocab, rng)
        drawn.append(spans.lengths_K[:-1])  # the last one is cut to the budget
    lengths = np.concatenate(drawn)
    assert len(lengths) > 20_000
    ks = np.arange(10)
    pmf = np.exp(-3.0) * 3.0**ks / np.cumprod(np.maximum(ks, 1))
    expected = len(lengths) * np.append(pmf, 1 - pmf.sum())
    observed = np.bincount(np.minimum(lengths, 10), minlength=11)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[10], (chi2, observed.tolist())


def test_sentence_permutation_is_a_permutation(
    docs: list[np.ndarray], vocab: Vocab, tok_dir: Path
) -> None:
    ends_V = sentence_end_table_from_tokenizer(str(tok_dir))
    ends = set(np.flatnonzero(ends_V).tolist())
    cfg = DenoisingConfig(mask_ratio=0.0, permute_ratio=1.0)
    moved = 0
    for seed, doc in enumerate(docs):
        source, target = denoise(
            doc, vocab=vocab, cfg=cfg, rng=np.random.default_rng(seed), sentence_end_V=ends_V
        )
        sentences = ref_sentences(doc.tolist(), ends, vocab.eos_id)
        order = as_concatenation(source[:-1].tolist(), sentences)
        assert order is not None and sorted(order) == list(range(len(sentences))), seed
        assert source[-1] == vocab.eos_id and target.tolist() == doc.tolist()
        moved += order != sorted(order)
    assert moved > len(docs) // 2  # documents of 4 lines have several sentences


def test_rotation_is_a_rotation(docs: list[np.ndarray], vocab: Vocab) -> None:
    cfg = DenoisingConfig(mask_ratio=0.0, permute_ratio=0.0, rotate_prob=1.0)
    for seed, doc in enumerate(docs[:40]):
        source, target = denoise(doc, vocab=vocab, cfg=cfg, rng=np.random.default_rng(seed))
        body, got = doc[:-1].tolist(), source[:-1].tolist()
        offsets = [k for k in range(1, len(body)) if body[k:] + body[:k] == got]
        assert offsets, seed
        assert source[-1] == vocab.eos_id and target.tolist() == doc.tolist()
    assert rotate_document(np.array([7, 3]), rng=np.random.default_rng(0), eos_id=3).tolist() == [
        7,
        3,
    ]


def test_mbart_language_tag_ends_the_source_and_starts_the_decoder(
    docs: list[np.ndarray], vocab: Vocab, tok_dir: Path
) -> None:
    tok = load_tokenizer(str(tok_dir))
    lang = tok.lang_ids["de"]
    ends_V = sentence_end_table_from_tokenizer(str(tok_dir))
    doc = docs[50]
    source, target = denoise(
        doc,
        vocab=vocab,
        cfg=MBART_DENOISING,
        rng=np.random.default_rng(0),
        sentence_end_V=ends_V,
        lang_id=lang,
    )
    assert source[-1] == lang and source[-2] == vocab.eos_id
    assert target.tolist() == doc.tolist() + [lang]
    assert decoder_inputs(target, start_id=lang).tolist() == [lang] + doc.tolist()
    assert np.count_nonzero(source == vocab.mask_id) > 0 and len(source) < len(doc)
    bart_source, bart_target = denoise(
        doc, vocab=vocab, cfg=BART_DENOISING, rng=np.random.default_rng(0), sentence_end_V=ends_V
    )
    assert bart_target.tolist() == doc.tolist() and bart_source[-1] == vocab.eos_id
    again, _ = denoise(
        doc, vocab=vocab, cfg=BART_DENOISING, rng=np.random.default_rng(0), sentence_end_V=ends_V
    )
    assert again.tolist() == bart_source.tolist()  # deterministic from the seed


def test_sentence_end_pieces() -> None:
    pieces = ["<pad>", "</s>", ".", "\u2581.", "\u3002", "?!", "Mr.", "3.5", "\u2581", "a"]
    got = sentence_end_table(pieces, eos_id=1).tolist()
    assert got == [False, True, True, True, True, True, False, False, False, False]


def test_bad_config_names_the_rule(docs: list[np.ndarray], vocab: Vocab) -> None:
    with pytest.raises(ValueError, match=r"denoising.mask_ratio \(1.5\) must be in \[0, 1\]"):
        DenoisingConfig(mask_ratio=1.5).check()
    with pytest.raises(ValueError, match=r"denoising.poisson_lambda \(0.0\) must be > 0"):
        DenoisingConfig(poisson_lambda=0.0).check()
    with pytest.raises(ValueError, match="permute_ratio > 0 needs the sentence-end table"):
        denoise(docs[0], vocab=vocab, cfg=BART_DENOISING, rng=np.random.default_rng(0))
