"""The contrastive losses' in-batch negatives across data-parallel ranks: two gloo ranks, each
holding half of the rows, gather every rank's embeddings; their losses add up to one process's
on the concatenated batch and their gradients, summed over the ranks (what a data-parallel
engine's all-reduce does before it divides by the ranks), equal its gradients."""

from __future__ import annotations

import pytest
import torch

from parallel.testing import run_distributed

ROWS, WIDTH, OUT = 8, 6, 5


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, WIDTH, generator=gen)
    y = torch.randn(ROWS, WIDTH, generator=gen)  # the other view, or the translations
    w = torch.randn(WIDTH, OUT, generator=gen)
    return x, y, w


def _loss(kind: str, x, y, w, group=None):
    from pretrain.objectives.contrastive import simcse_loss, translation_ranking_loss

    fn = simcse_loss if kind == "simcse" else translation_ranking_loss
    return fn(torch.tanh(x @ w), torch.tanh(y @ w), temperature=0.05, group=group)


def _rank(rank: int, world_size: int, kind: str) -> dict:
    import torch.distributed as dist

    x, y, w = _data()
    w = w.clone().requires_grad_(True)
    rows = slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)
    loss = _loss(kind, x[rows], y[rows], w, group=dist.group.WORLD)
    loss.backward()
    return {"loss": float(loss), "grad": w.grad.clone()}


@pytest.mark.parametrize("kind", ["simcse", "translation"])
def test_two_ranks_give_one_process_loss_and_gradients(kind: str) -> None:
    x, y, w = _data()
    w = w.clone().requires_grad_(True)
    loss = _loss(kind, x, y, w)
    loss.backward()
    ranks = run_distributed(_rank, world_size=2, args=(kind,))
    assert sum(r["loss"] for r in ranks) == pytest.approx(float(loss.detach()), rel=1e-5)
    torch.testing.assert_close(ranks[0]["grad"] + ranks[1]["grad"], w.grad, rtol=1e-5, atol=1e-6)
    # each rank's own gradient is not the whole: the other rank's rows matter
    assert float((ranks[0]["grad"] - w.grad).abs().max()) > 1e-3
