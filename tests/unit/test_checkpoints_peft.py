"""Adaptation readiness: an exported checkpoint of each family loads with AutoModel* and
AutoTokenizer, takes peft LoRA and prompt tuning, and a few fine-tuning steps lower the loss; LoRA
on the exported MT5 lowers a held-out translation loss below the base model's."""

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


def _pairs(split: str, count: int) -> list[tuple[str, str]]:
    from tests.sample_data import SAMPLE, first_lines

    lines = first_lines(SAMPLE / "parallel" / f"en-es.{split}.tsv.zst", count)
    return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]


def _translation_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """en -> es rows as our translation objective makes them: ``src </s>`` in, the target
    behind its ``<lang:es>`` decoder start out (labels end in ``</s>``)."""
    enc = tokenizer([s[:120] for s, _ in pairs], padding=True, return_tensors="pt")
    tgt = tokenizer([t[:120] for _, t in pairs], padding=True, return_tensors="pt")
    labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
    start = torch.full((len(pairs), 1), tokenizer.convert_tokens_to_ids("<lang:es>"))
    decoder_input_ids = torch.cat([start, tgt["input_ids"][:, :-1]], dim=1)
    return {
        **enc,
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": torch.cat([start > 0, tgt["attention_mask"][:, :-1] > 0], 1),
    }


def test_lora_on_the_exported_mt5_lowers_held_out_translation_loss(tmp_path: Path):
    """LoRA (q and v of every attention, both stacks) on the MT5 export of a tiny encoder-decoder,
    fine-tuned on en -> es sample pairs: its loss on held-out pairs (the sample's valid split,
    never trained on) is below the base model's on the same pairs, and only the LoRA matrices
    changed."""
    torch.manual_seed(0)
    from checkpoints_tools.testing import encdec_config

    tok = make_tokenizer(tmp_path)
    cfg = encdec_config(tokenizer=tok, run_dir=tmp_path / "run", max_seq_len=128)
    convert.export_hf(save_family_checkpoint(cfg), out=tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(model).__name__ == "MT5ForConditionalGeneration"
    train = _translation_batch(tokenizer, _pairs("train", 48))
    held_out = _translation_batch(tokenizer, _pairs("valid", 24))

    def held_out_loss(m) -> float:
        m.eval()
        with torch.no_grad():
            return float(m(**held_out).loss)

    base = held_out_loss(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"
    )
    wrapped = peft.get_peft_model(model, config)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q and v of self-attention in both stacks and of cross-attention: 2 matrices each
    attentions = cfg.model.num_layers + 2 * cfg.model.num_decoder_layers
    assert len(trainable) == 2 * 2 * attentions, sorted(trainable)
    _fine_tune(wrapped, train, steps=40)
    tuned = held_out_loss(wrapped)
    assert tuned < base - 0.5, (base, tuned)
    merged = wrapped.merge_and_unload()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed), changed
