"""The sharding job end to end: counts, round trip, determinism, resume, faults, verify, CLI."""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zstandard

from data_pipeline import shard
from data_pipeline.cli import main
from data_pipeline.shard import ShardSettings, run_shard_job
from data_pipeline.shard_format import (
    ShardWriter,
    decode_sample,
    encode_mono_payload,
    iter_documents_of_sample,
    iter_pairs_of_sample,
    iter_shard_samples,
    token_dtype,
)
from data_pipeline.text_inputs import MonoInput, PairInput, parse_mono_specs
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from data_pipeline.verify import verify_directory

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data_pipeline" / "sample"
LANGS = ("en", "de", "ru", "ja")
# small numbers so that every language spans several shards and every shard several samples
SETTINGS = ShardSettings(sample_tokens=600, shard_text_bytes=6_000, max_doc_bytes=10_000)


def _zst_lines(path: Path, n: int) -> list[str]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    return raw.decode("utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Inputs (with deliberate faults), the texts they should yield, and a tokenizer."""
    root = tmp_path_factory.mktemp("data")
    texts: dict[str, list[tuple[str, int, str]]] = {}
    mono = []
    for lang in LANGS:
        lines = _zst_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 120)
        path = root / f"{lang}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        texts[lang] = [(path.name, i, line) for i, line in enumerate(lines)]
        mono.append(MonoInput(lang, (path,)))
    # a second English file: a long document (a sample of its own) and bad lines, all counted
    long_doc = " ".join(["Long document words"] * 300)  # > sample_tokens, < max_doc_bytes
    bad = root / "en.bad.txt"
    bad.write_bytes(
        b"good line one\n\xc3\x28 invalid utf8\n\n"
        + b"y" * 12_000
        + b"\n"
        + long_doc.encode()
        + b"\ngood line two\n"
    )
    texts["en"] += [
        ("en.bad.txt", 0, "good line one"),
        ("en.bad.txt", 4, long_doc),
        ("en.bad.txt", 5, "good line two"),
    ]
    mono[0] = MonoInput("en", (root / "en.txt", bad))
    pairs = []
    pair_texts = {}
    for tgt in ("de", "ja"):
        lines = _zst_lines(SAMPLE / "parallel" / f"en-{tgt}.train.tsv.zst", 150)
        path = root / f"en-{tgt}.tsv"
        path.write_text("\n".join(lines) + "\nmalformed line\n", encoding="utf-8")
        pair_texts[f"en-{tgt}"] = [tuple(line.split("\t")) for line in lines]
        pairs.append(PairInput("en", tgt, (path,)))
    tok = root / "tok"
    train_tokenizer(
        mono, out=tok, vocab_size=1000, num_sentinels=4, character_coverage=0.98, num_threads=2
    )
    return {
        "root": root,
        "mono": mono,
        "pairs": pairs,
        "texts": texts,
        "pair_texts": pair_texts,
        "tok": tok,
    }


def _shard(data: dict, out: Path, *, workers: int = 1, log: list | None = None) -> dict:
    return run_shard_job(
        data["mono"],
        pairs=data["pairs"],
        tokenizer=data["tok"],
        out=out,
        workers=workers,
        settings=SETTINGS,
        log=(log.append if log is not None else lambda line: None),
    )


