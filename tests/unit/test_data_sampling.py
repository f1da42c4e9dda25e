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
