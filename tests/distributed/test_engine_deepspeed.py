"""``parallel.engine=deepspeed``: ZeRO-1, 2, 3 and ZeRO-2 / ZeRO-1 CPU offload follow the torch
engine's loss curve (FSDP2 on the same data, seed and initial weights) on 2 gloo ranks; a run
stopped by a signal and resumed under ZeRO-2 and ZeRO-3 reproduces the uninterrupted curve; a
ZeRO-3 checkpoint exports to Hugging Face and verifies; what DeepSpeed cannot combine with is
refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallel.testing import run_distributed
from pretrain.config import load_config, validate_config
from tests.distributed.trainer_runs import fit_rank, logged_losses, trainer_config
from tests.sample_data import REPO

pytest.importorskip("deepspeed", reason="the rosetta[deepspeed] extra is not installed")

BASE = (
    "train.precision=fp32",
    "train.eval_every=0",
    "optim.grad_clip=1.0",
    "checkpoint.every=0",
)
STEPS = 5
TOLERANCE = 1e-5


def _curve(shards, run_dir: Path, *extra: str, steps: int = STEPS, stop_after=None):
    cfg = trainer_config(
        "tiny_decoder.yaml", shards, run_dir, *BASE, f"train.steps={steps}", *extra
    )
    codes = run_distributed(fit_rank, world_size=2, args=(cfg, stop_after), timeout_s=600)
    return codes, logged_losses(run_dir)


@pytest.fixture(scope="module")
def torch_curve(shards, tmp_path_factory):
    codes, curve = _curve(shards, tmp_path_factory.mktemp("fsdp2"))
    assert codes == [0, 0]
    return curve


@pytest.mark.parametrize(
    "extra",
    [
        ("parallel.zero_stage=1",),
        ("parallel.zero_stage=2",),
        ("parallel.zero_stage=3",),
        ("parallel.zero_stage=2", "parallel.cpu_offload=true"),
        ("parallel.zero_stage=1", "parallel.cpu_offload=true"),
    ],
    ids=["zero1", "zero2", "zero3", "zero2-offload", "zero1-offload"],
)
def test_zero_follows_the_torch_engine_curve(shards, tmp_path, torch_curve, extra):
    codes, curve = _curve(shards, tmp_path, "parallel.engine=deepspeed", *extra)
    assert codes == [0, 0]
    assert sorted(curve) == list(range(1, STEPS + 1))
    for step, loss in torch_curve.items():
        assert curve[step] == pytest.approx(loss, rel=TOLERANCE, abs=TOLERANCE), step
    # The updates are real: the loss moves.
    assert curve[STEPS] < curve[1] - 0.1


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_reproduce_the_uninterrupted_curve(shards, tmp_path, stage):
    engine = ("parallel.engine=deepspeed", f"parallel.zero_stage={stage}")
    codes, whole = _curve(shards, tmp_path / "whole", *engine, steps=6)
    assert codes == [0, 0]
    codes, _ = _curve(shards, tmp_path / "split", *engine, steps=6, stop_after=3)
    assert codes == [75, 75]  # EXIT_PREEMPTED after checkpointing step 3
    step_3 = tmp_path / "split" / "checkpoints" / "step_3"
    assert (step_3 / ".metadata").is_file() and (step_3 / "deepspeed" / "zero").is_dir()
    codes, _ = _curve(shards, tmp_path / "split", *engine, "train.resume=auto", steps=6)
    assert codes == [0, 0]
    split = logged_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for step, loss in whole.items():
        assert split[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step


def test_zero3_checkpoint_exports_and_verifies(shards, tmp_path):
    from checkpoints_tools.cli import main

    engine = ("parallel.engine=deepspeed", "parallel.zero_stage=3")
    codes, _ = _curve(shards, tmp_path / "run", *engine, steps=2)
    assert codes == [0, 0]
    out = tmp_path / "hf"
    code = main(
        ["export-hf", str(tmp_path / "run" / "checkpoints" / "step_2"), "--out", str(out),
         "--verify"]
    )  # fmt: skip
    assert code == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


TINY = REPO / "configs" / "tiny_decoder.yaml"


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (["parallel.tp=2"], 2, "parallel.tp (2) must be 1 with parallel.engine=deepspeed: ZeRO "
         "is data parallel only (use engine=torch for TP/PP/EP/HSDP)"),
        (["parallel.pp=2", "model.tie_embeddings=false"], 2, "parallel.pp (2) must be 1 with "
         "parallel.engine=deepspeed: ZeRO is data parallel only (use engine=torch for "
         "TP/PP/EP/HSDP)"),
        (["parallel.zero_stage=4"], 2, "parallel.zero_stage (4) must be one of 1, 2, 3"),
        (["parallel.compile=true"], 2,
         "parallel.compile (True) must be false with parallel.engine=deepspeed"),
        (["checkpoint.async=true"], 2, "checkpoint.async (True) must be false with "
         "parallel.engine=deepspeed (DeepSpeed saves synchronously)"),
        (["train.precision=fp16"], 2,
         "train.precision (fp16) must be fp32 or bf16 with parallel.engine=deepspeed"),
    ],
)  # fmt: skip
def test_combinations_deepspeed_cannot_do_are_refused(overrides, world_size, message):
    cfg = load_config(TINY, ["parallel.engine=deepspeed", "train.run_dir=unused", *overrides])
    with pytest.raises(ValueError) as err:
        validate_config(cfg, world_size=world_size)
    assert str(err.value) == message


def test_moe_with_zero3_is_refused():
    cfg = load_config(
        REPO / "configs" / "tiny_moe.yaml",
        ["parallel.engine=deepspeed", "parallel.zero_stage=3", "train.run_dir=unused"],
    )
    with pytest.raises(ValueError) as err:
        validate_config(cfg, world_size=2)
    assert str(err.value) == (
        "parallel.zero_stage (3) must be 1 or 2 for an MoE model (model.moe.num_experts 4) "
        "with parallel.engine=deepspeed"
    )


def test_electra_under_zero2_matches_one_process(shards, tmp_path):
    """ELECTRA's two passes and sampled replacements inside the DeepSpeed engine's forward: two
    ZeRO-2 ranks give one process's losses."""
    from tests.distributed.trainer_runs import global_batches, train_on

    extra = ("objective.weights={electra: 1}", "data.seq_len=64", "model.dropout=0.0")
    cfg = trainer_config("tiny_encoder.yaml", shards, tmp_path / "two", *extra,
                         "parallel.engine=deepspeed", "parallel.zero_stage=2")  # fmt: skip
    steps = global_batches(cfg, 3)
    single = trainer_config("tiny_encoder.yaml", shards, tmp_path / "one", *extra)
    one = run_distributed(train_on, world_size=1, args=(single, steps))[0]
    two = run_distributed(train_on, world_size=2, args=(cfg, steps), timeout_s=600)
    for rank in range(2):
        assert two[rank]["losses"] == pytest.approx(one["losses"], rel=TOLERANCE), rank
    assert one["losses"][-1] < one["losses"][0]
