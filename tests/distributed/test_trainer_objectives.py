"""An objective added through the registry trains end to end: SpanBERT span masking
(``objective.weights={span: 1}``) reaches the loader as span-masked rows (whole-word spans, the
masking rate of ``objective.mask_prob``) and the trainer, which logs it as its own objective;
ERNIE-M's BTMLM (``{btmlm: 1}``, a model pass of its own before the loss) trains, and under
FSDP2 and TP2 gives one process's losses and weights; MLM, span masking and TLM mixed row by row
in one batch train, each logged as its own objective, and match one process under TP2; NSP and
SOP (token loss + pair loss) train, log their pair loss and accuracy, and match one process under
FSDP2 and TP2; ELECTRA (generator masked LM + discriminator) trains, logs its discriminator's
loss and accuracy, and matches one process under FSDP2 and TP2 with sequence parallel; SimCSE
and XLCo train beside MLM rows and match one process under TP2+SP and FSDP2 (their negatives
gathered over the dp ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.transforms import IGNORE_INDEX, MaskingConfig
from parallel.testing import run_distributed
from pretrain.plots import read_metrics
from tests.distributed.trainer_runs import fit_rank, global_batches, train_on, trainer_config
from tests.selections import runs_of


def _selection(shards, objective: str):
    cfg = DataConfig(manifest=str(shards["shards"]), seq_len=128, batch_size=8, num_workers=0)
    loader = build_loader(
        cfg, dp_rank=0, dp_world_size=1, objective=objective, masking=MaskingConfig(), seed=3
    )
    batches = iter(loader)
    rows = [next(batches) for _ in range(4)]
    labels = np.concatenate([b["labels"].numpy() for b in rows])
    inputs = np.concatenate([b["input_ids"].numpy() for b in rows])
    return labels != IGNORE_INDEX, labels, inputs


def test_span_rows_select_whole_spans_at_the_masking_rate(shards):
    span, labels, _ = _selection(shards, "span")
    token, _, _ = _selection(shards, "mlm")
    # The masking rate: ceil(15%) of each row's maskable tokens (at most 128).
    rates = span.sum(axis=1) / span.shape[1]
    assert np.all((rates >= 0.14) & (rates <= 0.17)), rates
    # Spans, not tokens: SpanBERT's mean span is 3.8 words (more pieces), BERT's selection
    # leaves mostly single positions.
    span_mean = np.mean([r for row in span for r in runs_of(row)])
    token_mean = np.mean([r for row in token for r in runs_of(row)])
    assert span_mean > 2.5 and token_mean < 1.5, (span_mean, token_mean)
    assert np.all(labels[span] >= 0)


def test_the_span_objective_trains_and_is_logged_as_its_own(shards, tmp_path):
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", "objective.weights={span: 1.0}",
        "train.precision=fp32", "checkpoint.every=0", "train.eval_every=0", "train.steps=6",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(set(r["loss_per_objective"]) == {"span"} for r in records)
    losses = [r["loss"] for r in records]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The per-objective loss is the whole loss here (one objective, token-weighted).
    for record in records:
        assert record["loss_per_objective"]["span"] == pytest.approx(record["loss"], rel=1e-5)


def test_btmlm_trains_and_is_logged_as_its_own(shards, tmp_path):
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", "objective.weights={btmlm: 1}",
        "data.seq_len=64", "data.batch_size=8", "train.steps=16", "checkpoint.every=0",
        "train.eval_every=16", "optim.lr=3e-3",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(set(r["loss_per_objective"]) == {"btmlm"} for r in records)
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and all(np.isfinite(losses))
    # a real margin: the last four steps' mean at least 0.3 nat under the first four's
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    # the source side's tokens only: 30 a row of 64 positions
    assert all(sum(r["tokens_per_lang"].values()) == 8 * 30 for r in records)
    assert np.isfinite(records[-1]["valid_loss"])


MIXED = "objective.weights={mlm: 1, span: 2, tlm: 1}"


def test_mixed_objectives_train_and_are_logged_each(shards, tmp_path):
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", MIXED, "data.batch_size=8",
        "checkpoint.every=0", "train.eval_every=8", "logging.every=4",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8]
    for record in records:
        per_objective = record["loss_per_objective"]
        assert set(per_objective) == {"mlm", "span", "tlm"}
        assert all(np.isfinite(v) for v in per_objective.values())
    assert np.isfinite(records[-1]["valid_loss"])


def test_spanbert_trains_and_logs_its_boundary_loss(shards, tmp_path):
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", "objective.weights={spanbert: 1}",
        "data.seq_len=64", "data.batch_size=8", "train.steps=12", "checkpoint.every=0",
        "train.eval_every=12", "logging.every=4", "optim.lr=3e-3",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    sbo = [r["span_boundary_loss"]["spanbert"] for r in records]
    mlm = [r["loss_per_objective"]["spanbert"] for r in records]
    assert len(sbo) == 3 and sbo[-1] < sbo[0] - 0.3 and mlm[-1] < mlm[0] - 0.3, (sbo, mlm)
    # the logged loss is the two means added
    assert records[-1]["loss"] > mlm[-1] + 1.0
    assert np.isfinite(records[-1]["valid_loss"])


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_sentence_pair_objectives_train(shards, tmp_path, task):
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", f"objective.weights={{{task}: 1}}",
        "data.seq_len=64", "data.batch_size=8", "train.steps=12", "checkpoint.every=0",
        "train.eval_every=12", "logging.every=4", "optim.lr=3e-3",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:
        pair = record["sentence_loss"][task]
        # near ln 2 at this scale: the pair head starts from chance
        assert 0.3 < pair < 1.2 and 0.0 <= record["sentence_accuracy"][task] <= 1.0
        assert set(record["loss_per_objective"]) == {task}
    mlm = [r["loss_per_objective"][task] for r in records]
    assert mlm[-1] < mlm[0] - 0.3, mlm
    assert np.isfinite(records[-1]["valid_loss"])


def test_electra_trains_and_logs_its_discriminator(shards, tmp_path):
    cfg = trainer_config(
        "tiny_electra.yaml", shards, tmp_path / "run", "data.seq_len=64", "data.batch_size=8",
        "train.steps=12", "checkpoint.every=0", "train.eval_every=12", "optim.lr=3e-3",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    rtd = [r["rtd_loss"]["electra"] for r in records]
    gen = [r["loss_per_objective"]["electra"] for r in records]
    # both learn: the discriminator's BCE and the generator's masked LM (first 4 vs last 4 steps)
    assert sum(rtd[-4:]) / 4 < sum(rtd[:4]) / 4 - 0.1, rtd
    assert sum(gen[-4:]) / 4 < sum(gen[:4]) / 4 - 0.3, gen
    for record in records:
        assert 0.0 <= record["rtd_accuracy"]["electra"] <= 1.0
        # the logged loss: the generator's mean plus 50 times the discriminator's
        want = record["loss_per_objective"]["electra"] + 50 * record["rtd_loss"]["electra"]
        assert record["loss"] == pytest.approx(want, rel=1e-4), (record["loss"], want)
    assert np.isfinite(records[-1]["valid_loss"])


def test_prefix_lm_trains_beside_translation(shards, tmp_path):
    cfg = trainer_config(
        "tiny_encdec.yaml", shards, tmp_path / "run",
        "objective.weights={prefix_lm: 3, translation: 1}", "data.batch_size=8", "train.steps=12",
        "checkpoint.every=0", "train.eval_every=12", "optim.lr=3e-3",
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(set(r["loss_per_objective"]) == {"prefix_lm", "translation"} for r in records)
    prefix = [r["loss_per_objective"]["prefix_lm"] for r in records]
    assert sum(prefix[-4:]) / 4 < sum(prefix[:4]) / 4 - 0.3, prefix
    assert np.isfinite(records[-1]["valid_loss"])


@pytest.mark.parametrize(
    ("weights", "extra"),
    [("{xlco: 1, mlm: 1}", ()), ("{simcse: 1, mlm: 1}", ("model.dropout=0.1",))],
    ids=["xlco", "simcse"],
)
def test_contrastive_objectives_train_beside_mlm(shards, tmp_path, weights, extra):
    name = weights[1:].split(":")[0]
    cfg = trainer_config(
        "tiny_encoder.yaml", shards, tmp_path / "run", f"objective.weights={weights}",
        "data.seq_len=64", "data.batch_size=8", "train.steps=12", "checkpoint.every=0",
        "train.eval_every=12", "optim.lr=3e-3", *extra,
    )  # fmt: skip
    assert run_distributed(fit_rank, world_size=1, args=(cfg, None)) == [0]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for record in records:
        # the logged loss: the MLM rows' mean plus the contrastive examples' mean
        want = record["loss_per_objective"]["mlm"] + record["contrastive_loss"][name]
        assert record["loss"] == pytest.approx(want, rel=1e-4), (record["loss"], want)
        assert 0.0 <= record["contrastive_accuracy"][name] <= 1.0
    mlm = [r["loss_per_objective"]["mlm"] for r in records]
    assert sum(mlm[-4:]) / 4 < sum(mlm[:4]) / 4 - 0.2, mlm
    if name == "xlco":  # translation ranking learns within 12 steps (SimCSE starts near 0)
        contrast = [r["contrastive_loss"][name] for r in records]
        assert sum(contrast[-4:]) / 4 < sum(contrast[:4]) / 4 - 0.2, contrast
    assert np.isfinite(records[-1]["valid_loss"])


@pytest.mark.parametrize(
    ("objective", "layout"),
    [
        ("objective.weights={btmlm: 1}", ("parallel.dp_shard=2",)),
        ("objective.weights={btmlm: 1}", ("parallel.tp=2", "parallel.dp_shard=1")),
        (MIXED, ("parallel.tp=2", "parallel.dp_shard=1")),
        ("objective.weights={nsp: 1}", ("parallel.dp_shard=2",)),
        (
            "objective.weights={sop: 1}",
            ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=1"),
        ),
        ("objective.weights={spanbert: 1}", ("parallel.dp_shard=2",)),
        (
            "objective.weights={spanbert: 1, tlm: 1}",
            ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=1"),
        ),
        ("objective.weights={electra: 1}", ("parallel.dp_shard=2",)),
        ("objective.weights={xlco: 1, mlm: 3}", ("parallel.dp_shard=2",)),
        (
            "objective.weights={simcse: 1, mlm: 1}",
            ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=1"),
        ),
        (
            "objective.weights={mlm: 1, tlm: 0.5, electra: 1}",
            ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp_shard=1"),
        ),
    ],
    ids=[
        "btmlm-fsdp2",
        "btmlm-tp2",
        "mixed-tp2",
        "nsp-fsdp2",
        "sop-tp2-sp",
        "spanbert-fsdp2",
        "spanbert-tlm-tp2-sp",
        "electra-fsdp2",
        "xlco-mlm-fsdp2",
        "simcse-mlm-tp2-sp",
        "electra-mlm-tlm-tp2-sp",
    ],
)
def test_two_rank_layouts_match_one_process(shards, tmp_path, objective, layout):
    """BTMLM's fill pass and ELECTRA's sampled replacements too: a rank that filled a
    placeholder or drew a replacement differently would train on other inputs and part from
    one process's losses and weights."""
    extra = (objective, "data.seq_len=64", "model.dropout=0.0")
    cfg = trainer_config("tiny_encoder.yaml", shards, tmp_path / "two", *extra, *layout)
    steps = global_batches(cfg, 3)
    single = trainer_config("tiny_encoder.yaml", shards, tmp_path / "one", *extra)
    one = run_distributed(train_on, world_size=1, args=(single, steps))[0]
    two = run_distributed(train_on, world_size=2, args=(cfg, steps))
    for rank in range(2):
        assert two[rank]["losses"] == pytest.approx(one["losses"], rel=1e-5)
        for name, value in one["weights"].items():
            torch.testing.assert_close(two[rank]["weights"][name], value, rtol=1e-5, atol=3e-5)
