"""``model.num_languages`` is checked against the run's language index (the tokenizer's
language list) before the model is built: one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
