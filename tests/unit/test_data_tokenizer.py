"""Tokenizer training: special ids as the sidecar states, exact round trip, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from data_pipeline.text_inputs import MonoInput, PairInput
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer

SAMPLE = Path(__file__).resolve().parents[2] / "data_pipeline" / "sample" / "mono"
LANGS = ("en", "de", "ru", "ja", "zh")  # Latin, Cyrillic, CJK
SMALL = dict(vocab_size=1000, num_sentinels=8, character_coverage=0.98, num_threads=2)


def _sample_lines(lang: str, split: str, n: int) -> list[str]:
    raw = zstandard.ZstdDecompressor().decompress((SAMPLE / f"{lang}.{split}.txt.zst").read_bytes())
    return raw.decode("utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[MonoInput]:
    root = tmp_path_factory.mktemp("corpus")
    inputs = []
    for lang in LANGS:
        path = root / f"{lang}.txt"
        path.write_text("\n".join(_sample_lines(lang, "train", 300)) + "\n", encoding="utf-8")
        inputs.append(MonoInput(lang, (path,)))
    return inputs


@pytest.fixture(scope="module")
def tok_dir(corpus: list[MonoInput], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus, out=out, alpha=0.3, **SMALL)
    return out


def test_sidecar_states_the_special_ids(tok_dir: Path) -> None:
    meta = json.loads((tok_dir / "spm.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
    assert meta["vocab_size"] == sp.get_piece_size() == 1000
    assert {k: meta["special_ids"][k] for k in ("pad", "unk", "bos", "eos")} == {
        "pad": 0,
        "unk": 1,
        "bos": 2,
        "eos": 3,
    }
    pieces = {
        "pad": "<pad>",
        "unk": "<unk>",
        "bos": "<s>",
        "eos": "</s>",
        "mask": "<mask>",
        "cls": "<cls>",
        "sep": "<sep>",
        "bt": "<bt>",
    }
    assert sorted(meta["special_ids"]) == sorted(pieces)
    for name, piece in pieces.items():
        assert sp.id_to_piece(meta["special_ids"][name]) == piece
    assert sorted(meta["lang_ids"]) == sorted(LANGS) == meta["languages"]
    for lang, idx in meta["lang_ids"].items():
        assert sp.id_to_piece(idx) == f"<lang:{lang}>"
        assert sp.is_control(idx)
    assert [sp.id_to_piece(i) for i in meta["sentinel_ids"]] == [
        f"<extra_id_{i}>" for i in range(8)
    ]
    ids = list(meta["special_ids"].values()) + list(meta["lang_ids"].values())
    ids += meta["sentinel_ids"]
    assert len(set(ids)) == len(ids)
    # the control symbols come in the documented order, <bt> last (after the sentinels), so
    # tokenizers made before <bt> was reserved keep every id up to the last sentinel
    control = [i for i in range(meta["vocab_size"]) if sp.is_control(i)]
    order = [meta["special_ids"][k] for k in ("pad", "unk", "bos", "eos", "mask", "cls", "sep")]
    order += [meta["lang_ids"][lang] for lang in meta["languages"]] + meta["sentinel_ids"]
    assert control == [i for i in order if i != 1] + [meta["special_ids"]["bt"]]  # unk: not control
    assert order == list(range(len(order))) and meta["special_ids"]["bt"] == len(order)
    assert meta["alpha"] == 0.3


def test_sample_is_alpha_smoothed(tok_dir: Path) -> None:
    sample = json.loads((tok_dir / "spm.json").read_text())["sample"]["languages"]
    n = {lang: s["n"] for lang, s in sample.items()}
    total = sum(n.values())
    norm = sum((v / total) ** 0.3 for v in n.values())
    for lang, s in sample.items():
        assert s["q"] == pytest.approx(n[lang] / total)
        assert s["p"] == pytest.approx((n[lang] / total) ** 0.3 / norm)
        # sampled characters follow p (up to whole documents drawn at random)
        assert s["sampled"] / sum(x["sampled"] for x in sample.values()) == pytest.approx(
            s["p"], rel=0.25
        )


def test_round_trip_is_exact_on_held_out_text(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    texts = [line for lang in LANGS for line in _sample_lines(lang, "valid", 40)]
    texts += [
        "  two  spaces\tand tab ",
        "emoji 😀 and ünïcode",
        "Ελληνικά, हिन्दी, 한국어",
        "<mask>",
        "<bt> tagged",
    ]
    ids = tok.encode(texts)
    assert [tok.decode(i) for i in ids] == texts
    # a literal "<mask>" or "<bt>" in text is spelled out, never the control id
    assert tok.special_ids["mask"] not in ids[-2]
    assert tok.special_ids["bt"] not in ids[-1]
    assert tok.decode([tok.special_ids["mask"], tok.lang_ids["en"], tok.special_ids["bt"]]) == ""


def test_same_inputs_give_identical_files(
    corpus: list[MonoInput], tok_dir: Path, tmp_path: Path
) -> None:
    train_tokenizer(corpus, out=tmp_path, alpha=0.3, **SMALL)
    for name in ("spm.model", "spm.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_training_errors_are_one_line(corpus: list[MonoInput], tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        train_tokenizer(corpus, out=tmp_path, vocab_size=100, num_sentinels=8)
    assert str(err.value) == (
        "--vocab-size (100) must be >= 278: 4 base specials, 17 control symbols, "
        "256 byte pieces and at least one more"
    )
    with pytest.raises(ValueError, match=r"^--vocab-size \(400\) does not fit this input: "):
        train_tokenizer(corpus, out=tmp_path, vocab_size=400, num_sentinels=8)
    with pytest.raises(ValueError, match=r"^--alpha \(0\) must be in \(0, 1\]$"):
        train_tokenizer(corpus, out=tmp_path, vocab_size=1000, alpha=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(
        ValueError, match=r"^--input xx: no usable document in 1 file\(s\) \(2 empty\)$"
    ):
        train_tokenizer([MonoInput("xx", (empty,))], out=tmp_path, vocab_size=1000)
    assert not (tmp_path / "spm.json").exists()


def test_load_rejects_a_replaced_model(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "spm.json").write_bytes((tok_dir / "spm.json").read_bytes())
    (tmp_path / "spm.model").write_bytes((tok_dir / "spm.model").read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"sha256 .* != sidecar's .*: the model was replaced"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^--tokenizer '.*nope': no such directory$"):
        load_tokenizer(tmp_path / "nope")


def _byte_share(tok, texts: list[str]) -> float:
    ids = [i for row in tok.encode(texts) for i in row]
    return sum(tok.sp.is_byte(i) for i in ids) / len(ids)


def test_a_language_seen_only_in_pairs_is_a_language_of_the_tokenizer(tmp_path: Path) -> None:
    # mono {en, de} and pairs {en-ko}: the sample has no en-ko pair set, so the pairs are built
    # from real English and Korean training paragraphs (alignment does not matter for sampling)
    mono = []
    for lang in ("en", "de"):
        path = tmp_path / f"{lang}.txt"
        path.write_text("\n".join(_sample_lines(lang, "train", 600)) + "\n", encoding="utf-8")
        mono.append(MonoInput(lang, (path,)))
    english = _sample_lines("en", "train", 1200)[600:]
    korean = _sample_lines("ko", "train", 600)
    tsv = tmp_path / "en-ko.tsv"
    tsv.write_text("".join(f"{e}\t{k}\n" for e, k in zip(english, korean)), encoding="utf-8")
    small = dict(vocab_size=2000, num_sentinels=8, num_threads=2)
    meta = train_tokenizer(mono, pairs=[PairInput("en", "ko", (tsv,))], out=tmp_path / "t", **small)
    assert meta["languages"] == ["de", "en", "ko"] and meta["parallel"] == ["en-ko"]
    sample = meta["sample"]["languages"]
    # both sides count like mono text: n_en is the mono text plus the English side
    mono_en = sum(len(line) for line in _sample_lines("en", "train", 600))
    assert sample["en"]["n"] == mono_en + sum(map(len, english))
    assert sample["ko"]["n"] == sum(map(len, korean)) and sample["ko"]["pair_documents"] == 600
    assert sample["ko"]["sampled"] > 0

    tok = load_tokenizer(tmp_path / "t")
    assert "ko" in tok.lang_ids
    held_out = {lang: _sample_lines(lang, "valid", 100) for lang in ("en", "de", "ko")}
    shares = {lang: _byte_share(tok, texts) for lang, texts in held_out.items()}
    assert shares["ko"] < 0.05 and max(shares["en"], shares["de"]) < 0.02, shares
    # without the pairs, held-out Korean is mostly bytes
    train_tokenizer(mono, out=tmp_path / "mono", **small)
    assert _byte_share(load_tokenizer(tmp_path / "mono"), held_out["ko"]) > 0.5


def test_a_failed_training_leaves_no_directory_and_says_why(tmp_path: Path) -> None:
    text = tmp_path / "en.txt"
    text.write_text("".join(f"a document of more than twenty bytes {i}\n" for i in range(50)))
    out = tmp_path / "new" / "tok"
    with pytest.raises(ValueError) as err:
        train_tokenizer([MonoInput("en", (text,))], out=out, vocab_size=1000, max_doc_bytes=20)
    assert str(err.value) == (
        "--input en: no usable document in 1 file(s) (50 longer than --max-doc-bytes (20))"
    )
    with pytest.raises(ValueError, match=r"^--vocab-size \(5000\) does not fit this input"):
        train_tokenizer([MonoInput("en", (text,))], out=out, vocab_size=5000, num_threads=1)
    assert not (tmp_path / "new").exists()  # before: an empty directory stayed behind
    tsv = tmp_path / "en-de.tsv"
    tsv.write_text("one\t\n\ttwo\n")
    with pytest.raises(
        ValueError, match=r"^--parallel en-de: no usable pair in 1 file\(s\) \(2 em"
    ):
        train_tokenizer([], pairs=[PairInput("en", "de", (tsv,))], out=out, vocab_size=1000)
    twice = [MonoInput("en", (text,)), MonoInput("en", (text,))]
    with pytest.raises(ValueError, match=r"^--input en: the language is given twice"):
        train_tokenizer(twice, out=out, vocab_size=1000)
    out.parent.mkdir()
    out.write_text("a file")
    with pytest.raises(ValueError, match=r"^--out '.*tok' is a file, not a directory$"):
        train_tokenizer([MonoInput("en", (text,))], out=out, vocab_size=1000)
    with pytest.raises(ValueError, match=r"^--out '.*tok/sub': cannot create it"):
        train_tokenizer([MonoInput("en", (text,))], out=out / "sub", vocab_size=1000)
