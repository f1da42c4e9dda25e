"""Loader states in checkpoints are per dp rank: tp/pp/ep peers deduplicated, and the
exact/elastic choice made by the dp layout, not the world size (``pretrain.data``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.data import loader_resume_state, loader_states_by_dp_rank, read_resume_rank_states


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


# --- per-rank reads on resume: each rank reads only the rank files it needs -------------------


def _write_checkpoint(path: Path, dp_of_rank: list[int], *, dp_world: int, index: bool = True):
    """Rank files and the rank index as ``CheckpointManager.save`` writes them for a run of
    ``len(dp_of_rank)`` ranks. Peers of one dp rank get distinguishable loader states (the
    file they came from) so that the test sees which file a state was taken from."""
    path.mkdir()
    for rank, dp in enumerate(dp_of_rank):
        coordinate = {"rank": dp, "world_size": dp_world, "num_workers": 0}
        state = {"rng": {"of": rank}, "loader": {"who": f"dp{dp}", "file": rank}, "dp": coordinate}
        torch.save(state, path / f"rank_{rank}.pt")
    if index:
        entries = {
            str(rank): {"dp": {"rank": dp, "world_size": dp_world, "num_workers": 0}}
            for rank, dp in enumerate(dp_of_rank)
        }
        text = json.dumps({"world_size": len(dp_of_rank), "ranks": entries})
        (path / "rank_index.json").write_text(text, encoding="utf-8")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files ``torch.load`` reads."""
    names: list[str] = []
    load = torch.load

    def counting_load(file, *args, **kwargs):
        names.append(Path(file).name)
        return load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return names


def _today(path: Path, **dp) -> dict | list[dict]:
    """The reference: every rank file read, as before the rank index existed."""
    every = {
        int(f.stem.split("_")[1]): torch.load(f, weights_only=True)
        for f in sorted(path.glob("rank_*.pt"))
    }
    return loader_resume_state(every, **dp)


def _resume_reads(path: Path, opened: list[str], *, rank: int, world_size: int, **dp):
    opened.clear()
    states, index, same_world = read_resume_rank_states(
        path, rank=rank, world_size=world_size, **dp
    )
    loader = loader_resume_state(states, **dp, index=index)
    own = states.get(rank) if same_world else None
    return set(opened), loader, own


def test_exact_resume_reads_own_file_and_its_dp_ranks_holder(tmp_path: Path, opened: list[str]):
    ckpt = tmp_path / "step_4"
    _write_checkpoint(ckpt, [0, 0, 1, 1], dp_world=2)  # world 4 = dp 2 x tp 2
    total = 0
    for rank in range(4):
        dp = {"dp_rank": rank // 2, "dp_world_size": 2, "num_workers": 0}
        expected = _today(ckpt, **dp)
        files, loader, own = _resume_reads(ckpt, opened, rank=rank, world_size=4, **dp)
        holder = 2 * (rank // 2)  # the lowest global rank of the dp rank
        assert files == {f"rank_{rank}.pt", f"rank_{holder}.pt"}, rank
        assert loader == expected == {"who": f"dp{rank // 2}", "file": holder}
        assert own["rng"] == {"of": rank}
        total += len(files)
    assert total == 6  # 16 before: every rank read every file


def test_elastic_resume_reads_one_file_per_old_dp_rank(tmp_path: Path, opened: list[str]):
    ckpt = tmp_path / "step_4"
    _write_checkpoint(ckpt, [0, 0, 1, 1], dp_world=2)
    for rank in range(4):  # world 4 = dp 4: the dp layout changed
        dp = {"dp_rank": rank, "dp_world_size": 4, "num_workers": 0}
        files, loader, own = _resume_reads(ckpt, opened, rank=rank, world_size=4, **dp)
        assert files == {"rank_0.pt", "rank_2.pt", f"rank_{rank}.pt"}, rank
        assert (
            loader == _today(ckpt, **dp) == [{"who": "dp0", "file": 0}, {"who": "dp1", "file": 2}]
        )
        assert own["rng"] == {"of": rank}
    # Another world size (2 = dp 1 x tp 2): no RNG to restore, so no own file either.
    dp = {"dp_rank": 0, "dp_world_size": 1, "num_workers": 0}
    files, loader, own = _resume_reads(ckpt, opened, rank=1, world_size=2, **dp)
    assert files == {"rank_0.pt", "rank_2.pt"} and own is None
    assert loader == _today(ckpt, **dp)
    # The same dp layout at another world size (8 = dp 2 x tp 4): one file.
    dp = {"dp_rank": 1, "dp_world_size": 2, "num_workers": 0}
    files, loader, own = _resume_reads(ckpt, opened, rank=5, world_size=8, **dp)
    assert files == {"rank_2.pt"} and own is None
    assert loader == _today(ckpt, **dp) == {"who": "dp1", "file": 2}


@pytest.mark.parametrize("index", ["absent", "stale"])
def test_checkpoint_without_a_usable_index_reads_every_rank_file(
    tmp_path: Path, opened: list[str], index: str
):
    ckpt = tmp_path / "step_4"
    _write_checkpoint(ckpt, [0, 0, 1, 1], dp_world=2, index=index == "stale")
    if index == "stale":  # rank files rewritten for another world size by some tool
        (ckpt / "rank_3.pt").unlink()
        (ckpt / "rank_2.pt").unlink()
        _write_checkpoint(tmp_path / "other", [0, 1], dp_world=2, index=False)
        for name in ("rank_0.pt", "rank_1.pt"):
            (tmp_path / "other" / name).replace(ckpt / name)
    dp = {"dp_rank": 1, "dp_world_size": 2, "num_workers": 0}
    expected = _today(ckpt, **dp)
    world = 4 if index == "absent" else 2
    files, loader, own = _resume_reads(ckpt, opened, rank=1, world_size=world, **dp)
    assert files == {p.name for p in ckpt.glob("rank_*.pt")}
    assert loader == expected and own["rng"] == {"of": 1}
