"""Megatron indexed datasets (``data_pipeline.megatron_dataset``): the bytes against a header
packed by hand, round trips, every refused fault, megatron-core's own reader and builder, and
our shards out to Megatron and back."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.manifest import load_manifest
from data_pipeline.megatron_dataset import (
    MegatronDataset,
    MegatronWriter,
    export_megatron,
    import_megatron,
    megatron_token_dtype,
)
from data_pipeline.shard_format import iter_documents_of_sample, iter_shard_samples
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.verify import verify_directory

DOCS = [[5, 6, 7], [8], [9, 10]]


def _idx_bytes(code: int, lengths: list[int], itemsize: int, *, modes: bytes = b"") -> bytes:
    """A one-sequence-per-document ``.idx`` packed field by field from the format's spec."""
    pointers = [sum(lengths[:i]) * itemsize for i in range(len(lengths))]
    n = len(lengths)
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", n)
        + struct.pack("<Q", n + 1)
        + struct.pack(f"<{n}i", *lengths)
        + struct.pack(f"<{n}q", *pointers)
        + struct.pack(f"<{n + 1}q", *range(n + 1))
        + modes
    )


def _write(prefix: Path, docs: list, dtype: str) -> None:
    with MegatronWriter(prefix, dtype=dtype) as writer:
        for doc in docs:
            writer.add_document(np.array(doc, dtype=np.int64))


@pytest.mark.parametrize(("dtype", "code", "fmt"), [("uint16", 8, "H"), ("int32", 4, "i")])
def test_writer_bytes_match_a_header_packed_by_hand(
    tmp_path: Path, dtype: str, code: int, fmt: str
) -> None:
    _write(tmp_path / "d", DOCS, dtype)
    size = struct.calcsize(fmt)
    assert (tmp_path / "d.idx").read_bytes() == _idx_bytes(code, [3, 1, 2], size)
    assert (tmp_path / "d.bin").read_bytes() == struct.pack(f"<6{fmt}", 5, 6, 7, 8, 9, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temp files


def test_reader_reads_hand_packed_files_with_documents_of_several_sequences(
    tmp_path: Path,
) -> None:
    # 3 sequences in 2 documents ([0, 2), [2, 3)), int64 ids, plus the optional modes block
    lengths = [2, 1, 3]
    idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 5, 3, 3)
        + struct.pack("<3i", *lengths)
        + struct.pack("<3q", 0, 16, 24)
        + struct.pack("<3q", 0, 2, 3)
        + bytes([1, 0, 1])
    )
    (tmp_path / "m.idx").write_bytes(idx)
    (tmp_path / "m.bin").write_bytes(struct.pack("<6q", 1, 2, 3, 4, 5, 6))
    ds = MegatronDataset(tmp_path / "m")
    assert (ds.num_sequences, ds.num_documents, ds.dtype) == (3, 2, np.dtype("<i8"))
    assert ds.document(0).tolist() == [1, 2, 3] and ds.document(1).tolist() == [4, 5, 6]
    assert ds.sequence(1).tolist() == [3]
    assert ds.sequence_modes.tolist() == [1, 0, 1]
    assert ds.document_token_offsets().tolist() == [0, 3, 6]


def test_round_trip_is_byte_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, int(rng.integers(0, 40))).tolist() for _ in range(200)]
    _write(tmp_path / "a", docs, "uint16")
    ds = MegatronDataset(tmp_path / "a")
    assert [ds.document(i).tolist() for i in range(ds.num_documents)] == docs
    _write(tmp_path / "b", [ds.document(i) for i in range(ds.num_documents)], "uint16")
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_default_dtype_is_megatrons_choice() -> None:
    # Megatron's preprocessing: uint16 for a vocabulary below 65,500, else int32
    assert megatron_token_dtype(65499) == np.dtype("<u2")
    assert megatron_token_dtype(65500) == np.dtype("<i4")
    assert megatron_token_dtype(250_000) == np.dtype("<i4")


