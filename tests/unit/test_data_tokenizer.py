"""Tokenizer training: special ids as the sidecar states, exact round trip, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import zstandard

from data_pipeline.readers import MonoInput
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
    }
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
    ]
    ids = tok.encode(texts)
    assert [tok.decode(i) for i in ids] == texts
    # a literal "<mask>" in text is spelled out, never the control id
    assert tok.special_ids["mask"] not in ids[-1]
    assert tok.decode([tok.special_ids["mask"], tok.lang_ids["en"]]) == ""


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
        "--vocab-size (100) must be >= 277: 4 base specials, 16 control symbols, "
        "256 byte pieces and at least one more"
    )
    with pytest.raises(ValueError, match=r"^--vocab-size \(400\) does not fit this input: "):
        train_tokenizer(corpus, out=tmp_path, vocab_size=400, num_sentinels=8)
    with pytest.raises(ValueError, match=r"^--alpha \(0\) must be in \(0, 1\]$"):
        train_tokenizer(corpus, out=tmp_path, vocab_size=1000, alpha=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"^--input xx: no usable document in 1 file\(s\)$"):
        train_tokenizer([MonoInput("xx", (empty,))], out=tmp_path, vocab_size=1000)
    assert not (tmp_path / "spm.json").exists()


def test_load_rejects_a_replaced_model(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "spm.json").write_bytes((tok_dir / "spm.json").read_bytes())
    (tmp_path / "spm.model").write_bytes((tok_dir / "spm.model").read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"sha256 .* != sidecar's .*: the model was replaced"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^--tokenizer '.*nope': no such directory$"):
        load_tokenizer(tmp_path / "nope")
