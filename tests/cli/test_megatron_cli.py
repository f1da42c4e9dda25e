"""``python -m data_pipeline export-megatron`` / ``import-megatron`` as processes: the sample
shards out to Megatron's indexed dataset and back, and bad input refused with exit 2, one line
on stderr and nothing written."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.manifest import load_manifest
from data_pipeline.shard_format import iter_documents_of_sample, iter_shard_samples
from data_pipeline.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _shard_docs(root: Path, lang: str) -> list[list[int]]:
    docs = []
    for entry in load_manifest(root)["shards"]:
        if entry["kind"] == "mono" and entry.get("lang") == lang:
            for sample in iter_shard_samples(root / entry["path"]):
                docs += [d.tolist() for d in iter_documents_of_sample(sample)]
    return docs


def _read_megatron(prefix: Path) -> list[list[int]]:
    """Documents of a one-sequence-per-document uint16 dataset, parsed here from the spec."""
    idx = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, num_seq, num_docs = struct.unpack_from("<9sQBQQ", idx)
    assert (magic, version, code, num_docs) == (b"MMIDIDX\x00\x00", 1, 8, num_seq + 1)
    lengths = np.frombuffer(idx, dtype="<i4", count=num_seq, offset=34)
    ids = np.frombuffer(Path(f"{prefix}.bin").read_bytes(), dtype="<u2")
    ends = np.cumsum(lengths)
    return [ids[e - n : e].tolist() for e, n in zip(ends, lengths)]


def test_export_and_import_round_trip(shards: dict, tmp_path: Path) -> None:
    root = shards["shards"]
    done = _cli("export-megatron", root, "--out", tmp_path / "meg" / "s")
    assert done.returncode == 0, done.stderr
    assert "pairs not exported (en-de)" in done.stdout
    for lang in ("de", "en", "ja", "ru"):
        assert f"wrote {tmp_path}/meg/s_{lang}.bin/.idx ({lang}): 300 documents" in done.stdout
        assert _read_megatron(tmp_path / "meg" / f"s_{lang}") == _shard_docs(root, lang)
    # the tokenizer exported beside the files is the default of import-megatron
    back = tmp_path / "back"
    done = _cli("import-megatron", tmp_path / "meg" / "s_ru", "--lang", "ru", "--out", back)
    assert done.returncode == 0, done.stderr
    assert _shard_docs(back, "ru") == _shard_docs(root, "ru")
    done = _cli("verify", back)
    assert done.returncode == 0 and done.stdout.startswith("ok: 1 shards"), done.stderr
    # --merged: one dataset at the prefix itself, languages in sorted order
    done = _cli("export-megatron", root, "--out", tmp_path / "two", "--lang", "ja", "--lang",
                "de", "--merged")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _read_megatron(tmp_path / "two") == _shard_docs(root, "de") + _shard_docs(root, "ja")


def _good(tmp_path: Path) -> Path:
    """A 3-document uint16 dataset, packed by hand."""
    (tmp_path / "d.idx").write_bytes(
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 3, 4)
        + struct.pack("<3i", 2, 1, 2)
        + struct.pack("<3q", 0, 4, 6)
        + struct.pack("<4q", 0, 1, 2, 3)
    )
    (tmp_path / "d.bin").write_bytes(struct.pack("<5H", 10, 11, 12, 13, 14))
    return tmp_path / "d"


def _set(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


BAD = {
    "missing idx": (lambda d: Path(f"{d}.idx").unlink(), "no file '.*d.idx'"),
    "missing bin": (lambda d: Path(f"{d}.bin").unlink(), "no file '.*d.bin'"),
    "bad magic": (lambda d: _set(Path(f"{d}.idx"), 0, b"XXXX"), "not a Megatron indexed"),
    "version 2": (lambda d: _set(Path(f"{d}.idx"), 9, b"\x02"), "version 2, only 1"),
    "dtype code": (lambda d: _set(Path(f"{d}.idx"), 17, b"\x0c"), "dtype code 12 is not"),
    "short idx": (lambda d: _cut(Path(f"{d}.idx"), 60), "truncated: 60 bytes"),
    "short bin": (lambda d: _cut(Path(f"{d}.bin"), 9), "truncated: 9 bytes"),
    "id >= vocab": (
        lambda d: _set(Path(f"{d}.bin"), 2, struct.pack("<H", 65000)),
        "token id 65000 in document 0 is outside the tokenizer's vocabulary",
    ),
}


@pytest.mark.parametrize("fault", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    shards: dict, tmp_path: Path, fault: str
) -> None:
    spoil, message = BAD[fault]
    assert load_tokenizer(shards["tok"]).vocab_size < 65000
    spoil(_good(tmp_path))
    out = tmp_path / "out"
    done = _cli("import-megatron", tmp_path / "d", "--lang", "en", "--out", out, "--tokenizer",
                shards["tok"])  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ")
    assert re.search(message, done.stderr), done.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_export_bad_input_exits_2(shards: dict, tmp_path: Path) -> None:
    for args, message in [
        (("--lang", "xx"), "--lang 'xx' is not a language of"),
        (("--dtype", "int8"), "--dtype int8 holds ids up to 127"),
    ]:
        done = _cli("export-megatron", shards["shards"], "--out", tmp_path / "m", *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    done = _cli("export-megatron", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert done.returncode == 2 and "no such file" in done.stderr
