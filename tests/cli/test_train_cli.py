"""``python -m pretrain.train`` as a user runs it: one-line errors with exit code 2, the dry
run's resolved layout, overrides in any order, the help text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_decoder.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.num_head=3"],
            "model.num_head: unknown key in model; did you mean model.num_heads?",
        ),
        (["model.num_heads=x"], "model.num_heads ('x') must be an int"),
        (["train.steps=-5"], "train.steps (-5) must be >= 1"),
        (
            ["parallel.tp=2", "parallel.dp_shard=3"],
            "parallel.dp_replicate (1) x parallel.dp_shard (3) x parallel.tp (2) x parallel.pp (1)"
            " = 6 must equal the world size (4)",
        ),
    ],
)
def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path, overrides, message):
    result = _cli("--config", str(TINY), "--dry-run", "--world-size", "4", *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file(tmp_path: Path):
    result = _cli("--config", "nope.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config file 'nope.yaml' does not exist"


def test_cli_dry_run_resolves_dp_shard(tmp_path: Path):
    result = _cli(
        "--config",
        str(TINY),
        "--dry-run",
        "--world-size",
        "8",
        "parallel.tp=2",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    plan = yaml.safe_load(result.stdout)
    assert plan["mesh"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2}


def test_cli_takes_overrides_and_options_in_any_order(tmp_path: Path):
    # An override before --config, and one after --dry-run and its options.
    result = _cli("parallel.tp=2", "--config", str(TINY), "--dry-run", "--world-size", "8",
                  "--json", "model.num_layers=3", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = yaml.safe_load(result.stdout)
    assert plan["mesh"]["tp"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--world-size", "0"], "--world-size (0) must be >= 1"),
        (["--dry-run", "--world-size", "-3"], "--world-size (-3) must be >= 1"),
    ],
)
def test_cli_bad_world_size_is_one_line(tmp_path: Path, args, message):
    result = _cli("--config", str(TINY), *args, cwd=tmp_path)
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {message}")


def test_cli_config_that_is_a_directory_is_one_line(tmp_path: Path):
    result = _cli("--config", str(REPO / "configs"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: config file {str(REPO / 'configs')!r} is a directory; --config takes a YAML file"
    )


def test_help_says_checkpoints_are_trusted_input_and_names_the_exit_codes(tmp_path: Path):
    from pretrain.config import TrainConfig

    result = _cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "DCP checkpoints (train.resume) are trusted input: their metadata is a pickle" in text
    assert "train.overwrite=true" in text and "3 stopped on NaN/Inf" in text
    source = (REPO / "pretrain" / "config.py").read_text()
    resume_doc = source.split("resume: str =")[1].split("overwrite: bool")[0]
    assert "trusted" in resume_doc and "pickle" in resume_doc
    assert TrainConfig().overwrite is False


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny_electra.yaml", ()),
        ("tiny_encoder.yaml", ("objective.weights={simcse: 1, mlm: 1}", "model.dropout=0.1")),
        ("tiny_encoder.yaml", ("objective.weights={xlco: 1, mlm: 3}",)),
    ],
    ids=["electra", "simcse", "xlco"],
)
def test_cli_trains_the_newer_objectives_on_the_sample(shards, tmp_path: Path, preset, overrides):
    """The CLI, as a user runs the tiny presets on the sample's shards with a few overrides:
    validated, trained, the objective's own metrics logged."""
    import json

    run = tmp_path / "run"
    result = _cli(
        "--config", str(REPO / "configs" / preset), f"data.manifest={shards['shards']}",
        f"train.run_dir={run}", "model.vocab_size=2000", "data.seq_len=64", "data.batch_size=8",
        "train.steps=3", "optim.warmup_steps=1", "checkpoint.every=0", "logging.every=1",
        "logging.tensorboard=false",
        *overrides, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    key = "rtd_loss" if preset == "tiny_electra.yaml" else "contrastive_loss"
    assert all(key in r for r in records), records[-1].keys()
