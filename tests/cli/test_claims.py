"""The claim scripts (``bench/claims``) at a toy size: two sample languages (el, ja) and the en-ja
pairs, a few steps, one seed. Only the shape of the output is checked (JSON keys, one row per
language / arm / pair set / method, a PNG written); the figures belong to BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.claims.common import sample_corpus

pytestmark = pytest.mark.slow
LANGS = ("el", "ja")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sample's el and ja text and en-ja pairs: tokenizer, train and held-out shards."""
    return sample_corpus(tmp_path_factory.mktemp("claims") / "data", LANGS, pairs=("en-ja",))


def _outputs(out: Path, name: str) -> dict:
    assert (out / f"{name}.png").read_bytes().startswith(PNG)
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def test_alpha_one_row_per_language(corpus, tmp_path: Path, capsys):
    from bench.claims import alpha

    argv = ["--shards", str(corpus["shards"]), "--valid", str(corpus["valid"]), "--tokenizer",
            str(corpus["tok"]), "--steps", "3", "--eval-batches", "1", "--seeds", "0", "--json",
            "--out", str(tmp_path)]  # fmt: skip
    assert alpha.main(argv) == 0
    result = _outputs(tmp_path, "alpha")
    assert json.loads(capsys.readouterr().out) == result
    assert {"languages", "steps", "tokens_per_run", "seeds", "seconds_per_run"} <= result.keys()
    assert sorted(r["lang"] for r in result["languages"]) == list(LANGS)
    for row in result["languages"]:
        for key in ("q", "p_alpha_0.3", "p_alpha_1.0", "loss_alpha_0.3", "loss_alpha_1.0"):
            assert isinstance(row[key], float), (key, row)


def test_moe_one_run_per_arm(corpus, tmp_path: Path):
    from bench.claims import moe

    argv = ["--shards", str(corpus["shards"]), "--valid", str(corpus["valid"]), "--steps", "3",
            "--seeds", "0", "--out", str(tmp_path)]  # fmt: skip
    assert moe.main(argv) == 0
    result = _outputs(tmp_path, "moe")
    assert list(result["arms"]) == ["dense", "switch top-1", "gshard top-2"]
    for runs in result["arms"].values():
        assert len(runs) == 1
        assert {"seed", "steps", "loss", "seconds", "valid_loss", "load_by_lang"} <= runs[0].keys()
        assert runs[0]["steps"][-1] == 3
    assert [row["arm"] for row in result["summary"]] == list(result["arms"])


def test_tlm_one_row_per_pair_set(corpus, tmp_path: Path):
    from bench.claims import tlm

    argv = ["--data", str(corpus["shards"].parent), "--langs", "en", "ja", "--steps", "3",
            "--seeds", "0", "--pairs", "8", "--out", str(tmp_path)]  # fmt: skip
    assert tlm.main(argv) == 0
    result = _outputs(tmp_path, "tlm")
    assert list(result["pairs"]) == ["en-ja"]
    assert {arm: len(v) for arm, v in result["pairs"]["en-ja"].items()} == {"MLM": 1, "MLM+TLM": 1}
    assert result["pairs_per_set"] == {"en-ja": 8}


def test_adapt_one_row_per_model_and_method(corpus, tmp_path: Path):
    from bench.claims import adapt

    argv = ["--data", str(corpus["shards"].parent), "--langs", *LANGS, "--steps", "2",
            "--epochs", "1", "--per-lang", "8", "--test-per-lang", "4", "--transfer-train", "16",
            "--out", str(tmp_path)]  # fmt: skip
    assert adapt.main(argv) == 0
    result = _outputs(tmp_path, "adapt")
    rows = {(r["model"], r["method"]): r for r in result["rows"]}
    assert list(rows) == [(m, x) for m in ("encoder", "decoder") for x in adapt.METHODS]
    assert result["tasks"]["lid"]["labels"] == list(LANGS)
    assert set(result["tasks"]["transfer"]["test"]) == {"ja", "en"}
    for row in rows.values():
        if "fails" in row:
            assert isinstance(row["fails"], str) and row["fails"]
            continue
        assert 0 < row["trainable"] <= row["total"]
        assert set(row["lid_accuracy"]) == {"all"}
        assert set(row["transfer_accuracy"]) == {"ja", "en"}
        assert row["lid_seconds_per_epoch"] > 0
    assert rows[("encoder", "full")]["share"] == 1.0
    assert "fails" not in rows[("encoder", "lora")]


def test_electra_one_run_per_arm(corpus, tmp_path: Path):
    from bench.claims import electra

    argv = ["--data", str(corpus["shards"].parent), "--langs", "en", "ja", "--steps", "3",
            "--seeds", "0", "--pairs", "8", "--probe-train", "4", "--probe-test", "4",
            "--out", str(tmp_path)]  # fmt: skip
    assert electra.main(argv) == 0
    result = _outputs(tmp_path, "electra")
    assert list(result["runs"]) == list(electra.ARMS)
    classes = {arm: runs[0]["model_class"] for arm, runs in result["runs"].items()}
    assert classes == {"MLM": "XLMRobertaModel", "ELECTRA": "ElectraModel",
                       "MLM (equal time)": "XLMRobertaModel"}  # fmt: skip
    for runs in result["runs"].values():
        assert len(runs) == 1 and set(runs[0]["retrieval"]) == {"en-ja"}
        assert 0.0 <= runs[0]["lid_accuracy"] <= 1.0 and runs[0]["seconds"] > 0
    assert result["runs"]["ELECTRA"][0]["steps"] == 3


def test_encdec_one_run_per_arm(corpus, tmp_path: Path):
    from bench.claims import encdec

    argv = ["--data", str(corpus["shards"].parent), "--langs", "en", "ja", "--steps", "3",
            "--finetune-steps", "2", "--seeds", "0", "--pairs", "8",
            "--out", str(tmp_path)]  # fmt: skip
    assert encdec.main(argv) == 0
    result = _outputs(tmp_path, "encdec")
    assert list(result["runs"]) == list(encdec.ARMS) and result["pair_sets"] == ["en-ja"]
    for runs in result["runs"].values():
        assert len(runs) == 1
        assert runs[0]["held_out_before"] > 0 and runs[0]["held_out_after"] > 0
    # equal raw tokens: the arm with the shorter rows takes more steps
    raw = result["raw_tokens_per_row"]
    steps = {arm: runs[0]["steps"] for arm, runs in result["runs"].items()}
    assert (raw["prefix LM"] < raw["span corruption"]) == (
        steps["prefix LM"] >= steps["span corruption"]
    )
