"""Loader transforms in numpy: joining, boundaries, BERT masking (rates, specials, whole words)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.synthetic import synthetic_vocab
from data_pipeline.transforms import (
    IGNORE_INDEX,
    MaskingConfig,
    boundaries_from_starts,
    join_mono,
    join_pairs,
    mask_tokens,
)

VOCAB = synthetic_vocab(512)


def test_join_mono_puts_eos_after_every_document() -> None:
    tokens = np.array([11, 12, 13, 21, 31, 32], dtype=np.uint16)
    ids, offsets = join_mono(tokens, np.array([0, 3, 4, 4, 6]), eos_id=3)
    assert ids.tolist() == [11, 12, 13, 3, 21, 3, 3, 31, 32, 3]
    assert offsets.tolist() == [0, 4, 6, 7, 10]  # the empty document is its eos alone
    assert ids.dtype == np.uint16  # widened only when copied into a batch


def test_join_pairs_restarts_positions_at_the_target() -> None:
    ids, lang, pos, seg = join_pairs(
        np.array([11, 12, 21], dtype=np.uint16),
        np.array([0, 2, 3]),
        np.array([51, 61, 62], dtype=np.uint16),
        np.array([0, 1, 3]),
        eos_id=3,
        src_lang=0,
        tgt_lang=1,
    )
    assert ids.tolist() == [11, 12, 3, 51, 3, 21, 3, 61, 62, 3]
    assert lang.tolist() == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]
    assert seg.tolist() == [0, 5, 10]


def test_join_pairs_handles_empty_sides() -> None:
    ids, lang, pos, seg = join_pairs(
        np.array([11], dtype=np.uint16),
        np.array([0, 0, 1]),
        np.array([51, 52], dtype=np.uint16),
        np.array([0, 2, 2]),
        eos_id=3,
        src_lang=0,
        tgt_lang=1,
    )
    assert ids.tolist() == [3, 51, 52, 3, 11, 3, 3]
    assert lang.tolist() == [0, 1, 1, 1, 0, 0, 1]
    assert pos.tolist() == [0, 0, 1, 2, 0, 1, 0]
    assert seg.tolist() == [0, 4, 7]


def test_boundaries_reset_positions_and_number_documents() -> None:
    start = np.array([[False, False, True, False], [True, True, False, True]])
    pos, doc = boundaries_from_starts(start)
    assert pos.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]
    assert doc.tolist() == [[0, 0, 1, 1], [0, 1, 1, 2]]


def test_masking_rates_and_specials() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (64, 512))
    inputs, labels = mask_tokens(ids, vocab=VOCAB, cfg=MaskingConfig(), rng=rng)
    special = ids < 10
    selected = labels != IGNORE_INDEX
    assert not selected[special].any() and (inputs[special] == ids[special]).all()
    assert (labels[selected] == ids[selected]).all()
    assert abs(selected.sum() / (~special).sum() - 0.15) < 0.005
    masked = (inputs == VOCAB.mask_id) & selected
    kept = (inputs == ids) & selected
    assert abs(masked.sum() / selected.sum() - 0.8) < 0.015
    # random replacements are non-special ids; about 10% random + 10% kept (some random = same)
    assert (inputs[selected & ~masked] >= 10).all()
    assert abs(kept.sum() / selected.sum() - 0.1) < 0.015
    assert (inputs[~selected] == ids[~selected]).all()


def test_masking_respects_padding_and_is_deterministic() -> None:
    ids = np.random.default_rng(1).integers(10, 512, (8, 64))
    valid = np.zeros((8, 64), dtype=bool)
    valid[:, :32] = True
    cfg = MaskingConfig(mask_prob=0.5)
    a = mask_tokens(ids, vocab=VOCAB, cfg=cfg, rng=np.random.default_rng(5), valid_BT=valid)
    b = mask_tokens(ids, vocab=VOCAB, cfg=cfg, rng=np.random.default_rng(5), valid_BT=valid)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert (a[1][:, 32:] == IGNORE_INDEX).all() and (a[1][:, :32] != IGNORE_INDEX).any()


def test_whole_word_masking_selects_whole_words() -> None:
    rng = np.random.default_rng(2)
    ids = rng.integers(10, 512, (16, 256))
    inputs, labels = mask_tokens(
        ids, vocab=VOCAB, cfg=MaskingConfig(whole_word=True), rng=np.random.default_rng(3)
    )
    selected = labels != IGNORE_INDEX
    word_start = VOCAB.word_start_V[ids]
    word_start[:, 0] = True
    word = np.cumsum(word_start.ravel()).reshape(ids.shape)
    for w in np.unique(word):
        sel = selected[word == w]
        assert sel.all() or not sel.any()
    assert 0.08 < selected.mean() < 0.22


def test_masking_config_rules() -> None:
    with pytest.raises(ValueError, match=r"masking.mask_prob \(1.5\) must be in \[0, 1\]"):
        MaskingConfig(mask_prob=1.5).check()
    with pytest.raises(ValueError, match="replace_prob \\+ random_prob"):
        MaskingConfig(replace_prob=0.9, random_prob=0.2).check()
