"""Preemption signals, the non-finite loss guard, and the loss plots."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from pretrain.plots import plot_losses, read_metrics
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
