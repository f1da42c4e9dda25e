"""The trainer on the encoder-decoder family (``configs/tiny_encdec.yaml``) over the sample
shards: T5 span corruption, mBART denoising and translation learn; a stopped run resumes to the
uninterrupted curve bit for bit; on two ranks FSDP2, TP2 (+SP), PP2 and EP2 (Switch-shaped MoE)
give one process's losses and weights on the same global batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from pretrain.checkpoint import complete_checkpoints
from pretrain.plots import read_metrics
from pretrain.preemption import EXIT_PREEMPTED
from tests.distributed.trainer_runs import (
    fit_rank,
    global_batches,
    logged_losses,
    train_on,
    trainer_config,
)

MIX = "objective.weights={t5: 3, translation: 1}"
MBART = (
    "objective.weights={bart: 1, translation: 1}",
    "objective.bart.mask_ratio=0.35",
    "objective.bart.language_token=true",
)


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ((), {"t5"}),
        ((MIX,), {"t5", "translation"}),
        (MBART, {"bart", "translation"}),
    ],
    ids=["span-corruption", "span-corruption+translation", "mbart-denoising+translation"],
)
def test_the_objectives_train(shards, tmp_path: Path, extra: tuple[str, ...], names: set):
    cfg = trainer_config("tiny_encdec.yaml", shards, tmp_path / "run", *extra,
                         "train.steps=12", "checkpoint.every=0", "train.eval_every=12",
                         "optim.lr=3e-3", "logging.peak_tflops=0.5")  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # MFU from the encoder-decoder count: source rows of seq_len, target rows of decoder_len
    from pretrain.data import build_train_loader
    from pretrain.flops import model_flops_per_token
    from pretrain.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    target_len = build_train_loader(cfg, dp_rank=0, dp_world_size=1).dataset.decoder_len
    per_position = model_flops_per_token(model, seq_len=cfg.data.seq_len, decoder_len=target_len)
    for record in records:
        want = record["tokens_per_s"] * per_position / 0.5e12
        assert record["mfu"] == pytest.approx(want, rel=1e-6)
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # A real margin: the mean of the last three steps at least 1 nat under step 1.
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    last = records[-1]
    assert set(last["loss_per_objective"]) == names
    # One objective alone: its loss is the whole loss (token-weighted).
    if len(names) == 1:
        assert last["loss_per_objective"][names.pop()] == pytest.approx(last["loss"], rel=1e-5)
    assert set(last["loss_per_lang"]) <= {"en", "de", "ru", "ja"}
    assert math.isfinite(last["valid_loss"]) and set(last["valid_loss_per_lang"]) >= {"en"}


@pytest.mark.parametrize(
    ("preset", "extra", "share"),
    [
        ("tiny_encdec.yaml", ("objective.weights={translation: 1}",), 1.0),
        ("tiny_encdec.yaml", (MIX,), 0.25),
        ("tiny_encoder.yaml", ("objective.weights={mlm: 1, tlm: 1}",), 0.5),
    ],
    ids=["translation", "span-corruption+translation", "mlm+tlm"],
)
def test_validation_follows_the_objective_mix(shards, tmp_path: Path, preset, extra, share):
    """Held-out pair rows for the pair objectives, mono rows per language for the others, and
    ``valid_loss`` weighing the two as the run weighs its rows."""
    from pretrain.data import build_train_loader, build_valid_loaders

    cfg = trainer_config(preset, shards, tmp_path / "run", *extra, "train.steps=2",
                         "checkpoint.every=0", "train.eval_every=2")  # fmt: skip
    valid = build_valid_loaders(cfg, dp_rank=0, dp_world_size=1)
    assert set(valid["pair"]) == {"en-de"}
    assert bool(valid["lang"]) == (share < 1.0)
    for batch in valid["pair"]["en-de"]:
        if "pair_rows" in batch:  # encoder-decoder: translation rows only
            assert bool(batch["pair_rows"].all())
        else:  # TLM rows: each row holds both languages of the pair
            languages = build_train_loader(cfg, dp_rank=0, dp_world_size=1).dataset.languages
            pair = {languages.index("en"), languages.index("de")}
            for row in batch["lang_ids"]:
                assert set(row[row >= 0].tolist()) == pair
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    pair = last["valid_loss_per_pair"]["en-de"]
    assert math.isfinite(pair) and set(last["valid_loss_per_pair"]) == {"en-de"}
    if share == 1.0:
        assert "valid_loss_per_lang" not in last
        assert last["valid_loss"] == pytest.approx(pair)
    else:
        per_lang = last["valid_loss_per_lang"]
        mono = sum(per_lang.values()) / len(per_lang)
        assert last["valid_loss"] == pytest.approx((1 - share) * mono + share * pair)


def test_stop_and_resume_reproduce_the_uninterrupted_curve(shards, tmp_path: Path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = trainer_config("tiny_encdec.yaml", shards, full_dir, MIX)
    assert run_distributed(fit_rank, world_size=1, args=(full, None)) == [0]
    split = trainer_config("tiny_encdec.yaml", shards, split_dir, MIX)
    assert run_distributed(fit_rank, world_size=1, args=(split, 3)) == [EXIT_PREEMPTED]
    assert [s for s, _ in complete_checkpoints(split_dir / "checkpoints")] == [3]
    resumed = trainer_config("tiny_encdec.yaml", shards, split_dir, MIX, "train.resume=auto")
    assert run_distributed(fit_rank, world_size=1, args=(resumed, None)) == [0]
    reference, curve = logged_losses(full_dir), logged_losses(split_dir)
    assert sorted(reference) == list(range(1, 9))
    assert curve == reference  # bit for bit


LAYOUTS = {
    "fsdp2": ("parallel.dp_shard=2",),
    "tp2": ("parallel.tp=2", "parallel.dp_shard=1"),
    "pp2": ("parallel.pp=2", "parallel.dp_shard=1", "parallel.microbatches=2"),
    # dropless, no jitter, no aux/z losses: capacity, jitter and the balancing losses are
    # per-batch statistics that a split batch computes differently (test_parallel_ep)
    "ep2": (
        "parallel.ep=2",
        "model.moe.dropless=true",
        "model.moe.jitter=0.0",
        "model.moe.aux_loss_coef=0.0",
        "model.moe.z_loss_coef=0.0",
    ),
}


@pytest.mark.parametrize(
    ("preset", "extra", "layout"),
    [
        ("tiny_encdec.yaml", (MIX,), "fsdp2"),
        ("tiny_encdec.yaml", (MIX,), "tp2"),
        ("tiny_encdec.yaml", (MIX,), "pp2"),
        ("tiny_mbart.yaml", MBART, "fsdp2"),
        ("tiny_encdec_moe.yaml", (MIX,), "ep2"),
    ],
    ids=["mt5-fsdp2", "mt5-tp2", "mt5-pp2", "mbart-fsdp2", "switch-ep2"],
)
def test_two_rank_layouts_match_one_process(shards, tmp_path: Path, preset, extra, layout):
    cfg = trainer_config(preset, shards, tmp_path / "run", *extra, *LAYOUTS[layout])
    steps = global_batches(cfg, 3)
    moe_settings = LAYOUTS[layout][1:] if layout == "ep2" else ()
    single = trainer_config(preset, shards, tmp_path / "one", *extra, *moe_settings)
    one = run_distributed(train_on, world_size=1, args=(single, steps))[0]
    two = run_distributed(train_on, world_size=2, args=(cfg, steps))
    merged = {**two[0]["weights"], **two[1]["weights"]}  # pipeline stages: both halves
    for rank in range(2):
        assert two[rank]["losses"] == pytest.approx(one["losses"], rel=1e-5)
        weights = merged if layout == "pp2" else two[rank]["weights"]
        assert weights.keys() == one["weights"].keys()
        for name, value in one["weights"].items():
            # AdamW turns 1e-8 reduction-order differences of near-zero gradients into
            # lr-sized ones (shared notes): 3e-5 after 3 steps at lr 1e-3.
            torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=3e-5)
    # The updates moved the weights by far more than the tolerance.
    moved = max(
        float((one["weights"][n] - w).abs().max())
        for n, w in run_distributed(train_on, world_size=1, args=(single, []))[0]["weights"].items()
    )
    assert moved > 1e-3
