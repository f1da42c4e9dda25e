"""``python -m data_pipeline backtranslate`` as a process: one-line errors (exit 2, nothing
written), a SIGKILL in the middle then a rerun equal to an uninterrupted run, and the ``hf:``
backend on 2 torchrun processes equal to one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import backtranslate as bt
from data_pipeline.text_inputs import MonoInput
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer
from tests.sample_data import SAMPLE, first_lines

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bt_cli")
    mono = []
    for lang in ("en", "es"):
        path = root / f"{lang}.txt"
        path.write_text("\n".join(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 150)))
        mono.append(MonoInput(lang, (path,)))
    train_tokenizer(mono, vocab_size=600, out=root / "tok", num_sentinels=0, num_threads=1)
    (root / "es_mono.txt").write_text(
        "\n".join(first_lines(SAMPLE / "mono" / "es.train.txt.zst", 40)) + "\n"
    )
    return {"root": root, "tok": root / "tok", "es": root / "es_mono.txt"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline", "backtranslate", *args],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=timeout,
    )  # fmt: skip


def _base(corpus, out: Path) -> list[str]:
    return ["--tokenizer", str(corpus["tok"]), "--input", f"es={corpus['es']}", "--to", "en",
            "--out", str(out)]  # fmt: skip


def _tree(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".backtranslate" not in p.parts
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(corpus, tmp_path, capsys):
    from data_pipeline.cli import main

    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "marian"}')
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    proc = _cli("--translator", "nope:x", *_base(corpus, out))  # as a process: no traceback
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --translator 'nope:x': unknown backend 'nope' (known: apertium, hf, reverse)\n"
    )
    cases = [
        (["--translator", "reverse:", "--decode", "beam:x"],
         "error: --decode 'beam:x': beam:N needs a beam size N >= 1"),
        (["--translator", "reverse:", "--part", "2/2"],
         "error: --part '2/2' must be I/N with 0 <= I < N"),
        (["--translator", f"hf:{broken}", "--batch-tokens", "64"],
         "error: translator hf:broken_model failed in pair_en-es_00000: SafetensorError: "),
    ]  # fmt: skip
    if shutil.which("apertium"):
        cases.append(
            (["--translator", "apertium:spa-xxx"],
             "error: --translator 'apertium:spa-xxx': pair 'spa-xxx' is not installed")
        )  # fmt: skip
    for args, message in cases:
        capsys.readouterr()
        assert main(["backtranslate", *args, *_base(corpus, out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
        assert not (out / "manifest.json").exists() and not list(out.glob("pair_*"))


def test_a_killed_run_resumes_without_losing_or_duplicating_a_document(corpus, tmp_path):
    reference = tmp_path / "reference"
    settings = bt.BTSettings(shard_docs=4, batch_tokens=10_000)
    bt.run_backtranslate(
        [bt.BTInput("es", paths=(corpus["es"],))], translator=bt.make_translator("reverse:"),
        tokenizer=corpus["tok"], to="en", out=reference, settings=settings, log=print,
    )  # fmt: skip
    out = tmp_path / "out"
    args = ["--translator", "reverse:sleep=0.4", *_base(corpus, out), "--shard-docs", "4",
            "--batch-tokens", "10000"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline", "backtranslate", *args],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    records = out / ".backtranslate"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finished = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 3 <= len(finished) < 10 and not (out / "manifest.json").exists()
    again = _cli(*args, timeout=180)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("kept (finished earlier)") == len(finished)
    assert {n: (records / n).stat().st_mtime_ns for n in finished} == finished
    assert _tree(out) == _tree(reference)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["pairs"]["en-es"]
    assert stats["documents"] + sum(stats["rejected"].values()) == 40


def _tiny_marian(corpus, out: Path) -> None:
    import torch
    from transformers import MarianConfig, MarianMTModel

    from checkpoints_tools.hf_tokenizer import save_tokenizer

    tok = load_tokenizer(corpus["tok"])
    save_tokenizer(tok, out, family="encoder")
    torch.manual_seed(0)
    ids = tok.special_ids
    config = MarianConfig(
        vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=512, init_std=0.5, pad_token_id=ids["pad"],
        eos_token_id=ids["eos"], bos_token_id=ids["bos"], decoder_start_token_id=ids["pad"],
    )  # fmt: skip
    MarianMTModel(config).eval().save_pretrained(out)


@pytest.mark.slow
def test_hf_on_two_torchrun_processes_equals_one_process(corpus, tmp_path):
    model = tmp_path / "marian"
    _tiny_marian(corpus, model)
    common = ["--translator", f"hf:{model}", "--shard-docs", "5", "--max-len-b", "40",
              "--decode", "sample:top_k=20", "--seed", "3", "--keep-text", "--quiet"]  # fmt: skip
    one = _cli(*common, *_base(corpus, tmp_path / "one"), timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "data_pipeline", "backtranslate", *common,
         *_base(corpus, tmp_path / "two")],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
    records = [json.loads(p.read_text()) for p in (tmp_path / "two/.backtranslate").glob("*.json")]
    assert len(records) == 8
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    prov = manifest["pairs"]["en-es"]["provenance"]
    assert prov["decode"] == {"mode": "sample", "top_k": 20, "top_p": 1.0, "temperature": 1.0}
    assert prov["seed"] == 3 and len(prov["backend_settings"]["model_sha256"]) == 64
