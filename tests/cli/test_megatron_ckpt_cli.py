"""``python -m checkpoints_tools import-megatron``: a Megatron torch_dist checkpoint (written with
plain DCP by tests/unit/test_megatron_checkpoint.py's helpers) imported with the vocabulary
trimmed to a tokenizer's, resumed as the trainer does and exported with ``export-hf`` to the
source Llama's logits; a ``.metadata`` with a foreign global refused by the process with exit 2,
one line on stderr and nothing written."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints_tools.cli import main  # noqa: E402
from checkpoints_tools.dcp_io import open_checkpoint  # noqa: E402
from checkpoints_tools.megatron_import import read_dcp_metadata  # noqa: E402
from checkpoints_tools.testing import VOCAB, make_tokenizer  # noqa: E402
from tests.megatron_checkpoints import (  # noqa: E402
    OVERRIDES,
    llama,
    megatron_state,
    write_megatron,
)

REPO = Path(__file__).resolve().parents[2]
PADDED = 2560  # VOCAB (2500) padded to a multiple of 128, as Megatron does
NOT_VOCAB = [o for o in OVERRIDES if not o.startswith("model.vocab_size")]


def test_import_trims_to_tokenizer_resumes_and_exports(tmp_path: Path, capsys):
    from pretrain.checkpoint import CheckpointManager, TrainState
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, build_scheduler

    tok = make_tokenizer(tmp_path)
    reference = llama(tied=False, vocab=VOCAB)
    run = write_megatron(
        tmp_path / "megatron", megatron_state(reference, stacked=True, te=True, padded=PADDED)
    )
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    # overrides follow DIR (argparse takes the positionals together)
    argv = ["import-megatron", str(run), *NOT_VOCAB, "--out", str(ckpt), "--tokenizer", str(tok)]
    assert main(argv) == 0
    assert "stacked keys" in capsys.readouterr().out
    imported = open_checkpoint(ckpt)
    assert imported.model_cfg.vocab_size == VOCAB
    # what the trainer does on train.resume=<CKPT>: model, optimizer and scheduler load
    cfg = imported.cfg
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, device_type="cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    assert (
        CheckpointManager(tmp_path / "run", keep=1).load(
            ckpt, TrainState(model, optimizer, scheduler)
        )
        == {}
    )
    assert main(["export-hf", str(ckpt), "--out", str(hf_dir), "--tokenizer", str(tok)]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tokens_BT = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected_BTV = reference(input_ids=tokens_BT).logits
        ours_BTV = model.eval()(tokens_BT)
        theirs_BTV = exported.eval()(input_ids=tokens_BT).logits
    torch.testing.assert_close(ours_BTV, expected_BTV, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs_BTV, expected_BTV, atol=1e-5, rtol=0)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_global_in_metadata_exits_2(tmp_path: Path):
    run = write_megatron(tmp_path / "m", megatron_state(llama(tied=True), stacked=False, te=False))
    it = run / "iter_0000020"
    metadata = read_dcp_metadata(it)
    marker = tmp_path / "ran"
    metadata.storage_meta.modules = [_Evil(marker)]
    (it / ".metadata").write_bytes(pickle.dumps(metadata))
    out = tmp_path / "ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_tools",
            "import-megatron",
            str(run),
            *OVERRIDES,
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "posix.system" in lines[0] and "refusing to unpickle" in lines[0]
    assert not marker.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []
