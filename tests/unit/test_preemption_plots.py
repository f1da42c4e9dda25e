"""Preemption signals, the non-finite loss guard, and the loss plots."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from pretrain.plots import (
    experts_by_lang_array,
    plot_experts_by_lang,
    plot_loss_by_lang,
    plot_losses,
    plot_run,
    read_metrics,
)
from pretrain.preemption import EXIT_PREEMPTED, NonFiniteGuard, PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_stop_flag(sig):
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), sig)
        assert handler.received == sig
        assert handler.should_stop()
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) is not handler._handle
    assert EXIT_PREEMPTED == 75


def test_nonfinite_guard_skips_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(1.0)
    assert not guard.check(math.nan) and not guard.check(math.inf)
    assert guard.check(2.0) and guard.consecutive == 0 and guard.total == 2
    for _ in range(3):
        assert not guard.check(math.nan)
    assert guard.diverged
    assert guard.message(9).startswith("loss was NaN/Inf for 3 steps in a row (up to step 9)")
    with pytest.raises(ValueError, match=r"train.max_nonfinite_steps \(0\) must be >= 1"):
        NonFiniteGuard(max_consecutive=0)


def test_loss_plots_per_language(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "loss": 5.0 - s / 10, "loss_per_lang": {"en": 5.0 - s / 10, "ja": 6.0}}
        for s in range(1, 11)
    ]
    lines[4]["valid_loss"] = 4.7
    lines[4]["valid_loss_per_lang"] = {"en": 4.6, "ja": 5.9}
    text = "\n".join(json.dumps(x) for x in lines) + "\n" + '{"step": 11, "lo'  # torn last line
    metrics.write_text(text)
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 11))
    written = plot_losses(metrics, tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "loss_en.png", "loss_ja.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PNG = b"\x89PNG\r\n\x1a\n"


def _run_metrics(path: Path, *, with_moe: bool) -> None:
    lines = [
        {"step": s, "loss": 5.0 - s / 10, "loss_per_lang": {"en": 5.0 - s / 10, "zh": 6.0 - s / 20}}
        for s in range(1, 7)
    ]
    lines[2]["valid_loss_per_lang"] = {"en": 4.6, "zh": 5.9}
    lines[5]["valid_loss_per_lang"] = {"en": 4.3, "zh": 5.6}
    if with_moe:
        # An older record, then the last one: only the last is drawn.
        lines[1]["moe_load_by_lang"] = {"layers.1.moe": {"en": [1.0, 0.0, 0.0, 0.0]}}
        lines[4]["moe_load_by_lang"] = {
            "layers.10.moe": {"en": [0.5, 0.5, 0.0, 0.0], "zh": [0.0, 0.0, 0.25, 0.75]},
            "layers.2.moe": {"en": [0.1, 0.2, 0.3, 0.4], "zh": [0.7, 0.1, 0.1, 0.1]},
        }
        lines[5]["moe_expert_load"] = [0.25, 0.25, 0.25, 0.25]  # a record without the key
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_loss_by_lang_and_experts_by_lang_pictures(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    _run_metrics(metrics, with_moe=True)
    written = plot_run(metrics, tmp_path)
    assert sorted(p.name for p in written) == [
        "experts_by_lang.png",
        "loss.png",
        "loss_by_lang.png",
        "loss_en.png",
        "loss_zh.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG

    step, layers, languages, shares_LNE = experts_by_lang_array(read_metrics(metrics))
    assert step == 5
    assert layers == ["layers.2.moe", "layers.10.moe"]  # natural order, not string order
    assert languages == ["en", "zh"]
    expected = np.array(
        [
            [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]],
            [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]],
        ]
    )
    assert shares_LNE.shape == (2, 2, 4)
    assert np.array_equal(shares_LNE, expected)


def test_experts_picture_pads_a_missing_language_with_nan():
    records = [
        {"step": 3, "moe_load_by_lang": {"layers.0.moe": {"en": [0.5, 0.5], "ja": [1.0, 0.0]},
                                         "layers.1.moe": {"en": [0.0, 1.0]}}},
    ]  # fmt: skip
    _, layers, languages, shares_LNE = experts_by_lang_array(records)
    assert layers == ["layers.0.moe", "layers.1.moe"] and languages == ["en", "ja"]
    assert shares_LNE[1, 0].tolist() == [0.0, 1.0]
    assert np.isnan(shares_LNE[1, 1]).all()


def test_no_experts_picture_without_moe_load_by_lang(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    _run_metrics(metrics, with_moe=False)
    assert experts_by_lang_array(read_metrics(metrics)) is None
    assert plot_experts_by_lang(metrics, tmp_path) == []
    assert not (tmp_path / "experts_by_lang.png").exists()
    assert [p.name for p in plot_loss_by_lang(metrics, tmp_path)] == ["loss_by_lang.png"]
    assert sorted(p.name for p in plot_run(metrics, tmp_path)) == [
        "loss.png",
        "loss_by_lang.png",
        "loss_en.png",
        "loss_zh.png",
    ]
    assert not (tmp_path / "experts_by_lang.png").exists()
