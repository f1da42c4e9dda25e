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
from tests.sample_data import REPO


def _train(tmp_path: Path, shards, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config", str(REPO / "configs" /
         "tiny_decoder.yaml"), f"data.manifest={shards['shards']}", "model.vocab_size=2000",
         f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "optim.warmup_steps=0", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_too_few_language_embeddings_is_one_line_exit_2(shards, tmp_path: Path):
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


def test_per_language_train_loss_under_tp_and_pp_equals_one_process(shards, tmp_path: Path):
    """``loss_per_lang``, ``loss_per_objective`` and ``tokens_per_lang`` of a log window (two
    steps of two micro-batches) under tp 2, pp 2 and pp 2 x tp 2 equal the one-process run's
    (same data, seed and global batch): MLM + TLM on the encoder under tp and pp, CLM on the
    decoder under all three."""
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
        "encoder tp2": cfg("tiny_encoder.yaml", tmp_path / "enc_tp2", *encoder, "parallel.tp=2"),
    }
    assert run_distributed(_fit_each, world_size=1, args=(one,), timeout_s=300) == [[0, 0]]
    codes = run_distributed(_fit_each, world_size=2, args=(list(two.values()),), timeout_s=300)
    assert codes == [[0, 0, 0, 0]] * 2
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


def test_moe_routing_metrics_cover_every_micro_batch_and_stage(shards, tmp_path: Path):
    """A dropless top-2 MoE decoder, a log window of two steps of two micro-batches: the
    routed assignments are every token's two choices in every MoE layer (a figure of the last
    micro-batch or one pipeline stage would be a fraction of it), and expert load, expert load
    by language and the z loss under pp 2 equal the one-process run's."""
    from pretrain.config import load_config

    def cfg(run_dir: Path, *extra: str):
        return load_config(
            REPO / "configs" / "tiny_moe.yaml",
            [f"data.manifest={shards['shards']}", f"train.run_dir={run_dir}",
             "model.vocab_size=2000", "model.num_layers=2", "model.tie_embeddings=false",
             "model.moe.dropless=true", "data.seq_len=32", "data.batch_size=4",
             "data.shuffle_buffer=8", "train.grad_accum=2", "train.steps=2",
             "train.deterministic=true", "optim.lr=1e-6", "optim.warmup_steps=0",
             "logging.every=2", "logging.tensorboard=false", "checkpoint.every=0",
             "train.eval_every=0", *extra],
        )  # fmt: skip

    one = cfg(tmp_path / "one")
    two = cfg(tmp_path / "pp2", "parallel.pp=2", "parallel.microbatches=2")
    assert run_distributed(_fit_each, world_size=1, args=([one],), timeout_s=300) == [[0]]
    assert run_distributed(_fit_each, world_size=2, args=([two],), timeout_s=300) == [[0]] * 2
    import json

    want = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    got = json.loads((tmp_path / "pp2" / "metrics.jsonl").read_text().splitlines()[-1])
    tokens = sum(want["tokens_per_lang"].values())
    assert tokens == 2 * 2 * 4 * 32  # steps x micro-batches x rows x positions
    # Two MoE layers (moe.every 1), two choices per token, nothing dropped.
    assert want["moe_routed"] == got["moe_routed"] == tokens * 2 * 2
    assert want["moe_dropped_fraction"] == got["moe_dropped_fraction"] == 0.0
    assert set(want["moe_load_by_lang"]) == {"layers.0.moe", "layers.1.moe"}
    for layer, by_lang in want["moe_load_by_lang"].items():
        assert set(by_lang) == set(want["tokens_per_lang"]), layer
        for lang, shares in by_lang.items():
            assert sum(shares) == pytest.approx(1.0, abs=1e-3), (layer, lang)
            assert got["moe_load_by_lang"][layer][lang] == pytest.approx(shares, abs=1e-4)
    assert got["moe_expert_load"] == pytest.approx(want["moe_expert_load"], abs=1e-4)
    # The z loss is a per-token mean: equal-sized pipeline microbatches average to the whole
    # batch's. The load-balancing loss is a product of per-batch statistics, so a pipeline
    # microbatch's value differs from the whole micro-batch's (Megatron takes it per
    # microbatch too): only its scale is compared.
    assert got["moe_z_loss"] == pytest.approx(want["moe_z_loss"], rel=1e-5)
    assert got["moe_aux_loss"] == pytest.approx(want["moe_aux_loss"], rel=0.05)
