"""Atomic DCP checkpoints: resume is bit-exact, partial saves are never loaded, keep-N prunes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from parallel.testing import run_distributed
from pretrain.checkpoint import (
    CheckpointManager,
    TrainState,
    complete_checkpoints,
    latest_checkpoint,
    rng_state,
    set_rng_state,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def _batch(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 8, generator=gen)


def _train(model, opt, sched, steps: range, rank: int) -> list[float]:
    losses = []
    for step in steps:
        loss = model(_batch(step, rank)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _setup(shard: bool):
    model = _model()
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _resume_case(rank: int, world_size: int, run_dir: str, async_save: bool) -> dict:
    shard = world_size > 1
    model, opt, sched = _setup(shard)
    full = _train(model, opt, sched, range(6), rank)

    model, opt, sched = _setup(shard)
    manager = CheckpointManager(run_dir, keep=2, async_save=async_save)
    first = _train(model, opt, sched, range(3), rank)
    manager.save(3, TrainState(model, opt, sched, step=3), rank_state={"rank": rank, "x": [1, 2]})
    manager.close()

    model, opt, sched = _setup(shard)
    state = TrainState(model, opt, sched)
    rank_states = manager.load(latest_checkpoint(Path(run_dir) / "checkpoints"), state)
    rest = _train(model, opt, sched, range(state.step, 6), rank)
    return {
        "full": full,
        "resumed": first + rest,
        "step": state.step,
        "rank_states": rank_states,
        "lr": opt.param_groups[0]["lr"],
    }


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_is_bit_exact_single_process(tmp_path: Path, async_save: bool):
    out = _resume_case(0, 1, str(tmp_path), async_save)
    assert out["step"] == 3
    assert out["resumed"] == out["full"]
    assert out["rank_states"] == {0: {"rank": 0, "x": [1, 2]}}


def test_resume_is_bit_exact_fsdp2_two_ranks(tmp_path: Path):
    results = run_distributed(_resume_case, world_size=2, args=(str(tmp_path), False))
    for rank, out in enumerate(results):
        assert out["resumed"] == out["full"], f"rank {rank}"
        assert sorted(out["rank_states"]) == [0, 1]
        assert out["rank_states"][1]["rank"] == 1


def test_partial_checkpoint_is_never_latest_and_keep_prunes(tmp_path: Path):
    model, opt, sched = _setup(False)
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(step, TrainState(model, opt, sched, step=step), rank_state={})
    root = tmp_path / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [2, 3]
    # A save killed half-way leaves only a partial directory.
    partial = root / ".step_4.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert latest_checkpoint(root) == root / "step_3"
    # A later save of that step replaces the leftover.
    manager.save(4, TrainState(model, opt, sched, step=4), rank_state={})
    assert latest_checkpoint(root) == root / "step_4" and not partial.exists()


def test_loading_an_incomplete_checkpoint_is_one_line(tmp_path: Path):
    model, opt, sched = _setup(False)
    with pytest.raises(
        ValueError, match=r"^checkpoint '.*' is incomplete or not a DCP checkpoint$"
    ):
        CheckpointManager(tmp_path, keep=1).load(tmp_path / "nope", TrainState(model, opt, sched))


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoint_of_another_model_is_refused_with_one_line(tmp_path: Path):
    from pretrain.checkpoint import check_compatible
    from pretrain.config import config_to_dict, config_to_yaml, load_config

    saved_cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny_encoder.yaml")
    model, opt, sched = _setup(False)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(
        1,
        TrainState(model, opt, sched, step=1),
        rank_state={},
        config_yaml=config_to_yaml(saved_cfg),
    )
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    check_compatible(ckpt, config_to_dict(saved_cfg)["model"])  # same model: fine
    run_cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny_decoder.yaml")
    with pytest.raises(ValueError) as err:
        check_compatible(ckpt, config_to_dict(run_cfg)["model"])
    assert str(err.value) == (
        f"checkpoint '{ckpt}' holds model.family='encoder' but this run has "
        "model.family='decoder'; a different model cannot resume it"
    )


# --- async saves complete on their own; per-rank reads on resume ------------------------------


def _async_completes_case(rank: int, world_size: int, run_dir: str) -> dict:
    import time

    model, opt, sched = _setup(True)
    manager = CheckpointManager(run_dir, keep=2, async_save=True)
    _train(model, opt, sched, range(2), rank)
    manager.save(2, TrainState(model, opt, sched, step=2), rank_state={"rank": rank})
    root = Path(run_dir) / "checkpoints"
    deadline = time.monotonic() + 60
    while latest_checkpoint(root) is None and time.monotonic() < deadline:
        time.sleep(0.05)  # no further save, no close: the write's end completes it
    seen = [s for s, _ in complete_checkpoints(root)]
    manager.close()
    return {"seen": seen, "after_close": [s for s, _ in complete_checkpoints(root)]}


def test_async_save_is_complete_once_written_without_a_next_save(tmp_path: Path):
    results = run_distributed(_async_completes_case, world_size=2, args=(str(tmp_path),))
    assert [r["seen"] for r in results] == [[2], [2]]
    assert [r["after_close"] for r in results] == [[2], [2]]
    step_2 = tmp_path / "checkpoints" / "step_2"
    assert sorted(p.name for p in step_2.glob("rank_*")) == [
        "rank_0.done",
        "rank_0.pt",
        "rank_1.done",
        "rank_1.pt",
        "rank_index.json",
    ]
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_recover_completes_only_fully_written_partials(tmp_path: Path):
    model, opt, sched = _setup(False)
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        manager.save(step, TrainState(model, opt, sched, step=step), rank_state={"r": 0})
    root = tmp_path / "checkpoints"
    # Killed between the last done-marker and the rename: fully written, still partial.
    (root / "step_2").rename(root / ".step_2.partial")
    # Killed before rank 0's write ended: no marker.
    manager.save(3, TrainState(model, opt, sched, step=3), rank_state={"r": 0})
    (root / "step_3" / "rank_0.done").unlink()
    (root / "step_3").rename(root / ".step_3.partial")
    assert [s for s, _ in complete_checkpoints(root)] == [1]
    assert manager.recover() == [2]
    assert [s for s, _ in complete_checkpoints(root)] == [1, 2]
    assert (root / ".step_3.partial").is_dir()
    assert manager.recover() == []


def _rank_reads_case(rank: int, world_size: int, run_dir: str) -> dict:
    """Save as a dp 2 x tp 2 run would (peers of a dp rank share a loader state), then resume
    on every rank with a counting ``torch.load``: exactly and elastically (dp 4)."""
    import json

    from pretrain.checkpoint import read_rank_states
    from pretrain.data import loader_resume_state, read_resume_rank_states

    model, opt, sched = _setup(True)
    manager = CheckpointManager(run_dir, keep=1)
    dp_rank = rank // 2
    coordinate = {"rank": dp_rank, "world_size": 2, "num_workers": 0}
    manager.save(
        1,
        TrainState(model, opt, sched, step=1),
        rank_state={"rng": {"of": rank}, "loader": {"dp": dp_rank}, "dp": coordinate},
        index_entry={"dp": coordinate},
    )
    path = latest_checkpoint(Path(run_dir) / "checkpoints")
    every = read_rank_states(path)  # the reference: all of them, as before the index
    opened: list[str] = []
    load = torch.load

    def counting_load(file, *args, **kwargs):
        opened.append(Path(file).name)
        return load(file, *args, **kwargs)

    out: dict = {"index": json.loads((path / "rank_index.json").read_text())}
    torch.load = counting_load
    try:
        for name, dp in (
            ("exact", {"dp_rank": dp_rank, "dp_world_size": 2, "num_workers": 0}),
            ("elastic", {"dp_rank": rank, "dp_world_size": 4, "num_workers": 0}),
        ):
            opened.clear()
            states, index, same_world = read_resume_rank_states(
                path, rank=rank, world_size=world_size, **dp
            )
            out[name] = {
                "files": sorted(opened),
                "matches": loader_resume_state(states, **dp, index=index)
                == loader_resume_state(every, **dp),
                "rng": states[rank]["rng"] if same_world else None,
            }
    finally:
        torch.load = load
    return out


def test_each_rank_reads_only_the_rank_files_it_needs_at_four_ranks(tmp_path: Path):
    results = run_distributed(_rank_reads_case, world_size=4, args=(str(tmp_path),))
    dp = [{"dp": {"num_workers": 0, "rank": r // 2, "world_size": 2}} for r in range(4)]
    for rank, out in enumerate(results):
        assert out["index"] == {"world_size": 4, "ranks": {str(r): dp[r] for r in range(4)}}
        holder = 2 * (rank // 2)
        assert out["exact"]["files"] == sorted({f"rank_{rank}.pt", f"rank_{holder}.pt"})
        assert out["elastic"]["files"] == sorted({f"rank_{rank}.pt", "rank_0.pt", "rank_2.pt"})
        for name in ("exact", "elastic"):
            assert out[name]["matches"] and out[name]["rng"] == {"of": rank}, (rank, name)