def _good(tmp_path: Path) -> Path:
    _write(tmp_path / "g", DOCS, "uint16")
    return tmp_path / "g"


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


# offsets in the 3-document uint16 file: header 34, lengths 34..46, pointers 46..70, document
# indices 70..102; .bin 12 bytes
FAULTS = [
    ("idx", lambda p: _patch(p, 0, b"NOTMEGA"), "not a Megatron indexed dataset index"),
    ("idx", lambda p: _patch(p, 9, struct.pack("<Q", 2)), "version 2, only 1 is defined"),
    ("idx", lambda p: _patch(p, 17, b"\x09"), "dtype code 9 is not one of Megatron's"),
    ("idx", lambda p: _cut(p, 20), "truncated: 20 bytes, the header alone is 34"),
    ("idx", lambda p: _cut(p, 50), "truncated: 50 bytes, .* needs 102"),
    ("idx", lambda p: _patch(p, 94, struct.pack("<q", 2)), "document indices run from 0 to 2"),
    ("idx", lambda p: _patch(p, 54, struct.pack("<q", 4)), "sequence 1 points at byte 4, not 6"),
    ("bin", lambda p: _cut(p, 10), "truncated: 10 bytes, its index describes 6 uint16 ids"),
    ("bin", lambda p: p.write_bytes(p.read_bytes() + b"x"), "13 bytes, its index describes 6"),
]


@pytest.mark.parametrize(("which", "spoil", "message"), FAULTS)
def test_faulty_files_are_refused_in_one_line(
    tmp_path: Path, which: str, spoil, message: str
) -> None:
    prefix = _good(tmp_path)
    spoil(Path(f"{prefix}.{which}"))
    with pytest.raises(ValueError, match=message) as err:
        MegatronDataset(prefix)
    assert "\n" not in str(err.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    prefix = _good(tmp_path)
    (tmp_path / "g.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file '.*g\.bin'"):
        MegatronDataset(prefix)


def test_writer_refuses_ids_past_its_dtype_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token id 300 does not fit uint8"):
        with MegatronWriter(tmp_path / "w", dtype="uint8") as writer:
            writer.add_document(np.array([1, 300]))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="float32"):
        MegatronWriter(tmp_path / "f", dtype="float32")


# --- megatron-core's own reader and builder ------------------------------------------------


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        return pytest.importorskip(
            "megatron.core.datasets.indexed_dataset",
            reason="megatron-core not installed (pip install -e '.[megatron]')",
        )


def _random_docs(seed: int, *, high: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, int(rng.integers(0, 30))).tolist() for _ in range(60)]


@pytest.mark.parametrize(("dtype", "high"), [("uint16", 65500), ("int32", 250_000)])
def test_megatron_core_reads_our_files(tmp_path: Path, dtype: str, high: int) -> None:
    mc = _megatron()
    docs = _random_docs(1, high=high)
    _write(tmp_path / "ours", docs, dtype)
    ds = mc.IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and ds.index.dtype == np.dtype(dtype).type
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert [ds[i].tolist() for i in range(len(docs))] == docs
    assert ds.get(3, offset=1, length=2).tolist() == docs[3][1:3]


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_our_files_equal_megatron_core_builders_bytes(tmp_path: Path, dtype: str) -> None:
    import torch

    mc = _megatron()
    docs = _random_docs(2, high=60000)
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.dtype(dtype).type)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))
    _write(tmp_path / "ours", docs, dtype)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"mc{suffix}").read_bytes() == (tmp_path / f"ours{suffix}").read_bytes()


