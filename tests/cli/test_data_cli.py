"""``python -m data_pipeline`` as a process: one-line errors without a traceback, and the
``mix`` subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_module_entry_point_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline",
            "train-tokenizer",
            "--input",
            f"en={tmp_path}/missing.txt",
            "--vocab-size",
            "1000",
            "--out",
            str(tmp_path / "tok"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: --input en '{tmp_path}/missing.txt': no such file\n"


def test_mix_is_a_subcommand_of_the_data_cli(clean: Path) -> None:
    import json as _json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "mix", str(clean), "--alpha", "0.5",
         "--tokens", "640", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = _json.loads(result.stdout)["languages"]
    assert [r["lang"] for r in rows] == ["de", "en"]
    assert set(rows[0]) == {"lang", "tokens", "q", "p", "realised"}
    bad = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "mix", str(clean), "--alpha", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
