"""launch.preprocess: slicing inputs into array tasks, the plan, the array script, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.preprocess import _Group, deal_groups, main, make_plan, task_index


def _corpus(root: Path, sizes: dict[str, int]) -> None:
    for lang, lines in sizes.items():
        (root / f"{lang}.txt").write_text("word " * 5 * lines)


def test_groups_are_dealt_largest_first_to_the_lightest_task():
    groups = [_Group(n, (n,), b) for n, b in [("a", 10), ("b", 50), ("c", 30), ("d", 25)]]
    tasks = deal_groups(groups, num_tasks=2)
    assert [[g.name for g in t] for t in tasks] == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"--array \(5\) must be <= the number of languages"):
        deal_groups(groups, num_tasks=5)


def test_plan_slices_languages_and_pairs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path, {"en": 40, "de": 30, "fr": 20})
    (tmp_path / "en-de.tsv").write_text("a\tb\n")
    plan = make_plan(
        "shard",
        inputs=["en=en.txt", "de=de.txt", "fr=fr.txt"],
        parallel=["en-de=en-de.tsv"],
        out="shards",
        num_tasks=2,
        extra=["--tokenizer=tok"],
        python="/py",
    )
    assert [t["groups"] for t in plan["tasks"]] == [["en", "en-de"], ["de", "fr"]]
    assert plan["tasks"][0]["argv"] == [
        "/py", "-m", "data_pipeline", "shard",
        "--input=en=en.txt", "--parallel=en-de=en-de.tsv", "--out=shards/part_0", "--tokenizer=tok",
    ]  # fmt: skip
    single = make_plan("shard", inputs=["en=en.txt"], out="shards", num_tasks=1)
    assert single["tasks"][0]["out"] == "shards"


def test_task_index_from_the_array_environment():
    plan = {"tasks": [{}, {}, {}]}
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2"}
    assert task_index(plan, environ=env) == 2
    assert task_index(plan, task=1, environ={}) == 1
    with pytest.raises(ValueError, match=r"--task \(unset\) must be given outside"):
        task_index(plan, environ={})
    with pytest.raises(ValueError, match=r"SLURM_ARRAY_TASK_COUNT \(2\) must equal the plan's"):
        task_index(plan, environ={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MAX": "1"})


def test_dry_run_prints_plan_and_array_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path, {"en": 4, "de": 3})
    args = ["shard", "--tokenizer", "tok", "--input", "en=en.txt", "--input", "de=de.txt"]
    code = main(
        [*args, "--out", "sh", "--array", "2", "--workers", "3", "--dry-run", "--after", "7"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in out
    assert "#SBATCH --cpus-per-task=3" in out
    assert "#SBATCH --dependency=afterok:7" in out
    assert f"run-task {tmp_path / 'sh.jobs' / 'shard.plan.json'}" in out
    assert "--workers=3" in out
    assert not (tmp_path / "sh.jobs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "en=missing.txt", "--array", "1"], "error: --input en 'missing.txt': no"),
        (["--input", "en=en.txt", "--array", "2"], "error: --array (2) must be <= the number"),
        (["--array", "1"], "error: --input or --parallel: give at least one input"),
        (["--input", "en=en.txt", "--time", "soon"], "error: --time ('soon') must be minutes"),
    ],
)
def test_mistakes_are_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path, {"en": 2})
    assert main(["shard", "--tokenizer", "t", "--out", "o", "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_train_tokenizer_is_one_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path, {"en": 2, "de": 2})
    args = ["train-tokenizer", "--input", "en=en.txt", "--input", "de=de.txt", "--out", "tok"]
    assert main([*args, "--array", "2", "--dry-run"]) == 2
    assert "must be 1 for train-tokenizer" in capsys.readouterr().err
    (tmp_path / "en-de.tsv").write_text("a\tb\n")
    assert main([*args, "--parallel", "en-de=en-de.tsv", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --parallel ('en-de=en-de.tsv'): train-tokenizer takes monolingual --input only\n"
    )
    assert main([*args, "--vocab-size", "400", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("#!/bin/bash")[0])
    assert plan["tasks"][0]["argv"][3:] == [
        "train-tokenizer", "--input=de=de.txt", "--input=en=en.txt", "--out=tok",
        "--vocab-size", "400",
    ]  # fmt: skip
