"""reshard with the trainer: a 1-rank checkpoint resharded to TP2 on 2 ranks resumes to the loss
curve the 1-rank run continues with; the TP2 run's checkpoint exports and verifies."""

from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints_tools import convert
from checkpoints_tools.cli import main
from parallel.testing import run_distributed
from pretrain.config import load_config
from tests.distributed.trainer_runs import fit_rank as _run
from tests.distributed.trainer_runs import logged_losses as _losses
from tests.distributed.trainer_runs import trainer_config as _cfg

pytest.importorskip("transformers")


def test_reshard_1_to_tp2_resumes_the_same_curve(shards, tmp_path: Path):
    ref_dir = tmp_path / "ref"
    base = ("train.eval_every=0", "checkpoint.every=4", "checkpoint.keep=2")
    ref = _cfg("tiny_decoder.yaml", shards, ref_dir, *base)
    assert run_distributed(_run, world_size=1, args=(ref, None)) == [0]
    step4 = ref_dir / "checkpoints" / "step_4"

    resharded = tmp_path / "step_4_tp2"
    argv = ["reshard", str(step4), "--out", str(resharded), "parallel.tp=2", "parallel.dp_shard=1"]
    assert main(argv) == 0
    saved = load_config(resharded / "config.yaml")
    assert (saved.parallel.tp, saved.parallel.dp_shard) == (2, 1)
    assert sorted(p.name for p in resharded.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]

    tp_dir = tmp_path / "tp2"
    tp = _cfg(
        "tiny_decoder.yaml", shards, tp_dir, *base, "parallel.tp=2", f"train.resume={resharded}"
    )
    assert run_distributed(_run, world_size=2, args=(tp, None)) == [0, 0]
    reference, curve = _losses(ref_dir), _losses(tp_dir)
    assert sorted(curve) == [5, 6, 7, 8]
    for step in curve:
        assert curve[step] == pytest.approx(reference[step], abs=1e-4), step

    # a checkpoint written by 2 TP ranks exports and matches transformers' logits
    result = convert.export_hf(
        tp_dir / "checkpoints" / "step_8", out=tmp_path / "hf", tokenizer=shards["tok"], verify=True
    )
    assert result["max_abs_diff"] <= 1e-4
