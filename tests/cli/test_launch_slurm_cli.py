"""launch.slurm as processes: its script passes ``bash -n``, its CLI exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from launch.slurm import render_sbatch
from tests.unit.sbatch_helpers import slurm_job as _job

REPO = Path(__file__).resolve().parents[2]


def test_script_is_deterministic_and_valid_bash(tmp_path):
    job = _job(tmp_path, run_dir=tmp_path / "run dir with spaces")
    text = render_sbatch(job)
    assert text == render_sbatch(job)
    assert f"RUN_DIR='{tmp_path / 'run dir with spaces'}'" in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_cli_process_exit_code_and_single_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "--config", str(tmp_path / "missing.yaml")]
        + ["--nodes", "1", "--gpus-per-node", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: config file {str(tmp_path / 'missing.yaml')!r} does not exist\n"