@pytest.fixture(scope="module")
def sharded(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    _shard(data, out, workers=2)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_manifest_counts(data: dict, sharded: Path) -> None:
    manifest = json.loads((sharded / "manifest.json").read_text())
    tok = load_tokenizer(data["tok"])
    for lang in LANGS:
        docs = [t for _, _, t in data["texts"][lang]]
        stats = manifest["languages"][lang]
        assert stats["documents"] == len(docs)
        assert stats["tokens"] == sum(map(len, tok.encode(docs)))
        assert stats["shards"] > 1 and stats["samples"] > stats["shards"]
    assert manifest["languages"]["en"]["rejected"] == {
        "invalid_utf8": 1,
        "empty": 1,
        "too_long": 1,
        "bad_json": 0,
        "malformed": 0,
    }
    for name, pairs in data["pair_texts"].items():
        stats = manifest["pairs"][name]
        src = sum(map(len, tok.encode([s for s, _ in pairs])))
        tgt = sum(map(len, tok.encode([t for _, t in pairs])))
        assert (stats["documents"], stats["src_tokens"], stats["tgt_tokens"]) == (
            len(pairs),
            src,
            tgt,
        )
        assert stats["tokens"] == src + tgt
        assert stats["rejected"]["malformed"] == 1
    for entry in manifest["shards"]:
        raw = (sharded / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["bytes"] == len(raw)
    assert manifest["dtype"] == "uint16"
    assert (
        manifest["tokenizer"]["model_sha256"] == load_tokenizer(sharded / "tokenizer").model_sha256
    )


def test_round_trip_and_metadata(data: dict, sharded: Path) -> None:
    tok = load_tokenizer(data["tok"])
    manifest = json.loads((sharded / "manifest.json").read_text())
    got: dict[str, list] = {}
    for entry in manifest["shards"]:
        for sample in iter_shard_samples(sharded / entry["path"]):
            if sample["kind"] == "mono":
                assert sample["tokens"].dtype == np.uint16
                docs = [tok.decode(d) for d in iter_documents_of_sample(sample)]
                # first_doc points at the line the sample starts with
                first = next(t for t in data["texts"][sample["lang"]] if t[2] == docs[0])
                assert (sample["source"], sample["first_doc"]) == first[:2]
                if sample["num_docs"] > 1:
                    assert len(sample["tokens"]) <= SETTINGS.sample_tokens
                got.setdefault(sample["lang"], []).extend(docs)
            else:
                pairs = [(tok.decode(s), tok.decode(t)) for s, t in iter_pairs_of_sample(sample)]
                got.setdefault(f"{sample['src']}-{sample['tgt']}", []).extend(pairs)
    for lang in LANGS:
        assert got[lang] == [t for _, _, t in data["texts"][lang]]
    for name, pairs in data["pair_texts"].items():
        assert got[name] == pairs
    long_doc = data["texts"]["en"][-2][2]
    sizes = [
        s["num_docs"]
        for e in manifest["shards"]
        if e.get("lang") == "en"
        for s in iter_shard_samples(sharded / e["path"])
        if long_doc in tok.decode(s["tokens"])
    ]
    assert sizes == [1]  # the long document is a sample of its own


def test_identical_bytes_for_any_worker_count(data: dict, sharded: Path, tmp_path: Path) -> None:
    _shard(data, tmp_path, workers=1)
    assert _files(tmp_path) == _files(sharded)


def test_rerun_keeps_finished_shards_and_redoes_damaged_ones(
    data: dict, sharded: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [e["path"] for e in manifest["shards"]]
    stamps = {n: (out / n).stat().st_mtime_ns for n in names}
    log: list[str] = []
    _shard(data, out, log=log)
    assert all("kept (finished earlier)" in line for line in log)
    assert {n: (out / n).stat().st_mtime_ns for n in names} == stamps

    removed, truncated = names[0], names[3]
    (out / removed).unlink()
    raw = (out / truncated).read_bytes()
    (out / truncated).write_bytes(raw[:1500])  # inside the first sample
    log.clear()
    _shard(data, out, log=log)
    redone = sorted(line.split(":")[0] for line in log if "written" in line)
    assert redone == sorted([removed, truncated])
    assert _files(out) == _files(sharded)


def test_interrupted_shard_never_under_its_final_name(
    data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = ShardWriter.add_sample

    def dying(self: ShardWriter, meta: dict, *, payload: bytes, ext: str) -> None:
        assert not self.path.exists() and self.tmp_path.exists()
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the job killed mid-shard
        original(self, meta, payload=payload, ext=ext)

    monkeypatch.setattr(ShardWriter, "add_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        _shard(data, tmp_path)
    assert gc.isenabled()  # the collector, paused while a chunk is processed, is back on
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*tmp*"))
    assert not (tmp_path / "manifest.json").exists()
    # a temporary file left by a hard kill is removed by the next run
    (tmp_path / ".mono_en_00000.tar.tmp-99999").write_bytes(b"partial")
    monkeypatch.undo()
    _shard(data, tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))
    assert verify_directory(tmp_path)[0] == []


def test_buffer_encoding_matches_sentencepiece_lists(data: dict) -> None:
    sp = load_tokenizer(data["tok"]).sp
    texts = [t for lang in LANGS for _, _, t in data["texts"][lang]]
    texts += [t for pairs in data["pair_texts"].values() for pair in pairs for t in pair]
    texts += ["</s> <s> <pad> literal control pieces", "x", "\u00a0\u3000 odd spaces"]
    assert shard._buffers_usable(sp)
    for dtype, eos in itertools.product((np.dtype("<u2"), np.dtype("<u4")), (False, True)):
        got = shard._encode_via_buffers(sp, texts, dtype, eos=eos)
        want = shard._encode_via_lists(sp, texts, dtype, eos=eos)
        assert got is not None
        # with eos: each text's ids end with it, and the literal "</s>" text is not it
        assert np.count_nonzero(got[0] == sp.eos_id()) == (len(texts) if eos else 0)
        assert got[0].dtype == want[0].dtype == dtype
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_same_bytes_through_sentencepiece_lists(
    data: dict, sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the public-API path, taken when the private buffer entry point is missing or differs
    monkeypatch.setattr(shard, "_buffers_usable", lambda sp: False)
    _shard(data, tmp_path / "lists")
    assert _files(tmp_path / "lists") == _files(sharded)
    # and the per-batch fallback, taken if the eos count ever disagrees
    monkeypatch.setattr(shard, "_buffers_usable", lambda sp: True)
    monkeypatch.setattr(shard, "_encode_via_buffers", lambda sp, texts, dtype, eos: None)
    _shard(data, tmp_path / "fallback")
    assert _files(tmp_path / "fallback") == _files(sharded)


def test_buffers_unused_without_the_private_entry_point() -> None:
    class Stub:
        def eos_id(self) -> int:
            return 3

    assert not shard._buffers_usable(Stub())


def test_collector_paused_only_while_a_chunk_is_processed(
    data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enabled_while_writing: list[bool] = []
    original = ShardWriter.add_sample

    def spy(self: ShardWriter, meta: dict, *, payload: bytes, ext: str) -> None:
        enabled_while_writing.append(gc.isenabled())
        original(self, meta, payload=payload, ext=ext)

    monkeypatch.setattr(ShardWriter, "add_sample", spy)
    _shard(data, tmp_path)
    assert enabled_while_writing and not any(enabled_while_writing)
    assert gc.isenabled()


def test_verify_names_the_faulty_shard(
    data: dict, sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    manifest = json.loads((out / "manifest.json").read_text())
    flipped, missing = manifest["shards"][1]["path"], manifest["shards"][2]["path"]
    with tarfile.open(out / flipped) as tar:
        payload = tar.getmembers()[1]  # the first sample's compressed tokens
    raw = bytearray((out / flipped).read_bytes())
    raw[payload.offset_data + payload.size // 2] ^= 0xFF
    (out / flipped).write_bytes(bytes(raw))
    (out / missing).unlink()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"shard {flipped}: sha256 ") and "!= manifest" in err[0]
    assert err[1] == f"shard {missing}: missing"
    assert len(err) == 2

    # a damaged payload whose sha256 was also updated is caught by decoding every sample
    for entry in manifest["shards"]:
        if entry["path"] == flipped:
            entry["sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems, _ = verify_directory(out)
    assert problems[0].startswith(f"shard {flipped}")
    assert "payload does not decompress" in problems[0] and "sample" in problems[0]


def test_webdataset_reads_plain_ustar_shards(sharded: Path) -> None:
    path = sorted(sharded.glob("mono_de_*.tar"))[0]
    with open(path, "rb") as f:
        head = f.read(512)
    assert head[257:265] == b"ustar\x0000"  # POSIX USTAR, no GNU/PAX headers
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert all(m.type == tarfile.REGTYPE and m.mtime == 0 and not m.pax_headers for m in members)
    ours = list(iter_shard_samples(path))
    theirs = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s["key"] for s in ours]
    for mine, sample in zip(ours, theirs):
        decoded = decode_sample(sample["json"], payload=sample["tok.zst"])
        assert np.array_equal(decoded["tokens"], mine["tokens"])
        assert np.array_equal(decoded["doc_offsets"], mine["doc_offsets"])


def test_token_dtype_follows_vocab_size(tmp_path: Path) -> None:
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(250_002) == np.uint32
    with pytest.raises(ValueError, match=r"^vocab_size \(0\) must be in \[1, 2\*\*32\]$"):
        token_dtype(0)
    ids = np.array([5, 70_000, 250_001, 3], dtype=token_dtype(250_002))
    offsets = np.array([0, 1, 4])
    meta = {
        "kind": "mono",
        "lang": "xx",
        "source": "s",
        "first_doc": 0,
        "num_docs": 2,
        "num_tokens": 4,
        "dtype": "uint32",
        "chunk": "0",
    }
    with ShardWriter(tmp_path / "mono_xx_00000.tar", dtype=ids.dtype) as writer:
        writer.add_sample(
            meta, payload=encode_mono_payload(ids, doc_offsets=offsets), ext="tok.zst"
        )
    [sample] = list(iter_shard_samples(tmp_path / "mono_xx_00000.tar"))
    assert sample["tokens"].dtype == np.uint32
    assert sample["tokens"].tolist() == [5, 70_000, 250_001, 3]
    assert sample["doc_offsets"].tolist() == [0, 1, 4]


def test_decode_sample_rejects_inconsistent_payloads() -> None:
    meta = {"kind": "mono", "dtype": "uint16", "num_docs": 1, "num_tokens": 3}
    zstd = zstandard.ZstdCompressor(write_checksum=True)
    good = encode_mono_payload(np.array([1, 2, 3], np.uint16), doc_offsets=np.array([0, 3]))
    assert decode_sample(meta, payload=zstd.compress(good))["tokens"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"^s: payload is 14 bytes, metadata implies 16$"):
        decode_sample({**meta, "num_tokens": 4}, payload=zstd.compress(good), where="s")
    bad_offsets = encode_mono_payload(np.array([1, 2, 3], np.uint16), doc_offsets=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"^s: document offsets must rise from 0 to 3$"):
        decode_sample(meta, payload=zstd.compress(bad_offsets), where="s")
    with pytest.raises(ValueError, match=r"^s: payload does not decompress"):
        decode_sample(meta, payload=b"junk", where="s")


def test_mono_samples_store_eos_after_every_document(sharded: Path) -> None:
    zstd = zstandard.ZstdCompressor(write_checksum=True)
    meta = {"kind": "mono", "dtype": "uint16", "num_docs": 2, "num_tokens": 3, "eos": 3}

    def payload(ids: list[int], offsets: list[int]) -> bytes:
        raw = encode_mono_payload(np.array(ids, np.uint16), doc_offsets=np.array(offsets))
        return zstd.compress(raw)

    sample = decode_sample(meta, payload=payload([7, 8, 3, 9, 3], [0, 3, 5]))
    assert sample["eos"] == 3 and sample["tokens"].tolist() == [7, 8, 3, 9, 3]
    assert [d.tolist() for d in iter_documents_of_sample(sample)] == [[7, 8], [9]]
    with pytest.raises(ValueError, match=r"^s: a document does not end with eos 3$"):
        decode_sample(meta, payload=payload([7, 8, 9, 3, 3], [0, 3, 5]), where="s")
    with pytest.raises(ValueError, match=r"^s: document offsets must rise from 0 to 5$"):
        decode_sample(meta, payload=payload([7, 8, 3, 9, 3], [0, 0, 5]), where="s")
    # "stream": what a reader cutting the ids at eos needs, the offsets left unread
    bad_offsets = payload([7, 8, 3, 9, 3], [0, 0, 5])
    assert decode_sample(meta, payload=bad_offsets, check="stream")["tokens"][-1] == 3
    with pytest.raises(ValueError, match=r"^s: a document does not end with eos 3$"):
        decode_sample(meta, payload=payload([7, 8, 3, 9, 4], [0, 3, 5]), where="s", check="stream")
    # T + D ids: the metadata's 3 tokens and 2 eos
    with pytest.raises(ValueError, match=r"^s: payload is 18 bytes, metadata implies 22$"):
        decode_sample(meta, payload=payload([7, 8, 3], [0, 3, 3]), where="s")
    # the job's samples: every document ends with the tokenizer's eos, and eos is nowhere else
    for shard_path in sorted(sharded.glob("mono_*.tar")):
        for s in iter_shard_samples(shard_path):
            ends = s["doc_offsets"][1:] - 1
            assert s["eos"] == 3 and (s["tokens"][ends] == 3).all()
            assert np.count_nonzero(s["tokens"] == 3) == s["num_docs"]
            assert len(s["tokens"]) <= SETTINGS.sample_tokens or s["num_docs"] == 1


def test_cli_errors_are_one_line_with_exit_2(
    data: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tok = str(data["tok"])
    cases = [
        (
            ["shard", "--tokenizer", tok, "--input", f"en={tmp_path}/nope.txt", "--out", "o"],
            f"error: --input en '{tmp_path}/nope.txt': no such file",
        ),
        (
            [
                "shard",
                "--tokenizer",
                str(tmp_path / "t"),
                "--input",
                f"en={data['root']}/en.txt",
                "--out",
                str(tmp_path / "o"),
            ],
            f"error: --tokenizer '{tmp_path}/t': no such directory",
        ),
        (
            [
                "shard",
                "--tokenizer",
                tok,
                "--input",
                f"ko={data['root']}/en.txt",
                "--out",
                str(tmp_path / "o"),
            ],
            "error: language 'ko' is not one of the tokenizer's languages (de, en, ja, ru); "
            "train the tokenizer with it",
        ),
        (
            [
                "shard",
                "--tokenizer",
                tok,
                "--input",
                f"en={data['root']}/en.txt",
                "--out",
                str(tmp_path / "o"),
                "--workers",
                "0",
            ],
            "error: --workers (0) must be >= 1",
        ),
        (
            ["shard", "--tokenizer", tok, "--out", str(tmp_path / "o")],
            "error: shard: give at least one --input LANG=PATH or --parallel SRC-TGT=PATH",
        ),
        (
            [
                "train-tokenizer",
                "--input",
                f"en={data['root']}/en.txt",
                "--vocab-size",
                "1000",
                "--out",
                str(tmp_path / "t"),
                "--alpha",
                "2",
            ],
            "error: --alpha (2.0) must be in (0, 1]",
        ),
        (["inspect", str(tmp_path)], f"error: manifest '{tmp_path}/manifest.json': no such file"),
        (["verify", str(tmp_path)], f"error: manifest '{tmp_path}/manifest.json': no such file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == message + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", "--input", "en=x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err and "--out" in err


def test_cli_shard_and_inspect(
    data: dict, sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = data["root"]
    argv = [
        "shard",
        "--tokenizer",
        str(data["tok"]),
        "--input",
        f"{root}/{{lang}}.txt",
        "--parallel",
        f"{root}/{{src}}-{{tgt}}.tsv",
        "--out",
        str(tmp_path),
        "--quiet",
        "--sample-tokens",
        "600",
        "--shard-text-mb",
        str(6_000 / (1 << 20)),
        "--max-doc-bytes",
        "10000",
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "en-ja" in out
    # {lang} finds en.txt but not en.bad.txt, so only English differs from the module's run
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    reference = json.loads((sharded / "manifest.json").read_text())
    for lang in ("de", "ru", "ja"):
        assert manifest["languages"][lang] == reference["languages"][lang]
    assert manifest["languages"]["en"]["documents"] == 120
    assert parse_mono_specs([f"{root}/{{lang}}.txt"])[1].lang == "en"
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"]["en-de"]["documents"] == 150
    assert main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "en-de" in table and "ja" in table


def test_merge_parts_of_a_split_job(
    data: dict, sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    by_lang = {m.lang: m for m in data["mono"]}
    for i, langs in enumerate((("de", "en"), ("ja", "ru"))):
        run_shard_job(
            [by_lang[lang] for lang in langs],
            pairs=[p for p in data["pairs"] if p.tgt == langs[0]],
            tokenizer=data["tok"],
            out=tmp_path / f"part_{i}",
            workers=1,
            settings=SETTINGS,
            log=lambda line: None,
        )
    parts = [str(tmp_path / "part_0"), str(tmp_path / "part_1")]
    assert main(["merge", *parts, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    merged = json.loads((tmp_path / "manifest.json").read_text())
    whole = json.loads((sharded / "manifest.json").read_text())
    assert merged["languages"] == whole["languages"]
    assert merged["pairs"] == {"en-de": whole["pairs"]["en-de"], "en-ja": whole["pairs"]["en-ja"]}
    assert sorted(e["path"].split("/")[1] for e in merged["shards"]) == sorted(
        e["path"] for e in whole["shards"]
    )
    assert verify_directory(tmp_path)[0] == []

    other = tmp_path / "other_tok"
    train_tokenizer(
        data["mono"][:1], out=other, vocab_size=500, num_sentinels=4, character_coverage=0.98
    )
    run_shard_job(
        data["mono"][:1],
        tokenizer=other,
        out=tmp_path / "part_x",
        workers=1,
        settings=SETTINGS,
        log=lambda line: None,
    )
    assert main(["merge", parts[0], str(tmp_path / "part_x"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: manifest '{tmp_path}/part_x': tokenizer model_sha256 ")
    assert err.endswith("parts must share one tokenizer\n") and err.count("\n") == 1
