"""T5 span corruption against a reimplementation of T5's rule written here: the length formula,
the noise mask, sentinel order, and the round trip on real tokens of the sample corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.tokenizer import load_tokenizer, sentinel_token
from data_pipeline.transforms import (
    join_mono,
    random_spans_noise_mask,
    sentinel_ids_from_tokenizer,
    span_corrupt,
    t5_span_lengths,
)
from tests.sample_data import SAMPLE, first_lines


@pytest.fixture(scope="module")
def stream(tok_dir: Path) -> np.ndarray:
    """Real documents of three languages joined with eos (as the mono packer cuts rows)."""
    tok = load_tokenizer(str(tok_dir))
    docs = []
    for lang in ("en", "de", "ja"):
        docs += tok.encode(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 60))
    lengths = np.array([len(d) for d in docs])
    flat = np.concatenate([np.array(d, dtype=np.uint16) for d in docs])
    ids, _ = join_mono(
        flat, np.concatenate([[0], np.cumsum(lengths)]), eos_id=tok.special_ids["eos"]
    )
    return ids


# --- the reference, from the T5 paper and its preprocessors, in plain Python -----------------


def ref_lengths(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """Largest raw length whose corrupted inputs (+ sentinels + eos) fit ``inputs_length``."""
    best = None
    for raw in range(inputs_length, 4 * inputs_length):
        noise = round(raw * density)
        spans = round(noise / mean)
        if raw - noise + spans + 1 <= inputs_length:
            best = (raw, noise + spans + 1)
    assert best is not None
    if density == 0.5 and best[1] > inputs_length:
        best = (best[0] - 1, best[1] - 1)
    return best


def ref_partition(items: int, segments: int, rng: np.random.Generator) -> list[int]:
    """Cut ``items`` into ``segments`` non-empty parts: shuffle segments - 1 cut marks among
    the items - 1 gaps (the shuffle is the only random draw, as in T5)."""
    marks = rng.permutation(np.array([i < segments - 1 for i in range(items - 1)], dtype=bool))
    parts, size = [], 1
    for cut in marks.tolist():
        if cut:
            parts.append(size)
            size = 1
        else:
            size += 1
    parts.append(size)
    return parts


def ref_mask(length: int, density: float, mean: float, rng: np.random.Generator) -> list[bool]:
    work = max(length, 2)
    noise = min(max(round(work * density), 1), work - 1)
    spans = max(round(noise / mean), 1)
    noise_parts = ref_partition(noise, spans, rng)
    keep_parts = ref_partition(work - noise, spans, rng)
    mask: list[bool] = []
    for keep, drop in zip(keep_parts, noise_parts):
        mask += [False] * keep + [True] * drop
    return mask[:length]


def ref_corrupt(tokens: list[int], mask: list[bool], sentinels: list[int]) -> tuple[list, list]:
    inputs, targets, span = [], [], -1
    for t, (token, noisy) in enumerate(zip(tokens, mask)):
        starts = noisy and (t == 0 or not mask[t - 1])
        if starts:
            span += 1
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if noisy else inputs).append(token)
    return inputs, targets


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """The original tokens from inputs and targets: each sentinel of the inputs replaced by
    what follows the same sentinel in the targets."""
    where = {s: k for k, s in enumerate(sentinels)}
    fill: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in where:
            current = where[token]
            fill[current] = []
        else:
            fill[current].append(token)
    out = []
    for token in inputs:
        out += fill[where[token]] if token in where else [token]
    return out


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs_length", [8, 16, 64, 114, 128, 256, 512, 626, 1024])
@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.5, 3.0), (0.25, 5.0)])
def test_t5_span_lengths_match_the_formula(inputs_length: int, density: float, mean: float) -> None:
    got = t5_span_lengths(inputs_length, noise_density=density, mean_span=mean)
    assert got == ref_lengths(inputs_length, density, mean)


def test_t5_span_lengths_known_values() -> None:
    # T5's span-corruption task: 512 input tokens from 568 raw tokens, 114 targets
    assert t5_span_lengths(512) == (568, 114)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 101, 568])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_noise_mask_equals_the_reference(length: int, seed: int) -> None:
    got = random_spans_noise_mask(length, rng=np.random.default_rng(seed))
    want = ref_mask(length, 0.15, 3.0, np.random.default_rng(seed))
    assert got.tolist() == want
    if length >= 2:
        noise = min(max(round(length * 0.15), 1), length - 1)
        starts = int(got[0]) + int(np.count_nonzero(got[1:] & ~got[:-1]))
        assert got.sum() == noise and starts == max(round(noise / 3.0), 1)
        assert not got[0] and got[-1]  # non-noise first, noise last


@pytest.mark.parametrize("length", [20, 97, 568])
@pytest.mark.parametrize("seed", [0, 3, 11])
def test_span_corrupt_matches_reference_and_round_trips(
    stream: np.ndarray, tok_dir: Path, length: int, seed: int
) -> None:
    sentinels = sentinel_ids_from_tokenizer(str(tok_dir)).tolist()
    tokens = stream[seed * 50 : seed * 50 + length]
    inputs, targets = span_corrupt(tokens, rng=np.random.default_rng(seed), sentinel_ids=sentinels)
    mask = ref_mask(length, 0.15, 3.0, np.random.default_rng(seed))
    want_inputs, want_targets = ref_corrupt(tokens.tolist(), mask, sentinels)
    assert inputs.tolist() == want_inputs and targets.tolist() == want_targets
    num_spans = max(round(round(length * 0.15) / 3.0), 1)
    used_in = [t for t in inputs.tolist() if t in sentinels]
    used_tg = [t for t in targets.tolist() if t in sentinels]
    assert used_in == used_tg == sentinels[:num_spans]  # one per span, in order
    assert targets[0] == sentinels[0]
    assert reconstruct(inputs.tolist(), targets.tolist(), sentinels) == tokens.tolist()


def test_batched_rows_equal_rows_in_order_and_fill_the_packed_length(
    stream: np.ndarray, tok_dir: Path
) -> None:
    tok = load_tokenizer(str(tok_dir))
    eos = tok.special_ids["eos"]
    raw, targets_length = t5_span_lengths(128)
    rows = stream[: 6 * raw].reshape(6, raw)
    inputs_BI, targets_BG = span_corrupt(
        rows, rng=np.random.default_rng(5), sentinel_ids=tok.sentinel_ids, eos_id=eos
    )
    assert inputs_BI.shape == (6, 128) and targets_BG.shape == (6, targets_length)
    rng = np.random.default_rng(5)
    for row in range(6):
        mask = ref_mask(raw, 0.15, 3.0, rng)
        want_inputs, want_targets = ref_corrupt(rows[row].tolist(), mask, tok.sentinel_ids)
        assert inputs_BI[row].tolist() == want_inputs + [eos]
        assert targets_BG[row].tolist() == want_targets + [eos]


def test_sentinel_lookup_names_extra_ids(tok_dir: Path) -> None:
    tok = load_tokenizer(str(tok_dir))
    ids = sentinel_ids_from_tokenizer(str(tok_dir))
    assert len(ids) == 100
    assert [tok.sp.id_to_piece(int(i)) for i in ids[:3]] == [sentinel_token(k) for k in range(3)]


def test_bad_arguments_name_the_rule() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"sentinel_ids \(2\) must cover the 3 noise spans"):
        span_corrupt(np.arange(60), rng=rng, sentinel_ids=[900, 901])
    with pytest.raises(ValueError, match=r"noise_density \(1.5\) must be in \(0, 1\)"):
        random_spans_noise_mask(10, rng=rng, noise_density=1.5)
    with pytest.raises(ValueError, match=r"mean_span \(0.5\) must be >= 1"):
        t5_span_lengths(512, mean_span=0.5)
    with pytest.raises(ValueError, match=r"tokens \(shape \(0, 20\)\) must be \[L\] or \[B, L\]"):
        span_corrupt(np.zeros((0, 20), dtype=np.int64), rng=rng, sentinel_ids=[900])
    with pytest.raises(ValueError, match=r"inputs_length \(1\) must be an int >= 2"):
        t5_span_lengths(1)
