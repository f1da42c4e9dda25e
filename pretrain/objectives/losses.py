"""CLM and MLM cross-entropy, chunked over tokens so that whole-batch logits never exist.

Each chunk of at most ``chunk_tokens`` tokens runs output projection + fp32 cross-entropy under
non-reentrant activation checkpointing: the forward keeps only the chunk's inputs (the logits
are freed as soon as the chunk's summed loss is known) and the backward recomputes one chunk's
logits at a time. With a 250k vocabulary a 4096-token chunk holds 4 GB of fp32 logits, against
the whole batch's N * V * 4 bytes unchunked. The result equals the unchunked loss up to float
summation order.

Shape legend:
    B batch, T sequence, N tokens, D model width, V vocabulary, C tokens in a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
"""Label of positions that carry no loss (MLM: every unmasked position)."""


def _chunk_loss_sum(
    hidden_CD: torch.Tensor,
    labels_C: torch.Tensor,
    weight_VD: torch.Tensor,
    bias_V: torch.Tensor | None,
    onehot_CG: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chunk's summed loss, or its ``[G]`` sums per group given the groups one-hot."""
    logits_CV = F.linear(hidden_CD, weight_VD, bias_V).float()
    if onehot_CG is None:
        return F.cross_entropy(logits_CV, labels_C, ignore_index=IGNORE_INDEX, reduction="sum")
    loss_C = F.cross_entropy(logits_CV, labels_C, ignore_index=IGNORE_INDEX, reduction="none")
    # A matrix product, not index_add_: deterministic on CUDA and no host sync.
    return loss_C @ onehot_CG


def chunked_cross_entropy(
    hidden_ND: torch.Tensor,
    labels_N: torch.Tensor,
    weight_VD: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    reduction: str = "mean",
    group_N: torch.Tensor | None = None,
    num_groups: int = 0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden_ND @ weight_VD.T + bias_V`` against ``labels_N``, by chunks.

    Args:
        hidden_ND: hidden states entering the output projection.
        labels_N: target ids; ``IGNORE_INDEX`` positions add nothing.
        weight_VD: output projection (the tied embedding or ``output.weight``).
        bias_V: optional output bias (XLM-R).
        chunk_tokens: tokens per chunk (bounds the logits held at once).
        reduction: "mean" over non-ignored positions (0 if there are none) or "sum".
        group_N, num_groups: with a group index in ``[0, num_groups)`` per position, the loss
            sums per group (``reduction`` must be "sum"): one pass over the tokens whatever the
            number of groups, and no host sync (the trainer's loss per language).

    Returns:
        Scalar fp32 loss, or the ``[num_groups]`` fp32 sums when ``group_N`` is given.

    Raises:
        ValueError: ``chunk_tokens`` < 1, an unknown ``reduction``, or groups without "sum".
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction ({reduction!r}) must be one of mean, sum")
    if group_N is not None and (reduction != "sum" or num_groups < 1):
        raise ValueError(
            f"group_N needs reduction='sum' ({reduction!r}) and num_groups >= 1 ({num_groups})"
        )
    groups_G = None if group_N is None else torch.arange(num_groups, device=group_N.device)
    total = hidden_ND.new_zeros((num_groups,) if groups_G is not None else (), dtype=torch.float32)
    for start in range(0, hidden_ND.shape[0], chunk_tokens):
        end = start + chunk_tokens
        chunk_args = (hidden_ND[start:end], labels_N[start:end], weight_VD, bias_V)
        if groups_G is not None:
            chunk_args += ((group_N[start:end, None] == groups_G).float(),)
        if torch.is_grad_enabled():
            chunk = checkpoint(_chunk_loss_sum, *chunk_args, use_reentrant=False)
        else:
            chunk = _chunk_loss_sum(*chunk_args)
        total = total + chunk
    if reduction == "sum":
        return total
    # A device-side count: no host sync, and 0 / 1 = 0 for a batch without targets.
    count = (labels_N != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def clm_loss(
    hidden_BTD: torch.Tensor,
    tokens_BT: torch.Tensor,
    weight_VD: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    shift: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Causal-LM loss: position t predicts token t + 1.

    Args:
        hidden_BTD: ``model(tokens_BT, return_hidden=True)``.
        tokens_BT: the input tokens (``shift=True``) or already-shifted targets
            (``shift=False``); ``IGNORE_INDEX`` marks targets without loss (e.g. padding or
            the first token of a packed document).
        weight_VD, bias_V: the model's ``output_projection()``.
        chunk_tokens, reduction: see ``chunked_cross_entropy``.

    Returns:
        Scalar fp32 loss (mean over predicted tokens by default).
    """
    if shift:
        hidden_BTD = hidden_BTD[:, :-1]
        tokens_BT = tokens_BT[:, 1:]
    return chunked_cross_entropy(
        hidden_BTD.reshape(-1, hidden_BTD.shape[-1]),
        tokens_BT.reshape(-1),
        weight_VD,
        bias_V=bias_V,
        chunk_tokens=chunk_tokens,
        reduction=reduction,
    )


def mlm_loss(
    hidden_BTD: torch.Tensor,
    labels_BT: torch.Tensor,
    weight_VD: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    select_masked: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Masked-LM loss over the masked positions only.

    Args:
        hidden_BTD: ``model(tokens_BT, return_hidden=True)`` (after the MLM head transform).
        labels_BT: original ids at masked positions, ``IGNORE_INDEX`` elsewhere.
        weight_VD, bias_V: the model's ``output_projection()``.
        select_masked: gather the masked positions first so that only they are projected
            (about 15% of the tokens; costs one host sync for their count). False keeps static
            shapes and projects every position.
        chunk_tokens, reduction: see ``chunked_cross_entropy``.

    Returns:
        Scalar fp32 loss (mean over masked positions by default).
    """
    hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    labels_N = labels_BT.reshape(-1)
    if select_masked:
        masked_M = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)
        hidden_ND = hidden_ND[masked_M]
        labels_N = labels_N[masked_M]
    return chunked_cross_entropy(
        hidden_ND,
        labels_N,
        weight_VD,
        bias_V=bias_V,
        chunk_tokens=chunk_tokens,
        reduction=reduction,
    )
