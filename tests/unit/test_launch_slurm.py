"""launch.slurm: the generated sbatch script, the config copy beside it, one-line errors."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from launch.slurm import (
    EXIT_PREEMPTED,
    main,
    render_sbatch,
    time_limit_seconds,
)
from pretrain.config import load_config
from tests.unit.sbatch_helpers import sbatch_split as _sbatch_split
from tests.unit.sbatch_helpers import slurm_job as _job

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_decoder.yaml"


def _directives(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SB")]


def test_script_requests_nodes_tasks_gpus_requeue_and_signal(tmp_path):
    text = render_sbatch(_job(tmp_path, partition="gpu", time="1-00:00:00", grace_s=300))
    assert _directives(text) == [
        "--job-name=rosetta",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=1-00:00:00",
        f"--output={tmp_path / 'run' / 'logs' / 'slurm-%j.out'}",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@300",
        "--chdir=/repo",
    ]
    assert text.startswith("#!/bin/bash\n")
    assert "c10d rendezvous hosted on the FIRST node" in text


def test_script_runs_one_torchrun_per_node_with_c10d_on_the_first_node(tmp_path):
    text = render_sbatch(_job(tmp_path, module="my.module"))
    assert 'RDZV_ENDPOINT=$("$PY" -m launch.env rendezvous) || exit 2' in text
    assert "srun --ntasks-per-node=1 --wait=120 \\" in text
    assert '"$PY" -m torch.distributed.run \\' in text
    assert "--nnodes=2 --nproc-per-node=4 \\" in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$SLURM_JOB_ID"' in text
    assert '-m my.module --config "$RUN_DIR/config.yaml" &' in text
    assert "PY=/opt/venv/bin/python" in text
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120" in text


def test_script_traps_the_signal_forwards_it_once_and_requeues(tmp_path):
    text = render_sbatch(_job(tmp_path))
    assert "trap 'on_signal USR1' USR1" in text
    assert "trap 'on_signal TERM' TERM" in text
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert f"exit {EXIT_PREEMPTED}" in text


def test_cpu_nodes_request_cpus_not_gpus(tmp_path):
    directives = _directives(render_sbatch(_job(tmp_path, gpus=False, procs_per_node=3)))
    assert "--cpus-per-task=3" in directives
    assert not any(d.startswith("--gpus") for d in directives)


def test_main_writes_script_and_resolved_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "--config",
            str(TINY),
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--time",
            "30",
            "train.device=cpu",
            "train.run_dir=runs/r1",
            "train.steps=17",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "runs" / "r1"
    script, config = run_dir / "slurm.sbatch", run_dir / "config.yaml"
    assert capsys.readouterr().out == (
        f"wrote {script} and {config}; submit with: sbatch {script}\n"
    )
    assert (run_dir / "logs").is_dir()
    cfg = load_config(config)
    assert cfg.train.steps == 17
    assert cfg.train.run_dir == str(run_dir)
    assert cfg.train.resume == "auto"
    directives = _directives(script.read_text())
    assert "--cpus-per-task=2" in directives
    assert "--job-name=rosetta-r1" in directives
    assert f"--chdir={tmp_path}" in directives


def test_explicit_resume_path_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1"]
    assert main([*args, "train.run_dir=r", "train.resume=/ckpt/step_10"]) == 0
    assert load_config(tmp_path / "r" / "config.yaml").train.resume == "/ckpt/step_10"


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(TINY), "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]
    assert main([*args, "train.run_dir=r"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=8" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0", "--gpus-per-node", "1"], "error: --nodes (0) must be >= 1"),
        (["--nodes", "1", "--gpus-per-node", "0"], "error: --gpus-per-node (0) must be >= 1"),
        (
            ["--nodes", "1", "--gpus-per-node", "1", "--time", "1:2:3:4"],
            "error: --time ('1:2:3:4') must be minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
            "D-HH:MM:SS",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "1", "--time", "2", "--grace", "120"],
            "error: --grace (120 s) must be shorter than --time (2, 120 s)",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "1", "--module", "no-dashes"],
            "error: --module ('no-dashes') must be a dotted Python module name",
        ),
        (
            # The rule's wording belongs to parallel.config; only pin that it reached the user.
            ["--nodes", "1", "--gpus-per-node", "3", "parallel.tp=2"],
            "must divide the world size (3)",
        ),
        (
            ["--nodes", "1", "--gpus-per-node", "1", "train.stepz=3"],
            "error: train.stepz: unknown key in train; did you mean train.steps?",
        ),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(TINY), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_submit_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    args = ["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1", "--submit"]
    assert main([*args, "train.run_dir=r"]) == 2
    assert capsys.readouterr().err == (
        "error: sbatch ('sbatch') not found on PATH: submit on a Slurm login node\n"
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90", 5400), ("5:30", 330), ("1:00:05", 3605), ("2-3", 183600), ("1-00:01", 86460)],
)
def test_time_limit_forms(value, seconds):
    assert time_limit_seconds(value) == seconds


def test_preempted_exit_code_matches_the_trainer():
    # The trainer defines its own constant (pretrain must not import launch); they must agree.
    assert EXIT_PREEMPTED == 75
    for name in ("pretrain.preemption", "pretrain.train"):
        if importlib.util.find_spec(name) is None:
            continue
        trainer_code = getattr(importlib.import_module(name), "EXIT_PREEMPTED", None)
        if trainer_code is not None:
            assert trainer_code == EXIT_PREEMPTED
            return
    pytest.skip("the trainer defines no EXIT_PREEMPTED yet")


@pytest.mark.parametrize("legacy", [False, True])
def test_sbatch_paths_with_spaces_hash_and_quotes_are_quoted(tmp_path, legacy):
    run_dir = tmp_path / "runs dir" / "it's #1 at 100%"
    workdir = Path('/my "repo" \\ here')
    text = render_sbatch(_job(tmp_path, run_dir=run_dir, workdir=workdir))
    lines = [line.removeprefix("#SBATCH") for line in text.splitlines() if line.startswith("#SB")]
    parsed = [arg for line in lines for arg in _sbatch_split(line, legacy=legacy)]
    logs = str(run_dir / "logs").replace("%", "%%")  # "%" is a filename-pattern symbol
    assert f"--output={logs}/slurm-%j.out" in parsed
    assert f"--chdir={workdir}" in parsed
    assert len(parsed) == len(lines)  # one argument per line, nothing cut at a "#"
    # plain paths stay unquoted
    assert "--chdir=/repo" in _directives(render_sbatch(_job(tmp_path)))


def test_a_run_dir_with_a_line_break_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^train.run_dir \(.*\) must not hold a line break"):
        render_sbatch(_job(tmp_path, run_dir=tmp_path / "a\nb"))


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("99:99", "seconds (99) must be < 60"),
        ("1:60:00", "minutes (60) must be < 60"),
        ("1:00:60", "seconds (60) must be < 60"),
        ("1-24", "hours (24) must be < 24"),
        ("1-23:60", "minutes (60) must be < 60"),
        ("2-00:00:75", "seconds (75) must be < 60"),
    ],
)
def test_time_fields_out_of_range_are_one_line_exit_2(tmp_path, capsys, monkeypatch, value, field):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(TINY), "--nodes", "1", "--gpus-per-node", "1", "--time", value]
    assert main([*args, "train.run_dir=r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --time ({value!r}): {field}") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("value", "seconds"), [("36:00:00", 129600), ("120:30", 7230)])
def test_time_first_field_may_be_any_size(value, seconds):
    assert time_limit_seconds(value) == seconds
