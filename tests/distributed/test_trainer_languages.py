"""Per-language figures of a run: ``model.num_languages`` is checked against the run's language
index (the tokenizer's language list) before the model is built (one line, exit 2, nothing
written), and the train loss per language and per objective and the tokens per language are the
same under tensor and pipeline parallel as in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parallel.testing import run_distributed
from tests.distributed.test_trainer import REPO, shards  # noqa: F401 - fixture


def _train(tmp_path: Path, shards, *overrides: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", str(REPO / "configs" /
         "tiny_decoder.yaml"), f"data.manifest={shards['shards']}", "model.vocab_size=2000",
         f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "optim.warmup_steps=0", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_too_few_language_embeddings_is_one_line_exit_2(shards, tmp_path: Path):  # noqa: F811
    result = _train(tmp_path, shards, "model.num_languages=3")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: model.num_languages (3) must be >= the run's languages (4: de, en, ja, ru), "
        "which index the language embeddings"
    )
    assert not (tmp_path / "run").exists()


def _fit_each(rank: int, world_size: int, cfgs: list) -> list[int]:
    from pretrain.trainer import Trainer

    return [Trainer(cfg, rank=rank, world_size=world_size).fit() for cfg in cfgs]


def _window_metrics(run_dir: Path) -> dict:
    """The last metrics line's loss and per-language / per-objective figures."""
    import json

    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    keys = ("loss", "loss_per_lang", "loss_per_objective", "tokens_per_lang")
    return {key: last.get(key) for key in keys}


def _assert_same_metrics(got: dict, want: dict, label: str) -> None:
    assert got["tokens_per_lang"] == want["tokens_per_lang"], label
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), label
    for key in ("loss_per_lang", "loss_per_objective"):
        assert got[key] is not None, (label, key)
        assert set(got[key]) == set(want[key]), (label, key)
        for name, value in want[key].items():
            assert got[key][name] == pytest.approx(value, rel=1e-5), (label, key, name)


def test_per_language_train_loss_under_tp_and_pp_equals_one_process(shards, tmp_path: Path):  # noqa: F811
    """``loss_per_lang``, ``loss_per_objective`` and ``tokens_per_lang`` of a log window (two
    steps of two micro-batches) under tp 2, pp 2 and pp 2 x tp 2 equal the one-process run's
    (same data, seed and global batch): MLM + TLM on the encoder under pp, CLM on the decoder
    under all three. (The encoder does not train under tp: its MLM head's plain parameters
    beside the DTensors stop a foreach AdamW step.)"""
    from pretrain.config import load_config

    def cfg(preset: str, run_dir: Path, *extra: str):
        return load_config(
            REPO / "configs" / preset,
            [f"data.manifest={shards['shards']}", f"train.run_dir={run_dir}",
             "model.vocab_size=2000", "model.num_layers=2", "model.tie_embeddings=false",
             "data.seq_len=32", "data.batch_size=4", "data.shuffle_buffer=8",
             "train.grad_accum=2", "train.steps=2", "train.deterministic=true",
             # A tiny lr: AdamW's sign-like step would turn 1e-8 gradient noise between layouts
             # into visible parameter differences by the second step.
             "optim.lr=1e-6", "optim.warmup_steps=0", "logging.every=2",
             "logging.tensorboard=false", "checkpoint.every=0", "train.eval_every=0",
             *extra],
        )  # fmt: skip

    pp = ("parallel.pp=2", "parallel.microbatches=2")
    encoder = ("objective.tlm_share=0.25",)
    one = [cfg("tiny_decoder.yaml", tmp_path / "dec"),
           cfg("tiny_encoder.yaml", tmp_path / "enc", *encoder)]  # fmt: skip
    two = {
        "decoder tp2": cfg("tiny_decoder.yaml", tmp_path / "dec_tp2", "parallel.tp=2"),
        "decoder pp2": cfg("tiny_decoder.yaml", tmp_path / "dec_pp2", *pp),
        "encoder pp2": cfg("tiny_encoder.yaml", tmp_path / "enc_pp2", *encoder, *pp),
    }
    assert run_distributed(_fit_each, world_size=1, args=(one,), timeout_s=300) == [[0, 0]]
    codes = run_distributed(_fit_each, world_size=2, args=(list(two.values()),), timeout_s=300)
    assert codes == [[0, 0, 0]] * 2
    # The composition on four ranks: pp 2 x tp 2.
    four = cfg("tiny_decoder.yaml", tmp_path / "dec_pp2_tp2", *pp, "parallel.tp=2")
    assert run_distributed(_fit_each, world_size=4, args=([four],), timeout_s=300) == [[0]] * 4
    two["decoder pp2 x tp2"] = four
    reference = {"decoder": _window_metrics(tmp_path / "dec"),
                 "encoder": _window_metrics(tmp_path / "enc")}  # fmt: skip
    assert set(reference["encoder"]["loss_per_objective"]) == {"mlm", "tlm"}
    assert len(reference["encoder"]["loss_per_lang"]) >= 2
    for label, run in two.items():
        _assert_same_metrics(
            _window_metrics(Path(run.train.run_dir)), reference[label.split()[0]], label
        )
