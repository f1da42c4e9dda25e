"""The CPU host-sync recorder: it flags each kind of device-to-host read and leaves sync-free
code alone, and it restores ``torch.Tensor`` after use."""

from __future__ import annotations

import pytest
import torch

from tests.host_sync import HostSyncRecorder

X = torch.arange(-3.0, 5.0)
MASK = X > 0

SYNCS = {
    "item": lambda: X.sum().item(),
    "float": lambda: float(X.sum()),
    "bool": lambda: bool(X.sum() > 0),
    "tolist": lambda: X.tolist(),
    "cpu": lambda: X.cpu(),
    "numpy": lambda: X.numpy(),
    "nonzero": lambda: MASK.nonzero(),
    "where one-arg": lambda: torch.where(MASK),
    "mask index": lambda: X[MASK],
    "mask assign": lambda: X.clone().__setitem__(MASK, 0.0),
    "masked_select": lambda: X.masked_select(MASK),
    "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    "bincount": lambda: torch.bincount(torch.tensor([1, 2])),
    "unique": lambda: torch.unique(torch.tensor([1, 2, 2])),
    "equal": lambda: torch.equal(X, X),
}
SYNC_FREE = {
    "arithmetic and reductions": lambda: (X * 2 + 1).softmax(0).sum(),
    "masked_fill": lambda: X.masked_fill(MASK, 0.0),
    "where three-arg": lambda: torch.where(MASK, X, 0.0),
    "long index": lambda: X[torch.tensor([0, 2])],
    "repeat_interleave with output_size": lambda: torch.arange(3).repeat_interleave(
        torch.tensor([1, 2, 3]), output_size=6
    ),
    "scatter_add": lambda: torch.zeros(4).scatter_add(0, torch.tensor([1, 1]), torch.ones(2)),
    "numel and shape": lambda: int(X.numel()) + X.shape[0],
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_each_host_read_is_recorded_where_it_is_made(name: str):
    with HostSyncRecorder() as syncs:
        SYNCS[name]()
    assert len(syncs.calls) == 1, syncs.calls
    assert "test_host_sync.py" in syncs.calls[0]


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_sync_free_ops_are_not_recorded(name: str):
    with HostSyncRecorder() as syncs:
        SYNC_FREE[name]()
    assert syncs.calls == []


def test_backward_ops_are_seen_and_tensor_is_restored():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.sum())  # a host read inside backward

    x = torch.ones(3, requires_grad=True)
    with HostSyncRecorder() as syncs:
        ReadsInBackward.apply(x).sum().backward()
    assert [call.split(" at ")[0] for call in syncs.calls] == ["aten._local_scalar_dense.default"]
    assert "tolist" not in vars(torch.Tensor)  # inherited again from TensorBase
    with HostSyncRecorder() as syncs:
        pass
    assert X.tolist()[0] == -3.0 and syncs.calls == []