def test_we_read_megatron_core_builder_files(tmp_path: Path) -> None:
    import torch

    mc = _megatron()
    docs = _random_docs(3, high=70000)
    # documents of one to three sequences each, int32 ids, with modes (the multimodal layout)
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.int32, multimodal=True)
    want = []
    for i in range(0, len(docs), 3):
        group = docs[i : i + 1 + i % 3]
        for j, seq in enumerate(group):
            builder.add_item(torch.tensor(seq, dtype=torch.int64), mode=j % 2)
        builder.end_document()
        want.append(sum(group, []))
    builder.finalize(str(tmp_path / "mc.idx"))
    ds = MegatronDataset(tmp_path / "mc")
    assert ds.dtype == np.dtype("<i4") and ds.sequence_modes is not None
    assert [ds.document(d).tolist() for d in range(ds.num_documents)] == want
    ref = mc.IndexedDataset(str(tmp_path / "mc"), multimodal=True)
    assert [ds.sequence(i).tolist() for i in range(len(ref))] == [
        ref[i][0].tolist() for i in range(len(ref))
    ]


# --- our shards out and back -----------------------------------------------------------------


def _shard_docs(root: Path, lang: str) -> list[list[int]]:
    """Each document of ``lang`` in manifest order, read from the shards (without eos)."""
    manifest = load_manifest(root)
    docs = []
    for entry in manifest["shards"]:
        if entry["kind"] == "mono" and entry.get("lang") == lang:
            for sample in iter_shard_samples(root / entry["path"]):
                docs += [d.tolist() for d in iter_documents_of_sample(sample)]
    return docs


def _megatron_docs(prefix: Path) -> list[list[int]]:
    ds = MegatronDataset(prefix)
    return [ds.document(i).tolist() for i in range(ds.num_documents)]


def test_export_then_import_gives_the_same_documents(shards: dict, tmp_path: Path) -> None:
    root = shards["shards"]
    langs = sorted(load_manifest(root)["languages"])
    outputs = export_megatron(root, out=tmp_path / "meg" / "sample")
    assert [o["prefix"] for o in outputs] == [f"{tmp_path}/meg/sample_{lang}" for lang in langs]
    assert (tmp_path / "meg" / "tokenizer" / "spm.model").is_file()
    for lang in langs:
        want = _shard_docs(root, lang)
        assert len(want) == 300
        prefix = tmp_path / "meg" / f"sample_{lang}"
        assert _megatron_docs(prefix) == want
        back = tmp_path / f"back_{lang}"
        manifest = import_megatron(prefix, lang=lang, out=back, sample_tokens=512)
        assert _shard_docs(back, lang) == want
        assert manifest["languages"][lang]["documents"] == 300
        assert manifest["languages"][lang]["tokens"] == sum(map(len, want))
        problems, _ = verify_directory(back)
        assert problems == []


def test_merged_export_with_eod_and_import_strips_it(shards: dict, tmp_path: Path) -> None:
    root = shards["shards"]
    eos = load_tokenizer(shards["tok"]).special_ids["eos"]
    (out,) = export_megatron(
        root, out=tmp_path / "all", merged=True, append_eod=True, dtype="int32"
    )
    want = [d for lang in ("de", "en", "ja", "ru") for d in _shard_docs(root, lang)]
    assert out["documents"] == len(want) == 1200 and out["dtype"] == "int32"
    assert _megatron_docs(tmp_path / "all") == [d + [eos] for d in want]
    import_megatron(tmp_path / "all", lang="en", out=tmp_path / "back", sample_tokens=300)
    assert _shard_docs(tmp_path / "back", "en") == want


def test_one_lang_writes_prefix_itself(shards: dict, tmp_path: Path) -> None:
    (out,) = export_megatron(shards["shards"], out=tmp_path / "ja", langs=["ja"])
    assert out["prefix"] == str(tmp_path / "ja") and out["langs"] == ["ja"]
    assert _megatron_docs(tmp_path / "ja") == _shard_docs(shards["shards"], "ja")
    with pytest.raises(ValueError, match="--lang 'xx' is not a language of"):
        export_megatron(shards["shards"], out=tmp_path / "xx", langs=["xx"])
    with pytest.raises(ValueError, match="--dtype uint8 holds ids up to 255, the vocabulary"):
        export_megatron(shards["shards"], out=tmp_path / "u8", dtype="uint8")
    assert not list(tmp_path.glob("u8*")) and not list(tmp_path.glob("xx*"))


