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
