"""Adaptation readiness: an exported checkpoint of each family loads with AutoModel* and
AutoTokenizer, takes peft LoRA and prompt tuning, and a few fine-tuning steps lower the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from checkpoints_tools import convert  # noqa: E402 - after the importorskip
from checkpoints_tools.testing import (  # noqa: E402
    family_config,
    make_tokenizer,
    sample_lines,
    save_family_checkpoint,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    tok = make_tokenizer(root)
    out = {}
    for family in ("decoder", "moe", "encoder"):
        cfg = family_config(family, tokenizer=tok, run_dir=root / family)
        out[family] = root / f"hf_{family}"
        convert.export_hf(save_family_checkpoint(cfg), out=out[family])
    return out


def _batch(tokenizer, *, family: str) -> dict[str, torch.Tensor]:
    texts = sample_lines("en", count=4) + sample_lines("de", count=4)
    enc = tokenizer([t[:80] for t in texts], padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    if family == "encoder":  # a masked-LM task: predict every 4th token
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, ::4] = True
        mask &= enc["attention_mask"].bool()
        labels[~mask] = -100
        enc["input_ids"] = enc["input_ids"].masked_fill(mask, tokenizer.mask_token_id)
    return {**enc, "labels": labels}


def _fine_tune(model, batch: dict[str, torch.Tensor], *, steps: int = 6) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("family", ["decoder", "moe", "encoder"])
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peft_fine_tuning_lowers_the_loss(exported, family: str, method: str):
    directory = exported[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    auto = (
        transformers.AutoModelForMaskedLM
        if family == "encoder"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(directory, dtype=torch.float32)
    task = "CAUSAL_LM" if family != "encoder" else None
    if method == "lora":
        targets = ["query", "value"] if family == "encoder" else ["q_proj", "v_proj"]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task)
    else:
        config = peft.PromptTuningConfig(
            num_virtual_tokens=4, task_type=task or "FEATURE_EXTRACTION"
        )
    wrapped = peft.get_peft_model(model, config)
    batch = _batch(tokenizer, family=family)
    if method == "prompt" and family == "encoder":
        # prompt tuning prepends virtual tokens; the masked-LM labels must cover them too
        pad = torch.full((batch["labels"].shape[0], 4), -100)
        batch["labels"] = torch.cat([pad, batch["labels"]], dim=1)
    losses = _fine_tune(wrapped, batch)
    assert losses[-1] < losses[0], losses
