"""The contrastive losses (``pretrain.objectives.contrastive``) against their formulas written
out here on hand-built rows: SimCSE's InfoNCE over the other view, translation ranking in both
directions, and the pooling."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.objectives.contrastive import pool, simcse_loss, translation_ranking_loss

A = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
B = torch.tensor([[2.0, 0.5], [0.1, 1.0], [-1.0, 1.0]])


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def _info_nce(queries: torch.Tensor, keys: torch.Tensor, tau: float) -> float:
    """sum_i -log( exp(cos(q_i, k_i) / tau) / sum_j exp(cos(q_i, k_j) / tau) )."""
    total = 0.0
    for i, q in enumerate(queries):
        scores = [_cos(q, k) / tau for k in keys]
        total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    return total


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_simcse_is_info_nce_over_the_other_view(tau: float) -> None:
    got = simcse_loss(A, B, temperature=tau)
    assert float(got) == pytest.approx(_info_nce(A, B, tau), rel=1e-5)


def test_translation_ranking_takes_both_directions() -> None:
    got = translation_ranking_loss(A, B, temperature=0.05)
    want = _info_nce(A, B, 0.05) + _info_nce(B, A, 0.05)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # the positive is the row's own pair: a perfect match scores near zero loss
    assert float(translation_ranking_loss(A, A * 3, temperature=0.05)) < 0.05


def test_pool_means_the_real_tokens_or_takes_the_first() -> None:
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    real = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(
        pool(hidden, real), torch.stack([hidden[0, :2].mean(0), hidden[1, 0]])
    )
    torch.testing.assert_close(pool(hidden, real, mode="cls"), hidden[:, 0])
    with pytest.raises(ValueError, match=r"pooling mode \('max'\) must be mean or cls"):
        pool(hidden, real, mode="max")
    with pytest.raises(ValueError, match="a row has no real token"):
        pool(hidden, torch.zeros(2, 3, dtype=torch.bool))
