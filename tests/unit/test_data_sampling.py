"""Alpha smoothing: p_l = q_l^alpha / sum_k q_k^alpha, q_l = n_l / N."""

from __future__ import annotations

import math

import pytest

from data_pipeline.sampling import check_alpha, language_probabilities, natural_probabilities


def test_formula_matches_hand_computation() -> None:
    counts = {"en": 900, "de": 90, "hi": 10}
    probs = language_probabilities(counts, alpha=0.5)
    q = {k: v / 1000 for k, v in counts.items()}
    norm = sum(math.sqrt(v) for v in q.values())
    for lang in counts:
        assert probs[lang] == pytest.approx(math.sqrt(q[lang]) / norm, rel=1e-12)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert list(probs) == ["en", "de", "hi"]


def test_alpha_one_is_natural_and_small_alpha_flattens() -> None:
    counts = {"en": 1000, "hi": 10}
    assert natural_probabilities(counts) == pytest.approx({"en": 1000 / 1010, "hi": 10 / 1010})
    flat = language_probabilities(counts, alpha=0.01)
    assert flat["hi"] > 0.45  # nearly uniform
    assert language_probabilities(counts, alpha=0.3)["hi"] > natural_probabilities(counts)["hi"]


def test_zero_count_gets_zero_probability() -> None:
    probs = language_probabilities({"en": 5, "xx": 0}, alpha=0.3)
    assert probs == {"en": 1.0, "xx": 0.0}


@pytest.mark.parametrize(
    ("alpha", "message"),
    [(0.0, "alpha (0.0) must be in (0, 1]"), (1.5, "alpha (1.5) must be in (0, 1]")],
)
def test_bad_alpha_message(alpha: float, message: str) -> None:
    with pytest.raises(ValueError) as err:
        language_probabilities({"en": 1}, alpha=alpha)
    assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^--alpha \(nan\) must be in \(0, 1\]$"):
        check_alpha(float("nan"), name="--alpha")


def test_bad_counts_messages() -> None:
    with pytest.raises(ValueError, match=r"^count for language 'en' \(-1\) must be >= 0$"):
        language_probabilities({"en": -1, "de": 3}, alpha=0.3)
    with pytest.raises(ValueError, match=r"must have a positive sum$"):
        language_probabilities({"en": 0}, alpha=0.3)


@pytest.mark.parametrize(
    "probs",
    [[1.0], [0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.0, 0.2, 0.1], "28"],
    ids=["one", "two", "thirds", "zero", "28"],
)
def test_row_schedule_matches_the_sorted_keys(probs) -> None:
    # the global row sequence: every (source l, row m) sorted by (m + 0.5) / p_l, ties by l;
    # prefix counts and ranges computed in closed form must equal the brute-force merge
    import numpy as np

    from data_pipeline.sampling import RowSchedule

    if probs == "28":
        rng = np.random.default_rng(0)
        raw = rng.random(28) ** 3 + 1e-3
        probs = list(raw / raw.sum())
    schedule = RowSchedule(probs)
    keys = sorted(((m + 0.5) / p, i) for i, p in enumerate(probs) if p > 0 for m in range(3000))
    seq = np.array([i for _, i in keys[:2500]])
    rows = np.arange(2500)
    brute = np.stack([np.bincount(seq[:r], minlength=len(probs)) for r in rows])
    assert (schedule.counts(rows) == brute[:, schedule.index]).all()
    for start, stop in [(0, 0), (0, 3), (5, 9), (17, 100), (300, 1000), (1999, 2500)]:
        assert schedule.sources(start, stop).tolist() == seq[start:stop].tolist()
    picks = np.random.default_rng(1).integers(0, 2500, 200)
    assert schedule.sources_at(picks).tolist() == seq[picks].tolist()
    # far into a run the counts still sum to the prefix and stay within a row or so of R p_l
    far = np.array([10**12, 10**12 + 12345])
    counts = schedule.counts(far)
    assert counts.sum(axis=1).tolist() == far.tolist()
    p = np.array(probs)[schedule.index]
    assert np.abs(counts - far[:, None] * p).max() < 1 + len(p) * p.max() / 2


def test_hashed_bits_are_a_pure_function_of_their_words() -> None:
    import numpy as np

    from data_pipeline.sampling import hashed_u64

    a = hashed_u64(7, np.array([0, 1, 2**40]), 5)
    assert a.shape == (3, 5) and a.dtype == np.uint64
    assert (a == hashed_u64(7, np.array([0, 1, 2**40]), 5)).all()
    assert len(np.unique(a)) == 15 and not (a == hashed_u64(8, np.array([0, 1, 2**40]), 5)).any()


def test_permuted_positions_are_permutations_keyed_by_their_words() -> None:
    import numpy as np

    from data_pipeline.sampling import permuted_positions

    for n in (1, 2, 3, 8, 33, 1000):
        perms = permuted_positions(5, np.arange(6), n, np.arange(n)).tolist()
        assert all(sorted(p) == list(range(n)) for p in perms), n
        if n >= 8:
            assert len({tuple(p) for p in perms}) == 6
    # entries alone equal the whole permutation's
    whole = permuted_positions(5, np.array([7]), 1000, np.arange(1000))[0]
    part = permuted_positions(5, np.array([7]), 1000, np.array([10, 500, 999]))[0]
    assert part.tolist() == whole[[10, 500, 999]].tolist()
