"""Loss-curve pictures written to the run directory at the end of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes

import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``, skipping a torn last line of a killed run.

    When a resumed run logged a step again, the later record wins.
    """
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(
    metrics_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_language_key: str = "loss_per_lang",
) -> list[Path]:
    """Write ``loss.png`` (overall train and validation loss) and ``loss_<lang>.png`` per language.

    Returns:
        The files written.
    """
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []
    steps = [r["step"] for r in records if "loss" in r]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [r["loss"] for r in records if "loss" in r], label="train")
        valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / "loss.png"))
    languages = sorted({lang for r in records for lang in r.get(per_language_key, {})})
    valid_key = f"valid_{per_language_key}"
    for lang in languages:
        points = [
            (r["step"], r[per_language_key][lang])
            for r in records
            if lang in r.get(per_language_key, {})
        ]
        valid = [(r["step"], r[valid_key][lang]) for r in records if lang in r.get(valid_key, {})]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*points), label=f"train {lang}")
        if valid:
            ax.plot(*zip(*valid), "o-", label=f"validation {lang}")
        ax.set_title(f"loss, {lang}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"loss_{lang}.png"))
    return written


def _save(fig: plt.Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
