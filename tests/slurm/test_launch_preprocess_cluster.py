"""Preprocessing on the throw-away cluster: a tokenizer job, a 2-task sharding array job held
until it succeeded, and the merge job held until both tasks succeeded (``cluster_shards``); the
merged directory is one shard directory that data_pipeline and the trainer's loader accept."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.cli import main as data_main
from launch.preprocess import main


def _shards(directory: Path) -> dict[str, str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {entry["path"]: entry["sha256"] for entry in manifest["shards"]}


def test_tokenizer_then_sharding_array_then_merge(slurm_cluster, cluster_shards, capsys):
    data = cluster_shards
    tasks = slurm_cluster.array_tasks(data.array_job)
    logs = {p.name: p.read_text() for p in sorted(data.root.glob("*.jobs/logs/*.out"))}
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs
    for job in (data.tokenizer_job, data.merge_job):
        assert slurm_cluster.job(job)["JobState"] == "COMPLETED", logs
    # Each task sharded its own languages into its part; no language is in both.
    languages = []
    for part in ("part_0", "part_1"):
        manifest = json.loads((data.shards / part / "manifest.json").read_text())
        languages += [*manifest["languages"], *manifest["pairs"]]
    assert sorted(languages) == ["de", "en", "en-de", "ja", "ru"]

    # The merge: one manifest over both parts' shards, paths relative to the merged directory.
    merged = json.loads((data.shards / "manifest.json").read_text())
    assert set(merged["languages"]) == {"en", "de", "ru", "ja"}
    assert set(merged["pairs"]) == {"en-de"}
    assert _shards(data.shards) == {
        f"{part}/{path}": sha
        for part in ("part_0", "part_1")
        for path, sha in _shards(data.shards / part).items()
    }
    capsys.readouterr()
    assert data_main(["verify", str(data.shards)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {len(merged['shards'])} shards")
    assert data_main(["inspect", "--json", str(data.shards)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_shards"] == len(merged["shards"]) and summary["pairs"] == merged["pairs"]
    # (test_launch_cluster trains on this merged directory with the trainer's loader.)


def test_local_run_gives_the_same_shards_and_merge(cluster_shards, tmp_path, capsys):
    data = cluster_shards
    local = tmp_path / "local"
    code = main(
        ["shard", "--tokenizer", str(data.tokenizer), *data.inputs, "--out", str(local)]
        + ["--array", "2", "--workers", "1", "--sample-tokens", "512", "--quiet", "--local"]
    )
    assert code == 0, capsys.readouterr()
    for part in ("part_0", "part_1"):
        assert _shards(local / part) == _shards(data.shards / part)
    assert _shards(local) == _shards(data.shards)
