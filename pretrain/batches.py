"""Loader batches onto the training device: the token ids' companions the model takes.

What to call: ``model_inputs(batch, model_cfg, device)`` -> the keyword arguments of
``model(input_ids, **kwargs)`` (positions, document ids, language ids; for a batch with decoder
rows the decoder inputs and both sides' document ids) on ``device``; ``to_device(tensor,
device)`` for any batch tensor; ``target_side(batch)`` for the CPU tensors describing the
positions the labels sit on, ``batch_tokens(batch)`` for the positions a batch feeds the model.
Guarantees: only what the model takes is copied, each tensor once, from the CPU batch (which is
left as it is); on CUDA through pinned memory, so that the copy is queued like a kernel instead
of waiting for the stream (a copy from pageable memory is a hidden host sync that would stop
the host running ahead of the GPU).

A batch has decoder rows when it holds ``decoder_input_ids`` (the loader's ``seq2seq`` batches,
``data_pipeline.loader``): the model is then an encoder-decoder, ``model(input_ids,
decoder_tokens_BT=..., document_ids_BS=..., decoder_document_ids_BT=...)``, and the labels sit
on the decoder positions.
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.models.config import ModelConfig


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on ``device`` (pinned and non-blocking on CUDA: module docstring)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def model_inputs(
    batch: dict[str, Any], model_cfg: ModelConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """The batch's per-token model inputs beside the token ids, on ``device``: positions,
    document ids (``model.document_masking``), language ids (``model.num_languages``, and MoE
    expert load by language), segment ids (``model.type_vocab_size``).

    Padding (TLM rows) is masked whatever ``model.document_masking`` says: without document
    masking a padded batch still gets document ids, 0 on every token and -1 on padding, so real
    tokens attend to the whole row but never to padding. (The check reads the CPU batch: no
    device sync.)

    A batch with decoder rows gives ``decoder_tokens_BT``, ``document_ids_BS`` and
    ``decoder_document_ids_BT`` (module docstring) and nothing else.
    """
    if "decoder_input_ids" in batch:
        # Both sides' document ids always: they mask padding and pair each packed source
        # with its target (cross-attention), whatever model.document_masking says.
        wanted = {
            "decoder_input_ids": "decoder_tokens_BT",
            "doc_ids": "document_ids_BS",
            "decoder_doc_ids": "decoder_document_ids_BT",
        }
        return {arg: to_device(batch[key], device) for key, arg in wanted.items()}
    wanted = {"position_ids": "position_ids_BT"}
    if model_cfg.document_masking:
        wanted["doc_ids"] = "document_ids_BT"
    if model_cfg.num_languages or model_cfg.moe.num_experts:
        wanted["lang_ids"] = "lang_ids_BT"
    if model_cfg.type_vocab_size:
        wanted["token_type_ids"] = "token_type_ids_BT"
    kwargs = {
        arg: to_device(batch[key], device)
        for key, arg in wanted.items()
        if batch.get(key) is not None
    }
    pad_mask = batch.get("attention_mask")
    if "document_ids_BT" not in kwargs and pad_mask is not None and not bool(pad_mask.all()):
        kwargs["document_ids_BT"] = to_device(
            torch.where(pad_mask.bool(), 0, -1).to(torch.int32), device
        )
    return kwargs


def target_side(
    batch: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(lang_ids_BT, tokens_mask_BT, pair_rows_B)``: the CPU tensors of the positions the
    labels sit on (the decoder side of a batch with decoder rows, whose ``pair_rows`` marks its
    translation rows; else the input side, and None: pair rows are told by their languages)."""
    if "decoder_input_ids" in batch:
        return batch["decoder_lang_ids"], batch["decoder_attention_mask"], batch["pair_rows"]
    return batch["lang_ids"], batch["attention_mask"], None


def batch_tokens(batch: dict[str, Any]) -> int:
    """Positions a batch feeds the model, padding included: its input ids, plus its decoder
    inputs when it has decoder rows (throughput counts source and target tokens)."""
    tokens = int(batch["input_ids"].numel())
    if "decoder_input_ids" in batch:
        tokens += int(batch["decoder_input_ids"].numel())
    return tokens
