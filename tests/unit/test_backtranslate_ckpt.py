"""``--translator ckpt:DIR``: our own encoder-decoder checkpoint as a back-translation backend,
found through the ``rosetta.translators`` entry point (``data_pipeline`` imports no model code):
its translations are ``pretrain.generate``'s on the checkpoint's model, and the stage writes a
synthetic pair set with the checkpoint in its provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import backtranslate as bt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from checkpoints_tools.testing import encdec_config, make_tokenizer, save_family_checkpoint

    root = tmp_path_factory.mktemp("bt_ckpt")
    tok = make_tokenizer(root)
    cfg = encdec_config(tokenizer=tok, run_dir=root / "run", max_seq_len=64)
    return {"tok": tok, "ckpt": save_family_checkpoint(cfg), "root": root}


def _options(**kw) -> bt.TranslatorOptions:
    return bt.TranslatorOptions(max_len_a=0.0, max_len_b=6, target="es", **kw)


def _expected(tiny, texts: list[str], **generate_kwargs) -> list[str]:
    from checkpoints_tools.dcp_io import open_checkpoint
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.generate import generate
    from pretrain.models import build_model

    opened = open_checkpoint(tiny["ckpt"])
    model = build_model(opened.model_cfg)
    model.load_state_dict(opened.load_model_state())
    tok = load_tokenizer(tiny["tok"])
    eos = tok.special_ids["eos"]
    out = generate(
        model.eval(),
        [ids + [eos] for ids in tok.encode(texts)],
        decoder_start_id=tok.lang_ids["es"],
        eos_id=eos,
        pad_id=tok.special_ids["pad"],
        max_len_b=6,
        **generate_kwargs,
    )
    return [tok.decode([i for i in ids if i != eos]).strip() for ids in out]


def test_ckpt_backend_translates_as_generate_does(tiny):
    from checkpoints_tools.testing import sample_lines

    texts = sample_lines("en", count=4)
    translator = bt.make_translator(f"ckpt:{tiny['ckpt']}", _options())
    assert translator.name == "ckpt:run/step_5"
    assert len(translator.settings["model_sha256"]) == 64 and translator.settings["target"] == "es"
    got = translator.translate(texts, seed=0)
    assert got == _expected(tiny, texts) and len(got) == 4
    beam = bt.make_translator(
        f"ckpt:{tiny['ckpt']}", _options(decode=bt.parse_decode("beam:3"))
    ).translate(texts, seed=0)
    assert beam == _expected(tiny, texts, decode="beam", num_beams=3)


def test_the_hf_export_translates_as_the_checkpoint(tiny, tmp_path: Path):
    """``hf:`` on the checkpoint's export gives the ``ckpt:`` backend's translations: the
    exported tokenizer ends each source in ``</s>`` and the decoder starts with ``<lang:es>``,
    as the translation objective trains it."""
    from checkpoints_tools.convert import export_hf
    from checkpoints_tools.testing import sample_lines

    texts = sample_lines("en", count=4)
    export_hf(tiny["ckpt"], out=tmp_path / "hf")
    ours = bt.make_translator(f"ckpt:{tiny['ckpt']}", _options()).translate(texts, seed=0)
    theirs = bt.make_translator(f"hf:{tmp_path / 'hf'}", _options()).translate(texts, seed=0)
    assert theirs == ours and len(set(ours)) > 1
    # told no target language, the export starts from its pre-training start (pad for mT5)
    plain = bt.TranslatorOptions(max_len_a=0.0, max_len_b=6)
    assert bt.make_translator(f"hf:{tmp_path / 'hf'}", plain).translate(texts, seed=0) != ours


def test_ckpt_backend_refusals_are_one_line(tiny, tmp_path: Path):
    with pytest.raises(ValueError, match=r"needs --to"):
        bt.make_translator(f"ckpt:{tiny['ckpt']}", bt.TranslatorOptions())
    with pytest.raises(ValueError, match=r"has no <lang:xx>"):
        bt.make_translator(f"ckpt:{tiny['ckpt']}", bt.TranslatorOptions(target="xx"))
    with pytest.raises(ValueError, match=r"^--translator 'ckpt:.*': checkpoint .* not a directory"):
        bt.make_translator(f"ckpt:{tmp_path / 'none'}", _options())


def test_the_stage_writes_synthetic_pairs_from_a_checkpoint(tiny, tmp_path: Path):
    from checkpoints_tools.testing import sample_lines
    from data_pipeline.cli import main

    mono = tmp_path / "en.txt"
    mono.write_text("\n".join(sample_lines("en", count=6)) + "\n", encoding="utf-8")
    out = tmp_path / "bt"
    code = main(
        ["backtranslate", "--translator", f"ckpt:{tiny['ckpt']}", "--tokenizer", str(tiny["tok"]),
         "--input", f"en={mono}", "--to", "es", "--out", str(out), "--max-len-b", "6",
         "--keep-text", "--quiet"]
    )  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (pair,) = manifest["pairs"].values()
    assert pair["synthetic"] is True
    assert pair["provenance"]["backend"] == "ckpt:run/step_5"
    assert pair["provenance"]["backend_settings"]["target"] == "es"
    documents = pair["documents"] + sum(pair.get("rejected", {}).values())
    assert documents == 6
    rows = (out / "text").glob("*.tsv")
    lines = [line for path in rows for line in path.read_text().splitlines()]
    translations = dict(line.split("\t") for line in lines)
    for source, translation in translations.items():
        assert translation == _expected(tiny, [source])[0]
