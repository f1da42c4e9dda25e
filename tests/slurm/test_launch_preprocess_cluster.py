"""Preprocessing on the throw-away cluster: tokenizer job, then a 2-task sharding array job."""

from __future__ import annotations

import json
import random
from pathlib import Path

from launch.preprocess import main

WORDS = {
    "en": "the cat sat on a mat while dogs run fast".split(),
    "de": "der hund und die katze laufen heute schnell".split(),
    "fr": "le chat et la souris mangent vite ce soir".split(),
}


def _write_corpus(root: Path) -> list[str]:
    rng = random.Random(0)
    specs = []
    for lang, words in WORDS.items():
        lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(200))
        (root / f"{lang}.txt").write_text("\n".join(lines) + "\n")
        specs += ["--input", f"{lang}={lang}.txt"]
    return specs


def _submit(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip()


def _shards(directory: Path) -> dict[str, str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {entry["path"]: entry["sha256"] for entry in manifest["shards"]}


def test_tokenizer_then_sharding_array_job(slurm_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    inputs = _write_corpus(tmp_path)
    tok_job = _submit(
        capsys, ["train-tokenizer", *inputs, "--out", "tok", "--vocab-size", "400", "--submit"]
    )
    # Submitted before the tokenizer exists: Slurm holds it until the tokenizer job succeeded.
    shard_args = ["shard", "--tokenizer", "tok", *inputs, "--array", "2", "--workers", "1"]
    shard_job = _submit(capsys, [*shard_args, "--out", "shards", "--after", tok_job, "--submit"])
    tasks = slurm_cluster.wait_array_done(shard_job, timeout=120)
    assert slurm_cluster.job(tok_job)["JobState"] == "COMPLETED"
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    logs = sorted((tmp_path / "shards.jobs" / "logs").glob("shard-*.out"))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), [p.read_text() for p in logs]
    languages = []
    for part in ("part_0", "part_1"):
        manifest = json.loads((tmp_path / "shards" / part / "manifest.json").read_text())
        languages += list(manifest["languages"])
    assert sorted(languages) == ["de", "en", "fr"]  # every language in exactly one part

    # The same command run locally gives the same shards.
    assert main([*shard_args, "--out", "local", "--local", "--quiet"]) == 0
    for part in ("part_0", "part_1"):
        assert _shards(tmp_path / "local" / part) == _shards(tmp_path / "shards" / part)
