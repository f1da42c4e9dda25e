"""The N-process gloo harness that every distributed test uses."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from parallel.testing import DistributedTestError, run_distributed


def _all_reduce(rank: int, world_size: int, scale: float) -> dict:
    x = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(x)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": x.item()}


@pytest.mark.parametrize("world_size", [2, 4])
def test_results_come_back_by_rank(world_size: int):
    results = run_distributed(_all_reduce, world_size=world_size, args=(2.0,))
    expected = 2.0 * world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["world"] == world_size and r["sum"] == expected for r in results)


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise RuntimeError("boom on rank one")
    # The healthy rank waits in a collective the failed rank never joins.
    dist.barrier()
    return rank


def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_raise_on_rank_one, world_size=2, timeout_s=60)
    message = str(err.value)
    assert message.startswith("rank 1 failed")
    assert "RuntimeError: boom on rank one" in message
    assert "_raise_on_rank_one" in message


def _die_silently(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(7)
    return rank


def test_a_rank_dying_without_result_is_reported():
    with pytest.raises(DistributedTestError, match=r"rank 0 failed(.|\n)*exited with code 7"):
        run_distributed(_die_silently, world_size=2, timeout_s=60)


def _hang(rank: int, world_size: int) -> None:
    import time

    time.sleep(60)


def test_timeout_is_reported():
    with pytest.raises(DistributedTestError, match="timed out after 2 s"):
        run_distributed(_hang, world_size=2, timeout_s=2)


def _flaky_network(rank: int, world_size: int, marks: str, error: str) -> int:
    """Rank 1 fails on the first try only, with ``error``; each of its tries leaves a mark."""
    from pathlib import Path

    if rank == 1:
        tries = Path(marks)
        with open(tries, "a") as handle:
            handle.write("x")
        if len(tries.read_text()) == 1:
            raise getattr(dist, error, RuntimeError)("Connection reset by peer")
    return rank


def test_a_dropped_rendezvous_connection_is_tried_once_more(tmp_path):
    marks = tmp_path / "network"
    assert run_distributed(_flaky_network, world_size=2, args=(str(marks), "DistNetworkError"),
                           timeout_s=60) == [0, 1]  # fmt: skip
    assert marks.read_text() == "xx"
    # any other failure is the test's: no second try
    other = tmp_path / "other"
    with pytest.raises(DistributedTestError, match="RuntimeError: Connection reset"):
        run_distributed(_flaky_network, world_size=2, args=(str(other), "RuntimeError"),
                        timeout_s=60)  # fmt: skip
    assert other.read_text() == "x"
