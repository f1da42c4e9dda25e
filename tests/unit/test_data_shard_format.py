"""The shard format's one tar parser: the sequential and the random-access readers find what
``tarfile`` finds, and report every fault alike."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shard_format import (
    MONO_EXT,
    ShardReader,
    ShardWriter,
    encode_mono_payload,
    index_shard,
    iter_raw_samples,
    iter_tar_members,
)

EOS = 3


def _docs(num_samples: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        [rng.integers(10, 500, int(n)).astype(np.uint16) for n in rng.integers(1, 300, 1 + i % 3)]
        for i in range(num_samples)
    ]


def _write(path: Path, samples: list[list[np.ndarray]]) -> Path:
    with ShardWriter(path, dtype=np.dtype("<u2")) as writer:
        for i, docs in enumerate(samples):
            ids = np.concatenate([np.append(d, np.uint16(EOS)) for d in docs])
            offsets = np.cumsum([0] + [len(d) + 1 for d in docs])
            meta = {
                "kind": "mono",
                "lang": "en",
                "source": "en.txt",
                "first_doc": i,
                "num_docs": len(docs),
                "num_tokens": sum(len(d) for d in docs),
                "eos": EOS,
                "dtype": "uint16",
                "chunk": "0" * 16,
            }
            writer.add_sample(
                meta, payload=encode_mono_payload(ids, doc_offsets=offsets), ext=MONO_EXT
            )
    return path


@pytest.fixture()
def shard(tmp_path: Path) -> tuple[Path, list[list[np.ndarray]]]:
    samples = _docs(5)
    return _write(tmp_path / "mono_en_00000.tar", samples), samples


def test_both_readers_find_the_members_tarfile_finds(shard) -> None:
    path, samples = shard
    with tarfile.open(path) as tar:  # the reference: the standard library's reader
        members = tar.getmembers()
        data = [tar.extractfile(m).read() for m in members]
    with open(path, "rb") as f:
        assert list(iter_tar_members(f, where="x")) == [(m.name, d) for m, d in zip(members, data)]
    padded = [-(-m.size // 512) * 512 for m in members]
    want = [
        [members[i].offset, members[i + 1].offset_data + padded[i + 1]]
        for i in range(0, len(members), 2)
    ]
    assert index_shard(path).tolist() == want
    reader = ShardReader()
    for i in reversed(range(len(samples))):  # random access, any order
        sample = reader.read(str(path), i)
        offsets = sample["doc_offsets"]
        got = [sample["tokens"][a : b - 1] for a, b in zip(offsets[:-1], offsets[1:])]
        assert [d.tolist() for d in got] == [d.tolist() for d in samples[i]]
    reader.close()
    assert [key for key, *_ in iter_raw_samples(path)] == [m.name[:-5] for m in members[0::2]]


def test_names_with_a_ustar_prefix_are_joined(tmp_path: Path) -> None:
    path = tmp_path / "long.tar"
    long_name = "d" * 120 + "/member.json"  # over 100 bytes: stored as prefix + name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(long_name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    raw = path.read_bytes()
    assert raw[345:465] == b"d" * 120  # the prefix field is in use
    assert list(iter_tar_members(io.BytesIO(raw), where="x")) == [(long_name, b"abc")]


def _set_header(raw: bytearray, at: int, field: slice, value: bytes) -> None:
    """Overwrite one field of the header at ``at`` and store a valid checksum again."""
    raw[at + field.start : at + field.start + len(value)] = value
    header = raw[at : at + 512]
    checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
    raw[at + 148 : at + 156] = f"{checksum:06o}\0 ".encode()


def _corrupt(raw: bytes, spans: list[list[int]], case: str) -> bytes:
    out = bytearray(raw)
    second = spans[1][0]  # the second sample's .json header
    if case == "checksum":
        out[second + 3] ^= 1
    elif case == "type":
        _set_header(out, second, slice(156, 157), b"5")
    elif case == "unpaired":
        payload_header = second + 512 + -(-int(out[second + 124 : second + 135], 8) // 512) * 512
        _set_header(out, payload_header, slice(0, 1), b"X")
    elif case == "first not json":
        _set_header(out, second, slice(0, 100), b"mono_en_00000_000001.tok.zst".ljust(100, b"\0"))
    elif case == "corrupt size":
        _set_header(out, second, slice(124, 136), b"99999999999x")
    elif case == "truncated member":
        del out[spans[-1][1] - 100 :]
    elif case == "no end marker":
        del out[spans[-1][1] :]
    elif case == "truncated header":
        del out[second + 100 :]
    return bytes(out)


CASES = {
    "checksum": "tar header checksum mismatch",
    "type": "member 'mono_en_00000_000001.json' has tar type b'5', expected a file",
    "unpaired": "sample 'mono_en_00000_000001' has no payload member",
    "first not json": "member 'mono_en_00000_000001.tok.zst' where a .json was expected",
    "corrupt size": "corrupt tar header",
    "truncated member": "truncated inside member 'mono_en_00000_000004.tok.zst'",
    "no end marker": "truncated (no end-of-archive marker)",
    "truncated header": "truncated inside a header",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_readers_report_a_fault_alike(shard, tmp_path: Path, case: str) -> None:
    path, _ = shard
    bad = tmp_path / "bad" / path.name
    bad.parent.mkdir()
    bad.write_bytes(_corrupt(path.read_bytes(), index_shard(path).tolist(), case))
    message = f"shard {path.name}: {CASES[case]}"
    with pytest.raises(ValueError) as sequential:
        list(iter_raw_samples(bad))
    with pytest.raises(ValueError) as random_access:
        index_shard(bad)
    assert str(sequential.value) == str(random_access.value) == message
