"""Input specs and raw readers: formats, compression, bad records counted (never raised), bad
files (truncated or corrupt compression, a TSV without tabs, aligned files of different lengths)
raised naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from data_pipeline.text_inputs import (
    CorruptInputError,
    InputError,
    MonoInput,
    PairInput,
    Rejects,
    iter_documents,
    iter_pair_segments,
    iter_pairs,
    iter_raw_segments,
    parse_mono_specs,
    parse_pair_specs,
    parse_segment,
)


def _docs(path: Path, **kwargs) -> tuple[list[tuple[int, str]], Rejects]:
    rejects = Rejects()
    return list(iter_documents(path, rejects=rejects, **kwargs)), rejects


def test_lines_gz_and_zst_read_the_same(tmp_path: Path) -> None:
    data = "first doc\nzweites Dokument\n第三\n".encode()
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data, mtime=0))
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    want = [(0, "first doc"), (1, "zweites Dokument"), (2, "第三")]
    for name in ("a.txt", "a.txt.gz", "a.txt.zst"):
        docs, rejects = _docs(tmp_path / name)
        assert docs == want, name
        assert rejects.total == 0


def test_bad_lines_are_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    long_line = b"x" * 5000
    path.write_bytes(
        b"ok one\n\xff\xfe broken\n\n   \n" + long_line + b"\nok two\r\nlast no newline"
    )
    docs, rejects = _docs(path, max_doc_bytes=1000)
    assert docs == [(0, "ok one"), (5, "ok two"), (6, "last no newline")]
    assert rejects.as_dict() == {
        "invalid_utf8": 1,
        "empty": 2,
        "too_long": 1,
        "bad_json": 0,
        "malformed": 0,
    }


def test_overlong_line_of_exact_limit_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "edge.txt"
    path.write_bytes(b"a" * 10 + b"\n" + b"b" * 11 + b"\n" + b"c" * 12 + b"\nnext\n")
    docs, rejects = _docs(path, max_doc_bytes=10)
    assert docs == [(0, "a" * 10), (3, "next")]
    assert rejects.too_long == 2


def test_blank_line_format(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("para one\nline two\n\n\n\nsecond doc\n\n")
    docs, rejects = _docs(path, fmt="blank")
    assert docs == [(0, "para one\nline two"), (5, "second doc")]  # first line numbers
    assert rejects.total == 0


def test_jsonl_format_and_its_faults(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": "hello"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": 5}),
        '{"text": "lone surrogate \\ud800"}',
        json.dumps({"text": "ünïcode"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    docs, rejects = _docs(path)  # auto picks jsonl from the suffix
    assert docs == [(0, "hello"), (6, "ünïcode")]
    assert (rejects.bad_json, rejects.empty, rejects.invalid_utf8) == (3, 1, 1)
    docs, _ = _docs(path, fmt="jsonl", text_field="body")
    assert docs == [(2, "no text field")]


def test_tsv_pairs_and_aligned_files(tmp_path: Path) -> None:
    tsv = tmp_path / "en-de.tsv"
    tsv.write_bytes(b"Hello\tHallo\nno tab here\na\tb\tc\n\xff\tx\nYes\tJa\n")
    rejects = Rejects()
    pairs = list(iter_pairs(PairInput("en", "de", (tsv,)), rejects=rejects))
    assert pairs == [("en-de.tsv", 0, "Hello", "Hallo"), ("en-de.tsv", 4, "Yes", "Ja")]
    assert (rejects.malformed, rejects.invalid_utf8) == (2, 1)

    (tmp_path / "x.en").write_text("one\ntwo\n\nfour")
    (tmp_path / "x.de").write_text("eins\nzwei\ndrei\nvier\n\n\n")  # trailing blank lines
    rejects = Rejects()
    pair = PairInput("en", "de", (tmp_path / "x.en", tmp_path / "x.de"), aligned=True)
    assert [p[1:] for p in iter_pairs(pair, rejects=rejects)] == [
        (0, "one", "eins"),
        (1, "two", "zwei"),
        (3, "four", "vier"),
    ]
    assert rejects.empty == 1


def test_aligned_files_of_different_lengths_are_an_error(tmp_path: Path) -> None:
    # before: the unmatched line was counted as malformed and the job exited 0
    (tmp_path / "x.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "x.de").write_text("eins\nzwei\n")
    pair = PairInput("en", "de", (tmp_path / "x.en", tmp_path / "x.de"), aligned=True)
    with pytest.raises(InputError, match=r"x.en' has 3 lines but .*x.de' has 2: line-aligned"):
        next(iter_pairs(pair, rejects=Rejects()))
    pair = PairInput("en", "de", (tmp_path / "x.de", tmp_path / "x.en"), aligned=True)
    with pytest.raises(InputError, match=r"x.de' has 2 lines but .*x.en' has 3") as err:
        next(iter_pairs(pair, rejects=Rejects()))
    assert err.value.input_name == "en-de"


def test_tsv_without_tabs_is_an_error(tmp_path: Path) -> None:
    # before: every line counted as malformed, exit 0 with nothing sharded
    tsv = tmp_path / "en-de.tsv"
    tsv.write_text("Hello Hallo\nYes Ja\n")
    with pytest.raises(InputError, match=r"en-de: '.*en-de.tsv' has no tab in its first 2 line"):
        list(iter_pairs(PairInput("en", "de", (tsv,)), rejects=Rejects()))
    tsv.write_text("\n \n")  # only blank lines: empty, not a wrong format
    rejects = Rejects()
    assert list(iter_pairs(PairInput("en", "de", (tsv,)), rejects=rejects)) == []
    assert rejects.empty == 2


def _cut_and_flipped(data: bytes) -> dict[str, bytes]:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    return {"truncated": data[: len(data) // 2], "bit flip": bytes(flipped)}


@pytest.mark.parametrize("case", ["truncated", "bit flip"])
@pytest.mark.parametrize("suffix", [".zst", ".gz"])
def test_truncated_or_corrupt_compressed_input_is_an_error(
    tmp_path: Path, suffix: str, case: str
) -> None:
    # before: a truncated .zst was read up to the cut (13,530 of 31,011 documents, 0 rejected)
    text = "".join(
        f"document {i} with some words in it, {i * 7919 % 10007}\n" for i in range(30000)
    )
    if suffix == ".zst":  # with a checksum, as the zstd tool writes by default
        data = zstandard.ZstdCompressor(write_checksum=True).compress(text.encode())
    else:
        data = gzip.compress(text.encode())
    path = tmp_path / f"en.txt{suffix}"
    path.write_bytes(_cut_and_flipped(data)[case])
    kind = {".zst": "zstd", ".gz": "gzip"}[suffix]
    word = "truncated" if case == "truncated" else "corrupt"
    with pytest.raises(CorruptInputError, match=rf"^input '.*en.txt{suffix}': {word} {kind} data"):
        _docs(path)
    with pytest.raises(CorruptInputError) as err:
        list(iter_raw_segments(path, target_bytes=1 << 16, rejects=Rejects()))
    assert err.value.path == path and 0 < err.value.offset <= len(path.read_bytes())
    assert f"at byte {err.value.offset:,} of the compressed file" in str(err.value)
    if case == "truncated":
        assert err.value.offset == len(path.read_bytes())


def test_not_gzip_and_truncated_sample_file(tmp_path: Path) -> None:
    path = tmp_path / "en.txt.gz"
    path.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(CorruptInputError, match=r"en.txt.gz': corrupt gzip data \(Not a gzip"):
        _docs(path)
    # a truncated download: the sample's English file cut in half (written without a checksum)
    sample = Path(__file__).resolve().parents[2] / "data_pipeline" / "sample" / "mono"
    data = (sample / "en.train.txt.zst").read_bytes()
    path = tmp_path / "en.train.txt.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptInputError, match=rf"truncated zstd data .* at byte {len(data) // 2:,}"
    ):
        _docs(path)
    pair = PairInput("en", "de", (path,))
    with pytest.raises(CorruptInputError):
        list(iter_pairs(pair, rejects=Rejects()))


def test_a_byte_order_mark_is_not_part_of_the_first_document(tmp_path: Path) -> None:
    # before: the first document started with U+FEFF (and a JSONL file's first line was bad JSON)
    bom = b"\xef\xbb\xbf"
    for name, data in (
        ("a.txt", bom + b"first\nsecond\n"),
        ("a.txt.zst", zstandard.ZstdCompressor().compress(bom + b"first\nsecond\n")),
        ("a.txt.gz", gzip.compress(bom + b"first\nsecond\n")),
    ):
        (tmp_path / name).write_bytes(data)
        assert _docs(tmp_path / name)[0] == [(0, "first"), (1, "second")], name
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n')
    assert _docs(tmp_path / "a.jsonl") == ([(0, "first")], Rejects())
    (tmp_path / "b.txt").write_bytes(bom + b"\nfirst\n")  # a BOM alone on the first line
    assert _docs(tmp_path / "b.txt") == ([(1, "first")], Rejects(empty=1))
    (tmp_path / "p.tsv").write_bytes(bom + b"one\teins\n")
    assert [
        p[2:] for p in iter_pairs(PairInput("en", "de", (tmp_path / "p.tsv",)), rejects=Rejects())
    ] == [("one", "eins")]
    (tmp_path / "x.en").write_bytes(bom + b"one\ntwo\n")
    (tmp_path / "x.de").write_bytes(bom + b"eins\nzwei\n")
    pair = PairInput("en", "de", (tmp_path / "x.en", tmp_path / "x.de"), aligned=True)
    assert [p[2:] for p in iter_pairs(pair, rejects=Rejects())] == [
        ("one", "eins"),
        ("two", "zwei"),
    ]


def test_specs_globs_and_placeholders(tmp_path: Path) -> None:
    for name in ("en.train.txt", "de.train.txt", "en.extra.txt", "en-de.tsv", "en-fr.tsv"):
        (tmp_path / name).write_text("x y\n")
    got = parse_mono_specs([f"{tmp_path}/{{lang}}.train.txt", f"en={tmp_path}/en.e*.txt"])
    assert got == [
        MonoInput("de", (tmp_path / "de.train.txt",)),
        MonoInput("en", (tmp_path / "en.extra.txt", tmp_path / "en.train.txt")),
    ]
    pairs = parse_pair_specs([f"{tmp_path}/{{src}}-{{tgt}}.tsv"])
    assert [(p.name, p.paths) for p in pairs] == [
        ("en-de", (tmp_path / "en-de.tsv",)),
        ("en-fr", (tmp_path / "en-fr.tsv",)),
    ]


def test_spec_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        parse_mono_specs([f"en={tmp_path}/missing.txt"])
    assert str(err.value) == f"--input en '{tmp_path}/missing.txt': no such file"
    with pytest.raises(FileNotFoundError, match="no file matches this glob$"):
        parse_mono_specs([f"en={tmp_path}/*.nothing"])
    with pytest.raises(ValueError) as err:
        parse_mono_specs(["just/a/path.txt"])
    assert str(err.value) == (
        "--input 'just/a/path.txt' must be LANG=PATH or a PATH containing {lang}"
    )
    with pytest.raises(ValueError, match=r"language 'EN' is not a language code"):
        parse_mono_specs([f"EN={tmp_path}/x"])
    (tmp_path / "a.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match="source and target language must differ$"):
        parse_pair_specs([f"en-en={tmp_path}/a.tsv"])
    with pytest.raises(ValueError, match=r"^--parallel 'x.tsv' must be SRC-TGT=PATH.tsv"):
        parse_pair_specs(["x.tsv"])
    with pytest.raises(ValueError, match=r"^--format 'csv' must be one of auto, lines"):
        _docs(tmp_path / "a.tsv", fmt="csv")


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_block_boundaries_do_not_change_what_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    import data_pipeline.text_inputs as text_inputs

    path = tmp_path / "mixed.txt"
    path.write_bytes(
        b"alpha\r\n\xff bad\n" + b"z" * 40 + b"\n\n  \nbeta \xc3\xa9\nx" + b"q" * 30 + b"\nend"
    )
    want, want_rejects = _docs(path, max_doc_bytes=20)
    monkeypatch.setattr(text_inputs, "_READ_CHUNK", block)
    got, rejects = _docs(path, max_doc_bytes=20)
    assert got == want == [(0, "alpha"), (5, "beta é"), (7, "end")]
    assert rejects.as_dict() == want_rejects.as_dict()
    assert (rejects.invalid_utf8, rejects.too_long, rejects.empty) == (1, 2, 2)
    tsv = tmp_path / "p.tsv"
    tsv.write_bytes(b"a\tb\r\n" + b"long\t" + b"w" * 50 + b"\nc\td")
    pairs = list(iter_pairs(PairInput("en", "de", (tsv,)), max_doc_bytes=20, rejects=Rejects()))
    assert pairs == [("p.tsv", 0, "a", "b"), ("p.tsv", 2, "c", "d")]


def test_segments_cut_at_record_boundaries(tmp_path: Path) -> None:
    lines = [f"line {i} " + "x" * (i % 13) for i in range(200)]
    path = tmp_path / "a.txt.zst"
    raw = ("\n".join(lines) + "\n").encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    rejects = Rejects()
    segments = list(iter_raw_segments(path, target_bytes=100, rejects=rejects))
    assert b"".join(s.data for s in segments) == raw
    assert all(s.data.endswith(b"\n") for s in segments)
    assert all(100 <= len(s.data) < 100 + 30 for s in segments[:-1])
    docs = []
    for segment in segments:
        batch = parse_segment(segment, kind="mono", rejects=rejects)
        docs += zip(batch.ordinals, batch.texts)
    assert docs == list(enumerate(lines)) and rejects.total == 0


def test_huge_record_straddling_a_cut_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"a" * 10 + b"\n" + b"b" * 5000 + b"\n" + b"c" * 10 + b"\n")
    for block in (7, 1 << 20):
        import data_pipeline.text_inputs as text_inputs

        old, text_inputs._READ_CHUNK = text_inputs._READ_CHUNK, block
        try:
            rejects = Rejects()
            segments = list(
                iter_raw_segments(path, target_bytes=5, max_doc_bytes=100, rejects=rejects)
            )
        finally:
            text_inputs._READ_CHUNK = old
        got = []
        for segment in segments:
            batch = parse_segment(segment, kind="mono", max_doc_bytes=100, rejects=rejects)
            got += zip(batch.ordinals, batch.texts)
        assert got == [(0, "a" * 10), (2, "c" * 10)], block
        assert rejects.too_long == 1, block


def test_blank_format_segments_end_at_blank_lines(tmp_path: Path) -> None:
    docs = [f"doc {i}\nsecond line of {i}" for i in range(50)]
    path = tmp_path / "d.txt"
    path.write_text("\n\n \n".join(docs) + "\n")
    rejects = Rejects()
    got = []
    for segment in iter_raw_segments(path, fmt="blank", target_bytes=64, rejects=rejects):
        batch = parse_segment(segment, kind="mono", rejects=rejects)
        got += batch.texts
        assert batch.ordinals == [4 * int(t.split()[1]) for t in batch.texts]  # first lines
    assert got == docs and rejects.total == 0


def test_aligned_segments_keep_lines_together(tmp_path: Path) -> None:
    (tmp_path / "x.en").write_text("".join(f"english {i}\n" for i in range(100)))
    (tmp_path / "x.de").write_text("".join(f"deutsch {i}\n" for i in range(100)))
    pair = PairInput("en", "de", (tmp_path / "x.en", tmp_path / "x.de"), aligned=True)
    rejects = Rejects()
    got = []
    for segment in iter_pair_segments(pair, target_bytes=50, max_doc_bytes=100, rejects=rejects):
        assert segment.data.count(b"\n") == segment.tgt_data.count(b"\n") or not segment.data
        batch = parse_segment(segment, kind="pair", rejects=rejects)
        got += zip(batch.ordinals, batch.texts, batch.tgt_texts)
    assert got == [(i, f"english {i}", f"deutsch {i}") for i in range(100)]
    assert rejects.total == 0
