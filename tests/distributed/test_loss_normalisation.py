"""One loss normalisation for every layout: the trainer's gradient (before clipping) equals one
process's on the concatenated global batch, whatever the split into accumulation micro-batches,
dp ranks (FSDP2, DDP), tensor-parallel shards and pipeline microbatches, when the parts hold
different numbers of targets (MLM masks, TLM padding).

The data: a global batch of four parts of ``ROWS`` encoder rows (two MLM rows with a mask rate
of their own, two padded TLM rows of two languages each); each part predicts a different number
of tokens. The reference is one process on the whole batch, checked against the formula
``sum_i n_i g_i / N`` (``g_i``: part i's per-token-mean gradient, ``n_i`` its targets) and shown
to differ from the old per-part mean ``mean_i g_i`` by far more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from pretrain.config import load_config
from tests.sample_data import REPO

ROWS = 4
SEQ = 16
VOCAB = 2000
MASK_RATES = (0.1, 0.6, 0.3, 0.8)  # per part: unequal target counts
ATOL = 1e-6


def _part(index: int) -> dict[str, torch.Tensor]:
    """Part ``index`` of the global batch: rows 0-1 MLM (one language each), rows 2-3 TLM
    (source and target language, then padding), as the loader would hand them."""
    gen = torch.Generator().manual_seed(100 + index)
    input_ids = torch.randint(5, VOCAB, (ROWS, SEQ), generator=gen, dtype=torch.int32)
    lang_ids = torch.zeros(ROWS, SEQ, dtype=torch.int32)
    positions = torch.arange(SEQ, dtype=torch.int32).repeat(ROWS, 1)
    doc_ids = torch.zeros(ROWS, SEQ, dtype=torch.int32)
    mask = torch.ones(ROWS, SEQ, dtype=torch.bool)
    lang_ids[0], lang_ids[1] = index % 4, (index + 1) % 4
    for row, (src, tgt) in zip((2, 3), ((5, 6 + index), (4 + index, 3))):
        lang_ids[row, :src] = (index + 2) % 4
        lang_ids[row, src : src + tgt] = (index + 3) % 4
        positions[row, src:] = torch.arange(SEQ - src, dtype=torch.int32)
        positions[row, src + tgt :] = 0
        mask[row, src + tgt :] = False
        doc_ids[row, src + tgt :] = -1
        input_ids[row, src + tgt :] = 1  # the pad id
    predicted = (torch.rand(ROWS, SEQ, generator=gen) < MASK_RATES[index]) & mask
    predicted[:, 0] = True  # no row without a target
    labels = torch.where(predicted, input_ids, torch.full_like(input_ids, -100))
    input_ids = torch.where(predicted, torch.full_like(input_ids, 4), input_ids)  # <mask>
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "doc_ids": doc_ids,
        "lang_ids": lang_ids,
        "attention_mask": mask,
        "tokens_per_lang": torch.bincount(lang_ids[mask].long(), minlength=4),
    }


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "tokens_per_lang"}
    out["tokens_per_lang"] = sum(p["tokens_per_lang"] for p in parts)
    return out


def _cfg(shards, run_dir: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny_encoder.yaml",
        [
            f"data.manifest={shards['shards']}",
            f"train.run_dir={run_dir}",
            f"model.vocab_size={VOCAB}",
            "model.num_layers=2",
            "model.tie_embeddings=false",  # pipeline parallel splits them over stages
            f"data.seq_len={SEQ}",
            f"data.batch_size={ROWS}",
            "train.deterministic=true",
            *extra,
        ],
    )


def _gradients(rank: int, world_size: int, cases: dict) -> dict:
    """Per case ``(config, [[part indices of micro-batch] per dp rank])``: one ``_step`` of a
    fresh trainer; the full gradients before clipping (this rank's stages), the step's loss."""
    from torch.distributed.tensor import DTensor

    import pretrain.trainer as trainer_module
    from pretrain.models.transformer import canonical_name

    clip = trainer_module.clip_grad_norm_
    seen: dict[str, torch.Tensor] = {}

    def capture(parts, *, max_norm, dims):
        for part in parts:
            for name, param in part.named_parameters():
                if param.grad is not None:
                    grad = param.grad
                    grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
                    seen[canonical_name(name)] = grad.detach().clone()
        return clip(parts, max_norm=max_norm, dims=dims)

    trainer_module.clip_grad_norm_ = capture
    out = {}
    try:
        for label, (cfg, plan) in cases.items():
            trainer = trainer_module.Trainer(cfg, rank=rank, world_size=world_size)
            # Only the gradient is under test: no update.
            for optimizer in trainer.optimizers:
                optimizer.step = lambda *args, **kwargs: None
            micro = [_cat([_part(i) for i in parts]) for parts in plan[trainer.dims.dp_rank]]
            seen.clear()
            try:
                result = trainer.train_step(micro)
            except Exception as error:
                raise RuntimeError(f"case {label}: {error}") from error
            trainer.settle(result)
            out[label] = {"grads": dict(seen), "loss": result["loss"]}
    finally:
        trainer_module.clip_grad_norm_ = clip
    return out


def _merged(per_rank: list[dict], label: str) -> dict[str, torch.Tensor]:
    grads = {}
    for result in per_rank:
        grads.update(result[label]["grads"])
    return grads


def _assert_grads_close(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys(), label
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=ATOL,
                                   msg=lambda m, n=name: f"{label} {n}: {m}")  # fmt: skip


def _distance(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_every_layout_gives_the_global_batch_gradient(shards, tmp_path: Path):
    parts = [_part(i) for i in range(4)]
    counts = [int((p["labels"] != -100).sum()) for p in parts]
    assert len(set(counts)) == 4, counts  # unequal targets per micro-batch and per rank
    total = sum(counts)

    one = {
        "whole": (_cfg(shards, tmp_path / "a"), [[[0, 1, 2, 3]]]),
        "accum4": (_cfg(shards, tmp_path / "b"), [[[0], [1], [2], [3]]]),
        **{f"part{i}": (_cfg(shards, tmp_path / f"p{i}"), [[[i]]]) for i in range(4)},
    }
    ref = run_distributed(_gradients, world_size=1, args=(one,), timeout_s=240)[0]
    whole = ref["whole"]["grads"]
    # The reference is the formula: the target-weighted sum of the per-part mean gradients.
    part_grads = [ref[f"part{i}"]["grads"] for i in range(4)]
    formula = {n: sum(c * g[n] for c, g in zip(counts, part_grads)) / total for n in whole}
    _assert_grads_close(whole, formula, "formula")
    # The old rule (each micro-batch's own mean, averaged) is far from it on this data.
    old = {n: sum(g[n] for g in part_grads) / 4 for n in whole}
    assert _distance(old, whole) > 100 * ATOL, _distance(old, whole)
    part_losses = [ref[f"part{i}"]["loss"] for i in range(4)]
    step_loss = sum(c * loss for c, loss in zip(counts, part_losses)) / total
    assert ref["whole"]["loss"] == pytest.approx(step_loss, rel=1e-6)
    _assert_grads_close(ref["accum4"]["grads"], whole, "grad_accum 4")
    assert ref["accum4"]["loss"] == pytest.approx(step_loss, rel=1e-6)

    # Two ranks: dp 2 (FSDP2 and DDP) x grad_accum 2, tp 2 and pp 2 x grad_accum 4.
    per_dp = [[[0], [1]], [[2], [3]]]
    pp2 = ("parallel.pp=2", "parallel.microbatches=2")
    four = [[[0], [1], [2], [3]]]
    two = {
        "fsdp2": (_cfg(shards, tmp_path / "f"), per_dp),
        "ddp2": (
            _cfg(shards, tmp_path / "d", "parallel.dp_replicate=2", "parallel.dp_shard=1"),
            per_dp,
        ),
        "tp2": (_cfg(shards, tmp_path / "t", "parallel.tp=2"), four),
        "pp2": (_cfg(shards, tmp_path / "pp", *pp2), four),
    }
    # Four ranks: the compositions, pp 2 x tp 2 and pp 2 x dp 2 (FSDP2) x grad_accum 2.
    four_ranks = {
        "pp2 tp2": (_cfg(shards, tmp_path / "pt", *pp2, "parallel.tp=2"), four),
        "pp2 fsdp2": (_cfg(shards, tmp_path / "pf", *pp2), per_dp),
    }
    for world_size, cases in ((2, two), (4, four_ranks)):
        results = run_distributed(_gradients, world_size=world_size, args=(cases,), timeout_s=300)
        for label in cases:
            _assert_grads_close(_merged(results, label), whole, label)
            for rank, result in enumerate(results):
                assert result[label]["loss"] == pytest.approx(step_loss, rel=1e-5), (label, rank)
