"""Bad input files stop the data jobs with one line and exit 2, and leave nothing behind.

Truncated or corrupt compressed input, a TSV without tabs, line-aligned files of different
lengths, an ``--out`` that is a file, a shard directory without its tokenizer; and the way out
for a language seen only in parallel data (``train-tokenizer --parallel``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zstandard

from data_pipeline.cli import main

SAMPLE = Path(__file__).resolve().parents[2] / "data_pipeline" / "sample"


def _lines(path: Path, n: int) -> list[str]:
    return zstandard.ZstdDecompressor().decompress(path.read_bytes()).decode().splitlines()[:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """en/de text (plain and .zst), a real en-de TSV, an en-ko TSV and a tokenizer on en, de."""
    root = tmp_path_factory.mktemp("corpus")
    for lang in ("en", "de"):
        text = "\n".join(_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 2000)) + "\n"
        (root / f"{lang}.txt").write_text(text, encoding="utf-8")
        (root / f"{lang}.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    pairs = _lines(SAMPLE / "parallel" / "en-de.train.tsv.zst", 200)
    (root / "en-de.tsv").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    english = _lines(SAMPLE / "mono" / "en.train.txt.zst", 600)[300:]
    korean = _lines(SAMPLE / "mono" / "ko.train.txt.zst", 300)
    tsv = "".join(f"{e}\t{k}\n" for e, k in zip(english, korean))
    (root / "en-ko.tsv").write_text(tsv, encoding="utf-8")
    code = main(
        ["train-tokenizer", f"--input=en={root}/en.txt", f"--input=de={root}/de.txt",
         "--vocab-size=1000", "--sentinels=4", "--character-coverage=0.98", "--threads=2",
         f"--out={root}/tok"]
    )  # fmt: skip
    assert code == 0
    return root


def _truncated(src: Path, dst: Path) -> int:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])
    return len(data) * 2 // 3


def _one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_shard_stops_on_truncated_zst_and_writes_nothing_for_it(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, workers: str
) -> None:
    # before: the file was read up to the cut, exit 0, the manifest counting what was read
    bad = tmp_path / "en.txt.zst"
    size = _truncated(corpus / "en.txt.zst", bad)
    out = tmp_path / "shards"
    argv = ["shard", f"--tokenizer={corpus}/tok", f"--input=de={corpus}/de.txt.zst",
            f"--input=en={bad}", f"--out={out}", f"--workers={workers}", "--quiet",
            "--shard-text-mb=0.02"]  # fmt: skip
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith(f"error: input '{bad}': truncated zstd data (the file ends inside")
    assert f"at byte {size:,} of the compressed file; nothing written for en" in err
    assert not (out / "manifest.json").exists()
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(("mono_en", ".mono_en"))], names
    assert [n for n in names if n.startswith("mono_de_")]  # the good input before it stays


def test_shard_fault_keeps_an_earlier_runs_shards_and_manifest(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "en.txt.zst"
    shutil.copyfile(corpus / "en.txt.zst", good)
    out = tmp_path / "shards"
    argv = ["shard", f"--tokenizer={corpus}/tok", f"--input=en={good}", f"--out={out}",
            "--workers=1", "--quiet", "--shard-text-mb=0.02"]  # fmt: skip
    assert main(argv) == 0
    manifest = (out / "manifest.json").read_bytes()
    _truncated(corpus / "en.txt.zst", good)
    capsys.readouterr()
    assert main(argv) == 2
    _one_line(capsys)
    assert (out / "manifest.json").read_bytes() == manifest
    assert main(["verify", str(out)]) == 0


def test_train_tokenizer_stops_on_corrupt_input_and_leaves_no_directory(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "en.txt.zst"
    data = bytearray((corpus / "en.txt.zst").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a zeroed run inside the frame
    bad.write_bytes(bytes(data))
    out = tmp_path / "tok"
    argv = ["train-tokenizer", f"--input=en={bad}", "--vocab-size=1000", f"--out={out}"]
    assert main(argv) == 2
    assert _one_line(capsys).startswith(f"error: input '{bad}': corrupt zstd data (")
    assert not out.exists()
    _truncated(corpus / "en.txt.zst", bad)
    assert main(argv) == 2
    assert "truncated zstd data" in _one_line(capsys)
    assert not out.exists()


def test_parallel_input_without_tabs_or_of_unequal_lengths(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # before: exit 0, every line counted as malformed (or the unmatched lines)
    spaces = tmp_path / "en-de.tsv"
    spaces.write_text((corpus / "en-de.tsv").read_text().replace("\t", "    "))
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    out = tmp_path / "shards"
    for spec, message in (
        (f"en-de={spaces}", f"error: --parallel en-de: '{spaces}' has no tab in its first 200"),
        (f"en-de={tmp_path}/a.en,{tmp_path}/a.de", "error: --parallel en-de: '"),
    ):
        for command in (
            ["shard", f"--tokenizer={corpus}/tok"],
            ["train-tokenizer", "--vocab-size=1000"],
        ):
            assert main([*command, f"--parallel={spec}", f"--out={out}"]) == 2
            assert _one_line(capsys).startswith(message)
            assert not (out / "manifest.json").exists() and not (out / "spm.json").exists()
    main(
        [
            "shard",
            f"--tokenizer={corpus}/tok",
            f"--parallel=en-de={tmp_path}/a.en,{tmp_path}/a.de",
            f"--out={out}",
        ]
    )
    assert "a.en' has 3 lines but '" in capsys.readouterr().err


def test_out_that_is_a_file(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.write_text("not a directory")
    for command in (
        ["shard", f"--tokenizer={corpus}/tok"],
        ["train-tokenizer", "--vocab-size=1000"],
    ):
        assert main([*command, f"--input=en={corpus}/en.txt", f"--out={out}"]) == 2
        assert _one_line(capsys) == f"error: --out '{out}' is a file, not a directory\n"
    assert out.read_text() == "not a directory"


def test_verify_fails_without_the_tokenizer(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # before: "ok", then training failed with a traceback
    out = tmp_path / "shards"
    argv = ["shard", f"--tokenizer={corpus}/tok", f"--input=en={corpus}/en.txt", f"--out={out}"]
    assert main([*argv, "--quiet", "--workers=1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # the trainer helper reads the tokenizer's sha256 from here
    assert (
        manifest["tokenizer"]["model_sha256"]
        == json.loads((corpus / "tok" / "spm.json").read_text())["model_sha256"]
    )
    shutil.rmtree(out / "tokenizer")
    capsys.readouterr()
    assert main(["verify", str(out)]) == 2
    assert capsys.readouterr().err == f"tokenizer {out / 'tokenizer'}: missing\n"
    shutil.copytree(corpus / "tok", out / "tokenizer")
    (out / "tokenizer" / "spm.json").unlink()
    assert main(["verify", str(out)]) == 2
    assert "missing spm.json" in capsys.readouterr().err


def test_a_language_only_in_pairs_can_be_trained_and_sharded(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # before: train-tokenizer had no --parallel, and shard refused the pair's 'ko'
    shard = ["shard", f"--input=en={corpus}/en.txt", f"--parallel=en-ko={corpus}/en-ko.tsv",
             "--quiet", "--workers=1"]  # fmt: skip
    assert main([*shard, f"--tokenizer={corpus}/tok", f"--out={tmp_path}/a"]) == 2
    assert _one_line(capsys) == (
        "error: language 'ko' is not one of the tokenizer's languages (de, en); "
        "train the tokenizer with it\n"
    )
    tok = tmp_path / "tok"
    train = ["train-tokenizer", f"--input=en={corpus}/en.txt", f"--input=de={corpus}/de.txt",
             f"--parallel=en-ko={corpus}/en-ko.tsv", "--vocab-size=1500", "--sentinels=4",
             "--threads=2", f"--out={tok}"]  # fmt: skip
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "3 languages" in out and "\nko " in out
    assert json.loads((tok / "spm.json").read_text())["languages"] == ["de", "en", "ko"]
    assert main([*shard, f"--tokenizer={tok}", f"--out={tmp_path}/b"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["pairs"]["en-ko"]["documents"] == 300
