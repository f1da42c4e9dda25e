"""Loader states in checkpoints are per dp rank: tp/pp/ep peers deduplicated, and the
exact/elastic choice made by the dp layout, not the world size (``pretrain.data``)."""

from __future__ import annotations

import pytest

from pretrain.data import loader_resume_state, loader_states_by_dp_rank


def _states(dp_of_rank: list[int], *, dp_world: int, workers: int = 0) -> dict[int, dict]:
    return {
        rank: {
            "rng": None,
            "loader": {"who": f"dp{dp}"},
            "dp": {"rank": dp, "world_size": dp_world, "num_workers": workers},
        }
        for rank, dp in enumerate(dp_of_rank)
    }


def test_tp_peers_give_one_state_per_dp_rank():
    # world 4 = dp 2 x tp 2: ranks 0, 1 are dp rank 0; ranks 2, 3 dp rank 1.
    layout, states = loader_states_by_dp_rank(_states([0, 0, 1, 1], dp_world=2))
    assert layout == (2, 0)
    assert states == {0: {"who": "dp0"}, 1: {"who": "dp1"}}


def test_same_dp_layout_at_another_world_size_resumes_exactly():
    saved = _states([0, 0], dp_world=1)  # tp2
    assert loader_resume_state(saved, dp_rank=0, dp_world_size=1, num_workers=0) == {"who": "dp0"}


def test_another_dp_size_or_worker_count_hands_over_every_dp_rank():
    saved = _states([0, 0, 1, 1], dp_world=2)
    expected = [{"who": "dp0"}, {"who": "dp1"}]
    assert loader_resume_state(saved, dp_rank=0, dp_world_size=1, num_workers=0) == expected
    assert loader_resume_state(saved, dp_rank=1, dp_world_size=2, num_workers=2) == expected


def test_missing_dp_rank_and_imported_checkpoint():
    with pytest.raises(ValueError, match=r"dp ranks \[1\] of dp world size 2: .*every old dp"):
        loader_states_by_dp_rank({3: _states([0, 0, 0, 1], dp_world=2)[3]})
    assert loader_resume_state({}, dp_rank=0, dp_world_size=2, num_workers=0) is None


def test_checkpoints_without_dp_fields_read_the_loader_state():
    old = {r: {"loader": {"dp_rank": r, "dp_world_size": 2, "num_workers": 0}} for r in (0, 1)}
    layout, states = loader_states_by_dp_rank(old)
    assert layout == (2, 0) and sorted(states) == [0, 1]
