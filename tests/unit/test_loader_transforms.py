"""Loader transforms in numpy: joining, boundaries, BERT masking (rates, specials, whole words,
words in scripts without spaces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_pipeline.synthetic import synthetic_vocab
from data_pipeline.text_inputs import MonoInput
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from data_pipeline.transforms import (
    IGNORE_INDEX,
    MaskingConfig,
    Vocab,
    boundaries_from_starts,
    is_cjk_piece,
    join_mono,
    join_pairs,
    mask_tokens,
    word_starts,
)

SAMPLE = Path(__file__).resolve().parents[2] / "data_pipeline" / "sample" / "mono"

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


def test_join_pairs_puts_the_target_first_in_swapped_pairs() -> None:
    rng = np.random.default_rng(0)
    src_len, tgt_len = rng.integers(0, 6, 40), rng.integers(0, 6, 40)
    src_off = np.concatenate([[0], np.cumsum(src_len)]).astype(np.int32)
    tgt_off = np.concatenate([[0], np.cumsum(tgt_len)]).astype(np.int32)
    src = rng.integers(10, 100, int(src_len.sum())).astype(np.uint16)
    tgt = rng.integers(100, 200, int(tgt_len.sum())).astype(np.uint16)
    swap = rng.random(40) < 0.5
    ids, lang, pos, seg = join_pairs(
        src, src_off, tgt, tgt_off, eos_id=2, src_lang=3, tgt_lang=5, swap_D=swap
    )
    # the rule written out pair by pair: each side with its eos, positions from 0 per side
    want_ids, want_lang, want_pos, want_seg = [], [], [], [0]
    for d in range(40):
        sides = [(src[src_off[d] : src_off[d + 1]], 3), (tgt[tgt_off[d] : tgt_off[d + 1]], 5)]
        for tokens, language in sides[::-1] if swap[d] else sides:
            want_ids += [*tokens.tolist(), 2]
            want_lang += [language] * (len(tokens) + 1)
            want_pos += list(range(len(tokens) + 1))
        want_seg.append(len(want_ids))
    assert ids.tolist() == want_ids and lang.tolist() == want_lang
    assert pos.tolist() == want_pos and seg.tolist() == want_seg


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
        ids,
        vocab=VOCAB,
        cfg=MaskingConfig(whole_word=True, max_word_pieces=10_000),  # no word is cut
        rng=np.random.default_rng(3),
    )
    selected = labels != IGNORE_INDEX
    word_start = VOCAB.word_start_V[ids]
    word_start[:, 0] = True
    word = np.cumsum(word_start.ravel()).reshape(ids.shape)
    for w in np.unique(word):
        sel = selected[word == w]
        assert sel.all() or not sel.any()
    assert 0.08 < selected.mean() < 0.22


def _sample_lines(lang: str, split: str, n: int) -> list[str]:
    raw = zstandard.ZstdDecompressor().decompress((SAMPLE / f"{lang}.{split}.txt.zst").read_bytes())
    return raw.decode("utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def cjk_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sentencepiece tokenizer on en/zh/ja/ko text of the sample corpus."""
    root = tmp_path_factory.mktemp("cjk")
    inputs = []
    for lang in ("en", "zh", "ja", "ko"):
        path = root / f"{lang}.txt"
        path.write_text("\n".join(_sample_lines(lang, "train", 400)) + "\n", encoding="utf-8")
        inputs.append(MonoInput(lang, (path,)))
    out = root / "tok"
    train_tokenizer(
        inputs, out=out, vocab_size=3000, num_sentinels=4, character_coverage=0.98, num_threads=2
    )
    return out


def _rows(ids: list[list[int]], eos: int, width: int) -> np.ndarray:
    flat = np.concatenate([np.array([*row, eos]) for row in ids])
    rows = len(flat) // width
    return flat[: rows * width].reshape(rows, width).astype(np.int64)


def _runs(selected_BT: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive selected positions, row by row."""
    padded = np.zeros((selected_BT.shape[0], selected_BT.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = selected_BT
    edges = np.diff(padded, axis=1)
    return np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)


def test_is_cjk_piece() -> None:
    assert all(map(is_cjk_piece, ["数据", "▁の", "カタカナ", "한국어", "\U00020000", "。", "「"]))
    assert not any(map(is_cjk_piece, ["▁word", "Ελ", "हिन्दी", ".", "<0xE4>", "▁"]))


@pytest.mark.parametrize("lang", ["zh", "ja", "ko"])
def test_whole_word_masking_in_scripts_without_spaces(cjk_tok: Path, lang: str) -> None:
    # before: a word ran from one word-boundary mark to the next, so a Chinese or Japanese
    # paragraph (no spaces) was one word, masked at once (runs of 50+ pieces)
    tok = load_tokenizer(cjk_tok)
    vocab = Vocab.from_tokenizer(str(cjk_tok))
    ids_BT = _rows(tok.encode(_sample_lines(lang, "valid", 250)), vocab.eos_id, 128)
    assert ids_BT.size > 4000
    cfg = MaskingConfig(whole_word=True)
    starts_BT = word_starts(ids_BT, vocab=vocab, max_word_pieces=cfg.max_word_pieces)
    assert _runs(~starts_BT).max(initial=0) < cfg.max_word_pieces  # no word over 8 pieces
    cjk_BT = vocab.cjk_V[ids_BT]
    assert cjk_BT.mean() > 0.3  # the text is mostly CJK pieces, each a word of its own
    assert starts_BT[cjk_BT].all() and starts_BT[:, 1:][cjk_BT[:, :-1]].all()

    maskable_BT = ~vocab.special_mask_V()[ids_BT]
    rates, longest, p99 = [], [], []
    for seed in range(20):
        _, labels = mask_tokens(ids_BT, vocab=vocab, cfg=cfg, rng=np.random.default_rng(seed))
        chosen_BT = labels != IGNORE_INDEX
        rates.append(chosen_BT[maskable_BT].mean())
        # each masked word is at most 8 pieces: runs of chosen pieces cut at word starts
        assert _runs(chosen_BT & ~starts_BT).max(initial=0) < cfg.max_word_pieces
        # maximal masked spans (neighbouring words chosen together) stay short
        runs = _runs(chosen_BT)
        longest.append(runs.max())
        p99.append(np.percentile(runs, 99))
    assert max(p99) <= cfg.max_word_pieces and max(longest) <= 4 * cfg.max_word_pieces
    assert abs(np.mean(rates) - cfg.mask_prob) < 0.01, rates


def test_masking_config_rules() -> None:
    with pytest.raises(ValueError, match=r"masking.mask_prob \(1.5\) must be in \[0, 1\]"):
        MaskingConfig(mask_prob=1.5).check()
    with pytest.raises(ValueError, match="replace_prob \\+ random_prob"):
        MaskingConfig(replace_prob=0.9, random_prob=0.2).check()
    with pytest.raises(ValueError, match=r"masking.max_word_pieces \(0\) must be an integer >= 1"):
        MaskingConfig(max_word_pieces=0).check()
