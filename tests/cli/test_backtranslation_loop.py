"""``launch.backtranslation_loop``: BLEU scored on the right pairs (a real translator's output
beats its mismatched-reference baseline), and the whole loop at a toy size (reverse model,
back-translation through our checkpoint, forward models on real vs real + synthetic pairs, one
result row each; no held-out reference among the back-translated text), through the claim script
``bench.claims.backtranslation``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import backtranslation_loop as loop
from tests.sample_data import SAMPLE, first_lines


def _held_out(count: int) -> list[tuple[str, str]]:
    lines = first_lines(SAMPLE / "parallel" / "en-es.valid.tsv.zst", count)
    return [tuple(line.split("\t", 1)) for line in lines]


def test_bleu_of_the_references_themselves_is_100_and_the_mismatch_is_lower():
    refs = [t for _, t in _held_out(30)]
    scores = loop.bleu(refs, refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["bleu_mismatched"] < 10.0
    with pytest.raises(ValueError, match=r"hypotheses \(2\) and references \(3\) must be as many"):
        loop.bleu(refs[:2], refs[:3])


@pytest.mark.skipif(not loop.apertium_available("eng-spa"), reason="apertium-eng-spa not installed")
def test_a_real_translator_beats_its_mismatched_baseline():
    from data_pipeline.backtranslate import TranslatorOptions, make_translator

    pairs = _held_out(40)
    apertium = make_translator("apertium:eng-spa", TranslatorOptions())
    outputs = apertium.translate([s for s, _ in pairs], seed=0)
    scores = loop.bleu(outputs, [t for _, t in pairs])
    assert scores["bleu"] > 10.0 > scores["bleu_mismatched"], scores


def test_the_loop_runs_at_a_toy_size_through_the_claim_script(tmp_path: Path, capsys):
    """``bench.claims.backtranslation`` runs the loop (two seeds, untagged and tagged BT through
    our reverse checkpoint and, where installed, apertium) and writes its table, JSON and PNG;
    only their shape is checked. A 2-step reverse model's output fails the length filters, so its
    arms are skipped with a note; apertium's pairs pass them and train forward models."""
    from bench.claims import backtranslation

    backends = ["ckpt"] + (["apertium:spa-eng"] if loop.apertium_available("spa-eng") else [])
    out = tmp_path / "claim"
    code = backtranslation.main(
        ["--out", str(out), "--steps", "2", "--seeds", "0", "1", "--", "--bt-docs", "6",
         "--eval", "4", "--vocab-size", "2000", "--sample-chars", "200000", "--backends",
         ",".join(backends)]
    )  # fmt: skip
    assert code == 0
    assert (out / "backtranslation.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result = json.loads((out / "backtranslation.json").read_text())
    assert result == json.loads((out / "loop" / "result.json").read_text()) | {
        "summary": result["summary"]
    }
    rows = result["backends"]
    assert [(b["backend"], b["tagged"]) for b in rows] == [
        (spec, tagged) for spec in backends for tagged in (False, True)
    ]
    for backend in rows:
        assert backend["documents"] == 6 and backend["tokens_per_s"] > 0
        assert backend["kept"] + sum(backend["rejected"].values()) == 6
    labels = [spec.split(":")[0] + tag for spec in backends for tag in ("", "+tag")]
    trained = [label for label, b in zip(labels, rows) if b["kept"]]
    skipped = [label for label, b in zip(labels, rows) if not b["kept"]]
    assert [n.split(":")[0] for n in result["notes"]] == skipped
    if "apertium:spa-eng" in backends:
        assert trained == ["apertium", "apertium+tag"]
    arms = ["real", *trained]
    assert [(m["synthetic"], m["seed"]) for m in result["models"]] == [
        (arm, seed) for seed in (0, 1) for arm in arms
    ]
    for model in result["models"]:
        assert {"bleu", "bleu_mismatched", "chrf", "valid_loss"} <= model.keys()
        assert 0.0 <= model["bleu"] <= 100.0
    assert [row["arm"] for row in result["summary"]] == arms
    assert all(row["seeds"] == [0, 1] for row in result["summary"])
    assert "| real |" in capsys.readouterr().out
    # the back-translated text holds no target of a held-out (or training) pair
    mono = (out / "loop" / "mono_es.txt").read_text(encoding="utf-8").splitlines()
    references = {t for _, t in _held_out(300)}
    assert len(mono) == 6 and not references & set(mono)
    for arm in trained:  # the forward models on real + synthetic pairs read the synthetic set
        manifest = json.loads((out / "loop" / f"shards_{arm}" / "manifest.json").read_text())
        assert manifest["pairs"]["en-es+synthetic"]["synthetic"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pair", "en"], "--pair ('en') must be SRC-TGT"),
        (["--backends", "hfx"], "--backends entry ('hfx') must be ckpt or a translator"),
        (["--eval", "1"], "--eval (1) must be >= 2"),
        (["--synthetic-ratio", "1"], "--synthetic-ratio (1.0) must be in (0, 1)"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        loop.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
