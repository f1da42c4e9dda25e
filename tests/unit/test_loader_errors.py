"""Loader bad input (missing and corrupt shards, bad weights) and the ``mix`` command."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from data_pipeline.loader import StreamingDataset
from data_pipeline.mix import add_mix_parser, language_mix, main
from data_pipeline.synthetic import synthetic_vocab
from data_pipeline.transforms import MaskingConfig

VOCAB = synthetic_vocab(512)


def _copy(clean: Path, tmp_path: Path) -> Path:
    shutil.copytree(clean, tmp_path / "d")
    return tmp_path / "d"


def _ds(root: Path, **kw) -> StreamingDataset:
    args = dict(dp_rank=0, dp_world_size=1, seq_len=64, batch_size=4, vocab=VOCAB)
    return StreamingDataset(root, **{**args, **kw})


def test_missing_shard_fails_at_start_with_one_line(clean: Path, tmp_path: Path) -> None:
    root = _copy(clean, tmp_path)
    (root / "mono_de_00001.tar").unlink()
    with pytest.raises(ValueError) as err:
        _ds(root)
    assert "'mono_de_00001.tar', which is missing (every listed shard must exist)" in str(err.value)
    assert "\n" not in str(err.value)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[1100:1300] = b"\xff" * 200  # inside the first payload (and the next header)
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_logged_skipped_and_counted(
    clean: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(clean, tmp_path)
    _corrupt(root / "mono_en_00000.tar")
    ds = _ds(root)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        for _ in range(60):  # passes over every en sample
            next(it)
    assert "skipping shard mono_en_00000.tar" in caplog.text
    assert ds.counters["bad_samples"] > 0
    assert sum(ds.counters["tokens"].values()) == 60 * 4 * 64


def test_corrupt_shard_raises_when_configured(clean: Path, tmp_path: Path) -> None:
    root = _copy(clean, tmp_path)
    _corrupt(root / "mono_en_00000.tar")
    it = iter(_ds(root, on_bad_shard="raise"))
    with pytest.raises(ValueError, match="shard mono_en_00000.tar"):
        for _ in range(60):
            next(it)


def test_argument_rules(clean: Path) -> None:
    with pytest.raises(ValueError, match=r"data.language_weights.xx \(1.0\) names no language"):
        _ds(clean, language_weights={"xx": 1.0})
    with pytest.raises(ValueError, match=r"masking.tlm_share \(0.5\) needs parallel data"):
        _ds(clean, objective="mlm", masking=MaskingConfig(tlm_share=0.5))
    with pytest.raises(ValueError, match=r"dp_rank \(2\) must be in \[0, dp_world_size=2\)"):
        _ds(clean, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match=r"data.alpha \(0.0\) must be in \(0, 1\]"):
        _ds(clean, alpha=0.0)


def test_mix_json_reports_n_q_p_and_realised(clean: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(clean), "--alpha", "0.5", "--tokens", "30000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["languages"]
    rows = {r["lang"]: r for r in out["languages"]}
    assert list(rows["en"]) == ["lang", "tokens", "q", "p", "realised"]
    manifest = json.loads((clean / "manifest.json").read_text())
    n = {lang: v["tokens"] for lang, v in manifest["languages"].items()}
    for lang, r in rows.items():
        assert r["tokens"] == n[lang]
        q = n[lang] / sum(n.values())
        assert r["q"] == pytest.approx(q)
        assert abs(r["realised"] - r["p"]) < 0.01
    assert rows["de"]["p"] > rows["de"]["q"]  # smoothing lifts the smaller language
    assert main([str(clean / "nope"), "--alpha", "0.5"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_mix_subparser_hooks_into_a_cli(clean: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_mix_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mix", str(clean), "--alpha", "1.0", "--tokens", "640"])
    assert args.func.__name__ == "main_mix"
    rows = language_mix(str(clean), alpha=1.0, tokens=640, seq_len=64)
    assert sum(r["realised"] for r in rows) == pytest.approx(1.0)
