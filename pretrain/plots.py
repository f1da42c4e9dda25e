"""Pictures of a run's ``metrics.jsonl``, written to the run directory at the end of a run.

What to call: ``plot_run(metrics_path, out_dir)`` (every picture) or one of the ``plot_*(
metrics_path, out_dir)`` functions; each returns the files it wrote and writes each file
atomically (a temporary name, then a rename), so a reader never sees a half-drawn picture.
``read_metrics(path)`` gives the records (a torn last line of a killed run skipped; when a
resumed run logged a step again, the later record wins). No process group is used.

- ``loss.png``: overall train and validation loss; ``loss_<lang>.png``: one per language
  (:func:`plot_losses`);
- ``loss_by_lang.png``: every language in one figure, train solid and validation dashed in the
  same colour (:func:`plot_loss_by_lang`);
- ``experts_by_lang.png``: MoE routing from the last record with ``moe_load_by_lang``, one
  heat map per MoE layer, rows = languages, columns = experts, value = the share of that
  language's routed assignments sent to that expert (:func:`plot_experts_by_lang`; the data
  it draws is :func:`experts_by_lang_array`). Not written when no record has the key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def plot_loss_by_lang(
    metrics_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    per_language_key: str = "loss_per_lang",
) -> list[Path]:
    """Write ``loss_by_lang.png``: one line per language, train (``per_language_key``) solid
    and validation (``valid_<per_language_key>``) dashed in the same colour.

    Returns:
        The file written; none when no record holds per-language losses.
    """
    records = read_metrics(metrics_path)
    valid_key = f"valid_{per_language_key}"
    languages = sorted(
        {lang for r in records for key in (per_language_key, valid_key) for lang in r.get(key, {})}
    )
    if not languages:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab10" if len(languages) <= 10 else "tab20")
    for i, lang in enumerate(languages):
        colour = colours(i % colours.N)
        for key, style, label in ((per_language_key, "-", lang), (valid_key, "--", None)):
            points = [(r["step"], r[key][lang]) for r in records if lang in r.get(key, {})]
            if points:
                ax.plot(*zip(*points), style, color=colour, label=label or f"{lang} (valid)")
    ax.set_title("loss by language (dashed: validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return [_save(fig, Path(out_dir) / "loss_by_lang.png")]


def _natural_key(name: str) -> list[Any]:
    """``layers.2.moe`` before ``layers.10.moe``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def experts_by_lang_array(
    records: list[dict],
) -> tuple[int, list[str], list[str], np.ndarray] | None:
    """What ``experts_by_lang.png`` draws, from the last record holding ``moe_load_by_lang``
    (``{"<layer>": {"<lang>": [share of expert 0, share of expert 1, ...]}}``).

    Returns:
        ``(step, layers, languages, shares_LNE)``: layers in natural order, languages sorted,
        ``shares_LNE[l, n, e]`` the share of language ``n``'s routed assignments sent to expert
        ``e`` in layer ``l`` (NaN where a layer has no entry for a language, or fewer experts);
        None when no record has the key.
    """
    last = next((r for r in reversed(records) if r.get("moe_load_by_lang")), None)
    if last is None:
        return None
    load = last["moe_load_by_lang"]
    layers = sorted(load, key=_natural_key)
    languages = sorted({lang for shares in load.values() for lang in shares})
    num_experts = max(len(s) for shares in load.values() for s in shares.values())
    shares_LNE = np.full((len(layers), len(languages), num_experts), np.nan)
    for li, layer in enumerate(layers):
        for ni, lang in enumerate(languages):
            row = load[layer].get(lang)
            if row is not None:
                shares_LNE[li, ni, : len(row)] = row
    return int(last["step"]), layers, languages, shares_LNE


def plot_experts_by_lang(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``experts_by_lang.png``: one heat map per MoE layer (rows languages, columns
    experts, colour the routed share, 0..1) from :func:`experts_by_lang_array`.

    Returns:
        The file written; none when no record has ``moe_load_by_lang``.
    """
    found = experts_by_lang_array(read_metrics(metrics_path))
    if found is None:
        return []
    step, layers, languages, shares_LNE = found
    num_layers, num_langs, num_experts = shares_LNE.shape
    fig, axes = plt.subplots(
        1,
        num_layers,
        figsize=(1.5 + num_layers * max(2.5, 0.35 * num_experts), 1.6 + 0.35 * num_langs),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, layer, shares_NE in zip(axes[0], layers, shares_LNE):
        image = ax.imshow(shares_NE, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(layer, fontsize="small")
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_langs), languages if ax is axes[0][0] else [""] * num_langs)
    fig.colorbar(image, ax=list(axes[0]), label="routed share")
    fig.suptitle(f"expert load by language, step {step}", fontsize="medium")
    return [_save(fig, Path(out_dir) / "experts_by_lang.png")]


def plot_run(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Every picture of the run: :func:`plot_losses`, :func:`plot_loss_by_lang` and
    :func:`plot_experts_by_lang`.

    Returns:
        The files written.
    """
    return [
        *plot_losses(metrics_path, out_dir),
        *plot_loss_by_lang(metrics_path, out_dir),
        *plot_experts_by_lang(metrics_path, out_dir),
    ]


def _save(fig: plt.Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
