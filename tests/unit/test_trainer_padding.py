"""Padding of TLM rows is masked whatever ``model.document_masking`` says: the model inputs the
trainer builds from a padded batch (``pretrain.batches.model_inputs``) keep every real token's
output independent of the padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.batches import model_inputs
from pretrain.config import load_config
from pretrain.models import build_model

REPO = Path(__file__).resolve().parents[2]


def _batch(pad_token: int) -> dict[str, torch.Tensor]:
    """Two TLM-like rows of 16: pairs (src, tgt) with their own positions and languages; row 0
    ends with 5 padding positions holding ``pad_token``."""
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 100, (2, 16), generator=gen, dtype=torch.int32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 11:] = False
    input_ids[0, 11:] = pad_token
    doc_ids = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 5, [0] * 8 + [1] * 8], dtype=torch.int32)
    row0 = [0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 0, 0, 0, 0, 0]
    row1 = [*range(4), *range(4), *range(5), 0, 1, 2]
    positions = torch.tensor([row0, row1], dtype=torch.int32)
    lang_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0], [0] * 4 + [1] * 12],
                            dtype=torch.int32)  # fmt: skip
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "doc_ids": doc_ids,
        "position_ids": positions,
        "lang_ids": lang_ids,
    }


@pytest.mark.parametrize("document_masking", [False, True])
def test_tlm_padding_never_changes_real_token_outputs(document_masking: bool) -> None:
    cfg = load_config(
        REPO / "configs" / "tiny_encoder.yaml",
        [f"model.document_masking={str(document_masking).lower()}", "model.num_languages=2",
         "model.dropout=0.0", "train.run_dir=unused"],
    )  # fmt: skip
    model = build_model(cfg.model)
    model.init_weights(0)
    model.eval()
    outputs = []
    for pad_token in (1, 77):
        batch = _batch(pad_token)
        kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
        assert "document_ids_BT" in kwargs
        with torch.no_grad():
            outputs.append(model(batch["input_ids"], **kwargs))
    real = _batch(1)["attention_mask"]
    torch.testing.assert_close(outputs[0][real], outputs[1][real], rtol=0, atol=1e-6)
    # Without the mask the padding's ids would reach the real tokens.
    with torch.no_grad():
        leaky = [
            model(_batch(p)["input_ids"], position_ids_BT=_batch(p)["position_ids"])[real]
            for p in (1, 77)
        ]
    assert (leaky[0] - leaky[1]).abs().max() > 1e-3


def test_unpadded_batch_without_document_masking_gets_no_mask() -> None:
    # CLM rows have no padding: attention stays SDPA's own causal kernel.
    cfg = load_config(REPO / "configs" / "tiny_decoder.yaml",
                      ["model.document_masking=false", "train.run_dir=unused"])  # fmt: skip
    batch = _batch(1)
    batch["attention_mask"] = torch.ones(2, 16, dtype=torch.bool)
    assert set(model_inputs(batch, cfg.model, torch.device("cpu"))) == {"position_ids_BT"}
