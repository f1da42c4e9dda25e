"""Chunked CLM/MLM losses equal the unchunked ones (values and gradients) and never hold the
whole batch's logits.

Shape legend: B batch, T sequence, N tokens, D width, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.models import ModelConfig, build_model
from pretrain.objectives import IGNORE_INDEX, chunked_cross_entropy, clm_loss, mlm_loss

B, T, D, V = 3, 16, 16, 50


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden_BTD = torch.randn(B, T, D, generator=gen, requires_grad=True)
    weight_VD = torch.randn(V, D, generator=gen, requires_grad=True)
    bias_V = torch.randn(V, generator=gen, requires_grad=True)
    tokens_BT = torch.randint(0, V, (B, T), generator=gen)
    return hidden_BTD, weight_VD, bias_V, tokens_BT


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16, 1000])
def test_clm_chunked_equals_unchunked(chunk_tokens: int) -> None:
    hidden_BTD, weight_VD, bias_V, tokens_BT = _inputs()
    tokens_BT[0, 5] = IGNORE_INDEX
    logits_BTV = F.linear(hidden_BTD, weight_VD, bias_V)
    ref = F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, V), tokens_BT[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    ref_grads = _grads(ref, hidden_BTD, weight_VD, bias_V)
    loss = clm_loss(hidden_BTD, tokens_BT, weight_VD, bias_V=bias_V, chunk_tokens=chunk_tokens)
    grads = _grads(loss, hidden_BTD, weight_VD, bias_V)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_clm_unshifted_targets_and_sum_reduction() -> None:
    hidden_BTD, weight_VD, _, tokens_BT = _inputs(1)
    ref = F.cross_entropy(
        F.linear(hidden_BTD, weight_VD).reshape(-1, V), tokens_BT.reshape(-1), reduction="sum"
    )
    loss = clm_loss(hidden_BTD, tokens_BT, weight_VD, chunk_tokens=5, shift=False, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_group_sums_equal_per_group_losses_in_one_pass(chunk_tokens: int) -> None:
    hidden_BTD, weight_VD, bias_V, tokens_BT = _inputs(4)
    hidden_ND, labels_N = hidden_BTD.reshape(-1, D), tokens_BT.reshape(-1).clone()
    labels_N[::5] = IGNORE_INDEX
    group_N = torch.arange(labels_N.numel()) % 3  # group 3 of 4 never occurs
    sums_G = chunked_cross_entropy(
        hidden_ND,
        labels_N,
        weight_VD,
        bias_V=bias_V,
        chunk_tokens=chunk_tokens,
        reduction="sum",
        group_N=group_N,
        num_groups=4,
    )
    per_token = F.cross_entropy(
        F.linear(hidden_ND, weight_VD, bias_V),
        labels_N,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    want = torch.stack([per_token[group_N == g].sum() for g in range(4)])
    torch.testing.assert_close(sums_G, want, rtol=1e-6, atol=1e-5)
    assert sums_G[3] == 0
    # The gradient of the total equals that of the plain summed loss.
    got = _grads(sums_G.sum(), hidden_BTD, weight_VD, bias_V)
    for g, w in zip(got, _grads(per_token.sum(), hidden_BTD, weight_VD, bias_V), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group_N needs reduction='sum'"):
        chunked_cross_entropy(hidden_ND, labels_N, weight_VD, group_N=group_N, num_groups=4)


@pytest.mark.parametrize("select_masked", [True, False])
def test_mlm_counts_masked_positions_only(select_masked: bool) -> None:
    hidden_BTD, weight_VD, bias_V, tokens_BT = _inputs(2)
    gen = torch.Generator().manual_seed(3)
    masked_BT = torch.rand(B, T, generator=gen) < 0.2
    labels_BT = torch.where(masked_BT, tokens_BT, IGNORE_INDEX)
    logits_BTV = F.linear(hidden_BTD, weight_VD, bias_V)
    ref = F.cross_entropy(logits_BTV[masked_BT], tokens_BT[masked_BT])
    ref_grads = _grads(ref, hidden_BTD, weight_VD, bias_V)
    loss = mlm_loss(
        hidden_BTD,
        labels_BT,
        weight_VD,
        bias_V=bias_V,
        chunk_tokens=3,
        select_masked=select_masked,
    )
    grads = _grads(loss, hidden_BTD, weight_VD, bias_V)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Unmasked positions get no gradient at all.
    assert torch.all(grads[0][~masked_BT] == 0)


def test_no_targets_gives_zero_not_nan() -> None:
    hidden_BTD, weight_VD, _, _ = _inputs()
    labels_BT = torch.full((B, T), IGNORE_INDEX)
    loss = mlm_loss(hidden_BTD, labels_BT, weight_VD, select_masked=False)
    assert loss.item() == 0.0


class _LargestOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_whole_batch_logits_are_never_materialised() -> None:
    hidden_BTD, weight_VD, bias_V, tokens_BT = _inputs()
    chunk = 4
    with _LargestOutput() as mode:
        loss = chunked_cross_entropy(
            hidden_BTD.reshape(-1, D),
            tokens_BT.reshape(-1),
            weight_VD,
            bias_V=bias_V,
            chunk_tokens=chunk,
        )
        loss.backward()
    # Logits of one chunk (and V x D weight grads) at most; the whole batch would be B*T*V.
    assert mode.largest <= max(chunk * V, V * D, B * T * D) < B * T * V


def test_losses_from_model_hidden_states() -> None:
    cfg = ModelConfig(
        vocab_size=V, hidden_size=D, num_layers=1, num_heads=2, ffn_hidden_size=32, max_seq_len=T
    )
    model = build_model(cfg)
    model.init_weights(0)
    tokens_BT = _inputs()[3]
    weight_VD, bias_V = model.output_projection()
    hidden_BTD = model(tokens_BT, return_hidden=True)
    loss = clm_loss(hidden_BTD, tokens_BT, weight_VD, bias_V=bias_V, chunk_tokens=5)
    ref = F.cross_entropy(model(tokens_BT)[:, :-1].reshape(-1, V), tokens_BT[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise() -> None:
    hidden_BTD, weight_VD, _, tokens_BT = _inputs()
    with pytest.raises(ValueError, match=r"^chunk_tokens \(0\) must be >= 1$"):
        clm_loss(hidden_BTD, tokens_BT, weight_VD, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"^reduction \('none'\) must be one of mean, sum$"):
        clm_loss(hidden_BTD, tokens_BT, weight_VD, reduction="none")
