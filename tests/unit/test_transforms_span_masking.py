"""SpanBERT span masking on real tokens of the sample corpus: span lengths against the clipped
geometric law, the masking rate, whole words, labels, and the per-span 80/10/10 choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.transforms import (
    IGNORE_INDEX,
    SpanMaskingConfig,
    Vocab,
    join_mono,
    select_spans,
    span_mask,
    word_starts,
)
from tests.sample_data import SAMPLE, first_lines

LANGS = ("en", "de", "ja")
CHI2_999_DF9 = 27.877  # chi-square 0.999 quantile, 9 degrees of freedom (no scipy here)
WIDTH = 256


@pytest.fixture(scope="module")
def rows(tok_dir: Path) -> np.ndarray:
    """``[B, 256]`` int64 rows cut from real documents of three languages joined with eos."""
    tok = load_tokenizer(str(tok_dir))
    docs = []
    for lang in LANGS:
        docs += tok.encode(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 300))
    lengths = np.array([len(d) for d in docs])
    flat = np.concatenate([np.array(d, dtype=np.int64) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids, _ = join_mono(flat, offsets, eos_id=tok.special_ids["eos"])
    num_rows = len(ids) // WIDTH
    return ids[: num_rows * WIDTH].reshape(num_rows, WIDTH)


def clipped_geometric(p: float, top: int) -> np.ndarray:
    """P(length = k), k = 1..top: Geometric(p) truncated at ``top`` and renormalised."""
    weights = np.array([p * (1 - p) ** (k - 1) for k in range(1, top + 1)])
    return weights / weights.sum()


def test_span_lengths_follow_the_clipped_geometric(rows: np.ndarray, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    rng = np.random.default_rng(0)
    drawn, passes = [], 0
    while sum(map(len, drawn)) < 50_000:
        _, spans = select_spans(rows, vocab=vocab, cfg=cfg, rng=rng)
        drawn.append(spans.words_S)
        passes += 1
    lengths = np.concatenate(drawn)[:50_000]
    expected = 50_000 * clipped_geometric(0.2, 10)
    observed = np.bincount(lengths - 1, minlength=10)
    assert observed.size == 10  # never longer than 10 words
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999_DF9, (chi2, observed.tolist())
    assert abs(lengths.mean() - 3.8) < 0.05  # the paper's mean span length, 3.8 words


def test_spans_take_whole_words_until_the_budget(rows: np.ndarray, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    selected, spans = select_spans(rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(1))
    special = vocab.special_mask_V()[rows]
    starts = word_starts(rows, vocab=vocab, max_word_pieces=8)
    last_of_row = np.append(spans.row_S[1:] != spans.row_S[:-1], True)
    exact = 0
    for k, (row, a, b, n) in enumerate(
        zip(spans.row_S.tolist(), spans.start_S.tolist(), spans.end_S.tolist(), spans.words_S)
    ):
        assert starts[row, a] and not special[row, a:b].any()
        words = int(starts[row, a:b].sum())
        stopped = b == WIDTH or special[row, b]
        if last_of_row[k]:  # the budget may cut it, even inside a word
            assert words <= n
        elif stopped:
            assert words <= n
        else:  # it ends where word a + n starts
            assert words == n and starts[row, b]
            exact += 1
    assert exact > 0.6 * len(spans.row_S)
    union = np.zeros_like(selected)
    for row, a, b in zip(spans.row_S, spans.start_S, spans.end_S):
        union[row, a:b] = True
    assert (union == selected).all()


def test_masking_rate_and_labels(rows: np.ndarray, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    special = vocab.special_mask_V()[rows]
    valid = np.ones(rows.shape, dtype=bool)
    valid[::7, -40:] = False  # a padded tail on every 7th row
    inputs, labels = span_mask(
        rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(2), valid_BT=valid
    )
    picked = labels != IGNORE_INDEX
    maskable = ~special & valid
    per_row = np.ceil(maskable.sum(axis=1) * 0.15).astype(int)
    assert (picked.sum(axis=1) == per_row).all()
    assert abs(picked.sum() / maskable.sum() - 0.15) < 0.005
    assert not (picked & ~maskable).any()
    assert (labels[picked] == rows[picked]).all() and (inputs[~picked] == rows[~picked]).all()


def test_one_choice_per_span(rows: np.ndarray, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    counts = {"mask": 0, "random": 0, "keep": 0}
    normal = ~vocab.special_mask_V()
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        _, spans = select_spans(rows, vocab=vocab, cfg=cfg, rng=np.random.default_rng(10 + seed))
        inputs, _ = span_mask(rows, vocab=vocab, cfg=cfg, rng=rng)
        covered = np.zeros(rows.shape, dtype=np.int64)
        for row, a, b in zip(spans.row_S, spans.start_S, spans.end_S):
            covered[row, a:b] += 1
        for row, a, b in zip(spans.row_S.tolist(), spans.start_S.tolist(), spans.end_S.tolist()):
            if (covered[row, a:b] > 1).any() or b - a < 2:
                continue  # overlapping or one-token spans do not show the choice
            got, orig = inputs[row, a:b], rows[row, a:b]
            if (got == vocab.mask_id).all():
                counts["mask"] += 1
            elif (got == orig).all():
                counts["keep"] += 1
            else:
                # random ids: none is the mask, all are ordinary ids, most differ from the text
                assert not (got == vocab.mask_id).any() and normal[got].all()
                counts["random"] += 1
    total = sum(counts.values())
    assert total > 2000
    assert abs(counts["mask"] / total - 0.8) < 0.03
    assert abs(counts["random"] / total - 0.1) < 0.02
    assert abs(counts["keep"] / total - 0.1) < 0.02


def test_deterministic_from_the_seed(rows: np.ndarray, vocab: Vocab) -> None:
    cfg = SpanMaskingConfig()
    a = span_mask(rows[:8], vocab=vocab, cfg=cfg, rng=np.random.default_rng(3))
    b = span_mask(rows[:8], vocab=vocab, cfg=cfg, rng=np.random.default_rng(3))
    assert all((x == y).all() for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mask_prob": 1.2}, r"span_masking.mask_prob \(1.2\) must be in \[0, 1\]"),
        ({"geometric_p": 0.0}, r"span_masking.geometric_p \(0.0\) must be in \(0, 1\]"),
        ({"max_span": 0}, r"span_masking.max_span \(0\) must be an integer >= 1"),
        ({"replace_prob": 0.95}, r"replace_prob \+ random_prob \(0.95 \+ 0.1\) must be <= 1"),
    ],
)
def test_bad_config_names_the_rule(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpanMaskingConfig(**kwargs).check()
