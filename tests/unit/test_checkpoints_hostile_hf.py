"""import-hf on hostile transformers directories: malformed config.json, index and safetensors
headers are one line naming the file, exit 2, nothing written; nothing outside the directory
is read; no pickle is opened."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from checkpoints_tools.cli import main  # noqa: E402 - after the importorskip

XLMR = {"model_type": "xlm-roberta"}


def _safetensors(header: object, body: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


def _valid_weights() -> bytes:
    return _safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)


def _cases(tmp_path: Path) -> dict[str, tuple[dict[str, object], str]]:
    """name -> (files of the directory, what the error line must say)."""
    outside = tmp_path / "outside.safetensors"  # a valid file the index must not reach
    outside.write_bytes(_valid_weights())
    weights = {"model.safetensors": _valid_weights()}
    return {
        "config-not-json": (
            {"config.json": b"{not json", **weights},
            "config.json' is not valid JSON",
        ),
        "config-a-list": (
            {"config.json": [1, 2], **weights},
            "must be a JSON object with a model_type string",
        ),
        "model-type-a-list": (
            {"config.json": {"model_type": ["llama"]}, **weights},
            "must be a JSON object with a model_type string",
        ),
        "field-of-wrong-type": (
            {"config.json": {**XLMR, "hidden_size": "big"}, **weights},
            "config.json is not a valid xlm-roberta config (",
        ),
        "index-not-json": (
            {"config.json": XLMR, "model.safetensors.index.json": b"{x"},
            "model.safetensors.index.json' is not a JSON object",
        ),
        "index-without-weight-map": (
            {"config.json": XLMR, "model.safetensors.index.json": {"metadata": {}}},
            "has no weight_map of tensor name -> file name",
        ),
        "index-leaves-the-directory": (
            {
                "config.json": XLMR,
                "model.safetensors.index.json": {"weight_map": {"a": "../outside.safetensors"}},
            },
            "names file '../outside.safetensors': only files of its own directory are read",
        ),
        "header-a-list": (
            {"config.json": XLMR, "model.safetensors": _safetensors([1, 2])},
            "is not a safetensors file (header not a JSON object)",
        ),
        "entry-without-dtype": (
            {"config.json": XLMR, "model.safetensors": _safetensors({"a": {"shape": [1]}})},
            "tensor 'a' needs dtype, shape and data_offsets",
        ),
        "negative-shape": (
            {
                "config.json": XLMR,
                "model.safetensors": _safetensors(
                    {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}}
                ),
            },
            "tensor 'a' has shape [-1]",
        ),
        "offsets-not-a-pair": (
            {
                "config.json": XLMR,
                "model.safetensors": _safetensors(
                    {"a": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}
                ),
            },
            "tensor 'a' has data_offsets 'x'",
        ),
    }


def test_hostile_directories_are_one_line_exit_2_nothing_written(tmp_path: Path, capsys):
    for name, (files, message) in _cases(tmp_path).items():
        directory = tmp_path / name
        directory.mkdir()
        for file, content in files.items():
            data = content if isinstance(content, bytes) else json.dumps(content).encode()
            (directory / file).write_bytes(data)
        out = tmp_path / f"out_{name}"
        assert main(["import-hf", str(directory), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".out_{name}.*")), name


def test_a_pickle_only_directory_is_refused_unopened(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(XLMR))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened")
    assert main(["import-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "only safetensors weights are read" in capsys.readouterr().err