def test_import_skips_empty_documents_and_refuses_bad_ids(shards: dict, tmp_path: Path) -> None:
    tok = load_tokenizer(shards["tok"])
    eos = tok.special_ids["eos"]
    docs = [[10, 11], [], [eos], [12, 13, eos], [14]]
    _write(tmp_path / "e", docs, "uint16")
    manifest = import_megatron(
        tmp_path / "e", lang="de", out=tmp_path / "ok", tokenizer=tok.directory
    )
    assert _shard_docs(tmp_path / "ok", "de") == [[10, 11], [12, 13], [14]]
    assert manifest["languages"]["de"]["rejected"]["empty"] == 2
    samples = [s for p in sorted((tmp_path / "ok").glob("*.tar")) for s in iter_shard_samples(p)]
    assert [s["first_doc"] for s in samples] == [0] and samples[0]["source"] == "e.bin"
    for name, bad, message in [
        ("vocab", [[1, tok.vocab_size]], f"token id {tok.vocab_size} in document 0 is outside"),
        ("inner", [[1], [2, eos, 3]], f"document 1 holds the eos id {eos} before its end"),
    ]:
        _write(tmp_path / name, bad, "uint16")
        with pytest.raises(ValueError, match=message):
            import_megatron(
                tmp_path / name, lang="de", out=tmp_path / f"o_{name}", tokenizer=tok.directory
            )
        assert not (tmp_path / f"o_{name}").exists()
    assert not list(tmp_path.glob(".o_*"))  # no temporary directory left
    with pytest.raises(ValueError, match="--lang 'xx' is not one of the tokenizer's languages"):
        import_megatron(tmp_path / "e", lang="xx", out=tmp_path / "o_x", tokenizer=tok.directory)
    with pytest.raises(FileNotFoundError, match="give --tokenizer DIR"):
        import_megatron(tmp_path / "e", lang="de", out=tmp_path / "o_t")


def test_import_cuts_samples_and_shards_by_tokens(shards: dict, tmp_path: Path) -> None:
    tok = load_tokenizer(shards["tok"])
    docs = [[20 + i] * (1 + i % 7) for i in range(100)]
    _write(tmp_path / "c", docs, "uint16")
    manifest = import_megatron(
        tmp_path / "c", lang="en", out=tmp_path / "o", tokenizer=tok.directory,
        sample_tokens=20, shard_tokens=100,
    )  # fmt: skip
    assert _shard_docs(tmp_path / "o", "en") == docs
    # a shard closes at the first sample boundary at or past 100 ids (eos included); samples
    # hold at most 20 ids and every document fits one
    sizes = [e["tokens"] + e["documents"] for e in manifest["shards"]]
    assert sum(sizes) == sum(len(d) + 1 for d in docs) and len(sizes) > 1
    assert all(100 <= size < 120 for size in sizes[:-1]) and sizes[-1] < 120
    for path in sorted((tmp_path / "o").glob("*.tar")):
        for sample in iter_shard_samples(path):
            assert len(sample["tokens"]) <= 20
    assert verify_directory(tmp_path / "o")[0] == []


def test_import_refuses_float_ids(shards: dict, tmp_path: Path) -> None:
    idx = _idx_bytes(7, [2], 4)  # float32: a valid file, but no token ids
    (tmp_path / "f.idx").write_bytes(idx)
    (tmp_path / "f.bin").write_bytes(struct.pack("<2f", 1.0, 2.0))
    assert MegatronDataset(tmp_path / "f").document(0).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="dtype float32 holds no token ids"):
        import_megatron(tmp_path / "f", lang="en", out=tmp_path / "o", tokenizer=shards["tok"])
    assert not (tmp_path / "o").exists()
