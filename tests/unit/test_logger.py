"""Run logging: console line, JSONL, TensorBoard, per-rank files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from pretrain.config import LoggingConfig
from pretrain.flops import flops_per_token, mfu, peak_flops
from pretrain.logger import RunLogger, flatten_metrics, format_duration, format_step_line

METRICS = {
    "loss": 3.21,
    "lr": 3e-4,
    "grad_norm": 1.5,
    "tokens_per_s": 12345.6,
    "mfu": 0.4123,
    "memory_gib": 1.25,
    "loss_per_lang": {"en": 3.0, "de": 3.5},
}


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_step_line_has_every_field():
    line = format_step_line(METRICS, 20, total_steps=100, eta_s=125.0)
    assert line == (
        "step 20/100 | loss 3.2100 | lr 3.00e-04 | gnorm 1.500 | 12,346 tok/s | MFU 41.2% | "
        "mem 1.25 GiB | ETA 0:02:05"
    )


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(-3) == "0:00:00"


def test_flatten_metrics_nests_with_slashes():
    flat = flatten_metrics({"a": 1, "b": {"c": 2.5, "d": {"e": 3}}, "s": "text", "f": True})
    assert flat == {"a": 1, "b/c": 2.5, "b/d/e": 3, "f": 1.0}


def test_rank0_writes_console_jsonl_tensorboard_and_rank_file(tmp_path: Path):
    console, buffer = _console()
    with RunLogger(
        tmp_path, rank=0, cfg=LoggingConfig(every=1), total_steps=100, console=console
    ) as logger:
        logger.log(METRICS, 10)
        logger.log({**METRICS, "loss": 3.0}, 20)
        logger.info("checkpoint saved")
        assert logger.tensorboard_enabled
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["loss"] == 3.0
    assert records[0]["loss_per_lang"] == {"en": 3.0, "de": 3.5}
    out = buffer.getvalue().splitlines()
    assert out[0].startswith("step 10/100 | loss 3.2100")
    assert out[2] == "checkpoint saved"
    rank_log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert "step 20/100 | loss 3.0000" in rank_log and "checkpoint saved" in rank_log
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_other_ranks_write_only_their_own_file(tmp_path: Path):
    console, buffer = _console()
    with RunLogger(tmp_path, rank=3, cfg=LoggingConfig(), total_steps=10, console=console) as lg:
        lg.log({"loss": 1.0}, 1)
        lg.info("hello")
    assert buffer.getvalue() == ""
    assert not (tmp_path / "metrics.jsonl").exists()
    assert "step 1/10 | loss 1.0000" in (tmp_path / "logs" / "rank_3.log").read_text()


def test_jsonl_appends_on_resume(tmp_path: Path):
    for step in (1, 2):
        console, _ = _console()
        with RunLogger(
            tmp_path, rank=0, cfg=LoggingConfig(tensorboard=False), total_steps=2, console=console
        ) as lg:
            lg.log({"loss": float(step)}, step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_mfu_formula():
    # 6N + 12 L H T with N = 1e9, L = 22, H = 2048, T = 2048
    fpt = flops_per_token(1_000_000_000, num_layers=22, hidden_size=2048, seq_len=2048)
    assert fpt == pytest.approx(6e9 + 12 * 22 * 2048 * 2048)
    assert mfu(10_000, flops_per_token=fpt, peak=989e12) == pytest.approx(10_000 * fpt / 989e12)
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("some cpu") is None
    assert peak_flops("x", override_tflops=100.0) == pytest.approx(1e14)
