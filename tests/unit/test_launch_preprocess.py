"""launch.preprocess: slicing inputs into array tasks, the plan, the array script, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

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
    assert main([*args, "--vocab-size", "400", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("#!/bin/bash")[0])
    assert plan["tasks"][0]["argv"][3:] == [
        "train-tokenizer", "--input=de=de.txt", "--input=en=en.txt", "--out=tok",
        "--vocab-size", "400",
    ]  # fmt: skip


def test_train_tokenizer_takes_the_pairs_too(tmp_path, monkeypatch, capsys):
    # before: refused ("train-tokenizer takes monolingual --input only"), so a language seen
    # only in pairs could not be sharded
    monkeypatch.chdir(tmp_path)
    _corpus(tmp_path, {"en": 2})
    (tmp_path / "en-ko.tsv").write_text("a\tb\n")
    (tmp_path / "x.en").write_text("a\n")
    (tmp_path / "x.de").write_text("b\n")
    args = ["train-tokenizer", "--input", "en=en.txt", "--parallel", "en-ko=en-ko.tsv"]
    args += ["--parallel", "en-de=x.en,x.de", "--out", "tok", "--vocab-size", "400"]
    assert main([*args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("#!/bin/bash")[0])
    assert plan["tasks"][0]["groups"] == ["en", "en-de", "en-ko"]
    assert plan["tasks"][0]["argv"][3:] == [
        "train-tokenizer", "--input=en=en.txt", "--parallel=en-de=x.en,x.de",
        "--parallel=en-ko=en-ko.tsv", "--out=tok", "--vocab-size", "400",
    ]  # fmt: skip


def test_a_truncated_input_fails_the_local_task_with_exit_2(tmp_path, monkeypatch, capfd):
    # the data command's one line and exit code come through launch.preprocess
    monkeypatch.chdir(tmp_path)
    text = "".join(f"document {i}\n" for i in range(5000)).encode()
    data = zstandard.ZstdCompressor().compress(text)
    (tmp_path / "en.txt.zst").write_bytes(data[: len(data) // 2])
    argv = ["train-tokenizer", "--input", "en=en.txt.zst", "--out", "tok", "--vocab-size", "400"]
    assert main([*argv, "--local"]) == 2
    err = capfd.readouterr().err
    assert "error: input 'en.txt.zst': truncated zstd data" in err
    assert not (tmp_path / "tok").exists()


def test_array_and_merge_scripts_quote_paths_with_spaces_and_hash(tmp_path, monkeypatch, capsys):
    from tests.unit.sbatch_helpers import sbatch_split as _sbatch_split  # sbatch's line parser

    work = tmp_path / "my data #1 at 100%"
    work.mkdir()
    monkeypatch.chdir(work)
    _corpus(work, {"en": 4})
    args = ["shard", "--tokenizer", "tok", "--input", "en=en.txt", "--out", "sh", "--array", "1"]
    code = main([*args, "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    lines = [line.removeprefix("#SBATCH") for line in out.splitlines() if line.startswith("#SB")]
    parsed = [arg for line in lines for arg in _sbatch_split(line)]
    assert len(parsed) == len(lines)  # one argument per line, nothing cut at a "#"
    logs = str(work / "sh.jobs" / "logs").replace("%", "%%")
    assert f"--output={logs}/shard-%A_%a.out" in parsed
    assert f"--chdir={work}" in parsed
