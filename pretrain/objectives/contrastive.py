"""Contrastive sentence objectives, their losses: unsupervised SimCSE (Gao et al. 2021) and
cross-lingual translation ranking on parallel pairs (InfoXLM's XLCo with in-batch negatives,
LaBSE's bidirectional ranking), with the in-batch negatives gathered across data-parallel ranks.

What to call::

    emb_ND = pool(hidden_BTD, real_BT, mode="mean")                   # sentence embeddings
    loss = simcse_loss(view_a_ND, view_b_ND, temperature=0.05, group=dp_group)
    loss = translation_ranking_loss(src_ND, tgt_ND, temperature=0.05, group=dp_group)

Guarantees: each loss is summed (not averaged) over this rank's rows, so that the trainer can
normalise by the step's global row count like its token losses; the negatives of a row are the
other rows of the whole data-parallel batch: ``gather_rows`` all-gathers the embeddings with
autograd (``torch.distributed.nn.functional.all_gather``, whose backward sums each slot's
gradient back to its rank), so that the gradients summed over the ranks equal one process's on
the concatenated batch (tests/distributed/test_contrastive_dp.py); ranks may hold different
numbers of rows. The objectives that use them: ``simcse`` and ``xlco``
(``pretrain.objectives.registry.SentenceContrast``).

Shape legend: N this rank's rows, M the rows of the whole group, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import distributed as dist


def pool(hidden_BTD: torch.Tensor, real_BT: torch.Tensor, *, mode: str = "mean") -> torch.Tensor:
    """Sentence embeddings ``[B, D]``: the mean of the hidden states over the real tokens
    (``mean``: SimCSE's and LaBSE's retrieval use) or the first position's (``cls``).

    Raises:
        ValueError: an unknown mode, or a row without a real token (mean).
    """
    if mode == "cls":
        return hidden_BTD[:, 0]
    if mode != "mean":
        raise ValueError(f"pooling mode ({mode!r}) must be mean or cls")
    real = real_BT.to(hidden_BTD.dtype).unsqueeze(-1)
    count_B1 = real.sum(dim=1)
    if bool((count_B1 == 0).any()):
        raise ValueError("mean pooling: a row has no real token")
    return (hidden_BTD * real).sum(dim=1) / count_B1


class SentencePool(torch.nn.Module):
    """:func:`pool` (mean) as a module, ``forward(x_BTD, *, real_BT)``, so that a tensor-parallel
    plan can gather its input's sequence first (sequence parallel: ``pretrain.models
    .parallel_plan``). No parameters."""

    def forward(self, x_BTD: torch.Tensor, *, real_BT: torch.Tensor) -> torch.Tensor:
        return pool(x_BTD, real_BT)


def gather_rows(x_ND: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[
    torch.Tensor, int
]:  # fmt: skip
    """``(x_MD, offset)``: the rows of every rank of ``group`` in rank order (with autograd)
    and where this rank's rows start; ``(x_ND, 0)`` without a group of more than one rank.
    Ranks may hold different numbers of rows (rows mixed with other objectives'): each is
    padded to the largest count for the all-gather and the padding dropped after it."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x_ND, 0
    from torch.distributed.nn.functional import all_gather

    own = torch.tensor([x_ND.shape[0]], dtype=torch.int64, device=x_ND.device)
    sizes = [torch.zeros_like(own) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, own, group=group)
    counts = [int(size) for size in sizes]
    most = max(counts)
    padded = F.pad(x_ND, (0, 0, 0, most - x_ND.shape[0]))
    parts = all_gather(padded, group=group)
    rank = dist.get_rank(group)
    rows = torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0)
    return rows, sum(counts[:rank])


def _ranking(query_ND, keys_MD, offset: int, temperature: float):
    """``(summed loss, correct)``: the cross-entropy of each query's cosine similarities to
    every key over ``temperature``, its positive the key at its own row (``offset + i``), and
    how many queries score their positive first."""
    if query_ND.shape[0] == 0:  # no rows of this objective here: a zero with a graph
        zero = query_ND.sum() * 0.0 + keys_MD.sum() * 0.0
        return zero, zero.detach()
    q = F.normalize(query_ND.float(), dim=-1)
    k = F.normalize(keys_MD.float(), dim=-1)
    logits_NM = q @ k.T / temperature
    target_N = torch.arange(query_ND.shape[0], device=query_ND.device) + offset
    correct = (logits_NM.detach().argmax(dim=1) == target_N).float().sum()
    return F.cross_entropy(logits_NM, target_N, reduction="sum"), correct


def simcse_loss(
    view_a_ND: torch.Tensor,
    view_b_ND: torch.Tensor,
    *,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
    return_correct: bool = False,
):
    """Unsupervised SimCSE: two dropout views of the same rows; row i's positive is its
    other view, its negatives the other view of every other row of the group's batch
    (InfoNCE, cosine similarity over ``temperature``). Summed over this rank's rows; with
    ``return_correct`` also how many rows rank their other view first."""
    keys_MD, offset = gather_rows(view_b_ND, group)
    loss, correct = _ranking(view_a_ND, keys_MD, offset, temperature)
    return (loss, correct) if return_correct else loss


def translation_ranking_loss(
    src_ND: torch.Tensor,
    tgt_ND: torch.Tensor,
    *,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
    return_correct: bool = False,
):
    """Cross-lingual contrast on parallel pairs, both directions: each source ranks its
    translation among every target of the group's batch and each target its source among
    every source (InfoXLM's XLCo with in-batch negatives in place of its momentum queue;
    LaBSE's bidirectional translation ranking without its additive margin). Summed over
    this rank's pairs and both directions; with ``return_correct`` also how many sources
    rank their translation first."""
    tgt_MD, offset = gather_rows(tgt_ND, group)
    src_MD, _ = gather_rows(src_ND, group)
    forward, correct = _ranking(src_ND, tgt_MD, offset, temperature)
    loss = forward + _ranking(tgt_ND, src_MD, offset, temperature)[0]
    return (loss, correct) if return_correct else loss
