"""The demo's data commands: the tokenizer is trained on the mono text and the en-X pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

import launch.demo as demo


class _Stop(Exception):
    pass


def test_demo_trains_the_tokenizer_on_the_pairs_too(tmp_path: Path, monkeypatch) -> None:
    # before: train-tokenizer got the monolingual --input files only
    commands: list[list[str]] = []

    def record(cmd: list[str]) -> None:
        commands.append(cmd)
        raise _Stop  # the first command is the tokenizer's: nothing runs

    monkeypatch.setattr(demo, "run_command", record)
    with pytest.raises(_Stop):
        demo.main(["--out", str(tmp_path / "demo")])
    (cmd,) = commands
    assert cmd[1:4] == ["-m", "data_pipeline", "train-tokenizer"]
    pairs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--parallel"]
    sample = sorted((demo.SAMPLE / "parallel").glob("*.train.tsv.zst"))
    assert pairs == [f"{path.name.split('.')[0]}={path}" for path in sample] and len(pairs) == 6
