"""MoE layer: grouped matmul, routing, capacity dropping, auxiliary losses, determinism.

Shape legend: B batch, T sequence, N tokens, D width, E experts, F expert width, K top-k,
M grouped rows.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.blocks import AttentionInputs, Block
from pretrain.models.config import ModelConfig, MoEConfig
from pretrain.models.moe import MoE, expert_capacity, grouped_mm

D, F_EXPERT, E = 16, 32, 4
BASE = ModelConfig(
    vocab_size=64,
    hidden_size=D,
    num_layers=2,
    num_heads=2,
    ffn_hidden_size=F_EXPERT,
    max_seq_len=32,
    init_std=0.2,
    moe=MoEConfig(num_experts=E, top_k=2, router="gshard", dropless=True),
)


def _moe(cfg: ModelConfig = BASE, *, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return moe


def _x(batch: int = 2, seq: int = 8, *, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, D, generator=gen, requires_grad=True)


def _reference(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the grouped path must reproduce."""
    x_ND = x_BTD.reshape(-1, D)
    probs_NE = (x_ND @ moe.router.gate.weight.T).softmax(-1)
    gates_NK, experts_NK = probs_NE.topk(moe.top_k, dim=-1)
    if moe.router.normalize:
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True)
    ex = moe.experts
    rows = []
    for n in range(x_ND.shape[0]):
        acc_D = torch.zeros(D)
        for slot in range(moe.top_k):
            e = int(experts_NK[n, slot])
            h_F = x_ND[n] @ ex.w1[e].T
            if ex.b1 is not None:
                h_F = h_F + ex.b1[e]
            h_F = F.silu(h_F) * (x_ND[n] @ ex.w3[e].T) if ex.w3 is not None else F.gelu(h_F)
            y_D = h_F @ ex.w2[e].T
            if ex.b2 is not None:
                y_D = y_D + ex.b2[e]
            acc_D = acc_D + gates_NK[n, slot] * y_D
        rows.append(acc_D)
    return torch.stack(rows).view_as(x_BTD)


def _dense_grad_loss(y: torch.Tensor, *, seed: int = 5) -> torch.Tensor:
    # A dense upstream gradient: torch._grouped_mm's fp32 backward rejects stride-0 grads.
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))).sum()


@pytest.mark.parametrize("width", [16, 6])  # 6: misaligned for _grouped_mm -> segment fallback
def test_grouped_mm_equals_per_expert_products(width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 5, 2]  # an expert with no rows too
    x_MD = torch.randn(sum(sizes), width, generator=gen, requires_grad=True)
    w_EDF = torch.randn(len(sizes), width, 8, generator=gen, requires_grad=True)
    offs_E = torch.tensor(sizes).cumsum(0).to(torch.int32)
    y_MF = grouped_mm(x_MD, w_EDF, offs_E=offs_E)
    ref_MF = torch.cat([seg @ w_EDF[e] for e, seg in enumerate(torch.split(x_MD, sizes))])
    torch.testing.assert_close(y_MF, ref_MF, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(_dense_grad_loss(y_MF), (x_MD, w_EDF))
    ref_grads = torch.autograd.grad(_dense_grad_loss(ref_MF), (x_MD, w_EDF))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "moe_cfg",
    [
        MoEConfig(num_experts=E, top_k=2, router="gshard", dropless=True),
        MoEConfig(num_experts=E, top_k=1, router="switch", dropless=True),
        MoEConfig(num_experts=E, top_k=3, router="topk", dropless=True),
        MoEConfig(num_experts=E, top_k=2, router="gshard", capacity_factor=100.0),
    ],
    ids=["gshard-dropless", "switch-dropless", "top3-dropless", "gshard-no-overflow"],
)
def test_moe_equals_per_token_reference(moe_cfg: MoEConfig) -> None:
    moe = _moe(dataclasses.replace(BASE, moe=moe_cfg))
    x_BTD = _x()
    y_BTD = moe(x_BTD)
    ref_BTD = _reference(moe, x_BTD)
    torch.testing.assert_close(y_BTD, ref_BTD, rtol=1e-5, atol=1e-5)
    params = [x_BTD, moe.experts.w1, moe.experts.w2, moe.experts.w3]
    # Auxiliary losses off so that both sides differentiate the same function.
    moe.aux_loss_coef = moe.z_loss_coef = 0.0
    grads = torch.autograd.grad(_dense_grad_loss(moe(x_BTD)), params)
    ref_grads = torch.autograd.grad(_dense_grad_loss(_reference(moe, x_BTD)), params)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gelu_experts_with_biases_equal_reference() -> None:
    cfg = dataclasses.replace(BASE, mlp="gelu", bias=True, norm="layernorm")
    moe = _moe(cfg)
    x_BTD = _x()
    torch.testing.assert_close(moe(x_BTD), _reference(moe, x_BTD), rtol=1e-5, atol=1e-5)
    cfg_cap = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, dropless=False, capacity_factor=100.0)
    )
    moe_cap = _moe(cfg_cap)
    torch.testing.assert_close(moe_cap(x_BTD), moe(x_BTD), rtol=1e-5, atol=1e-5)


def _all_to_expert_zero(moe: MoE) -> None:
    """Router logits follow feature 0 of the routed input: tokens pile onto experts 0 and 3."""
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, 0] = torch.tensor([30.0, 20.0, 10.0, 0.0])


def test_capacity_drops_exactly_the_overflow_and_residual_carries_it() -> None:
    cfg = dataclasses.replace(
        BASE,
        moe=MoEConfig(num_experts=E, top_k=1, router="switch", capacity_factor=1.0),
    )
    block = Block(cfg, use_moe=True)
    torch.manual_seed(0)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.3)
    moe = block.moe
    _all_to_expert_zero(moe)
    x_BTD = _x(2, 8)
    num_tokens = 16
    capacity = expert_capacity(cfg, num_tokens=num_tokens)
    assert capacity == math.ceil(1.0 * num_tokens * 1 / E) == 4

    inputs = AttentionInputs(rope=None, mask_B1TS=None, is_causal=True)
    with torch.no_grad():
        h_BTD = x_BTD + block.attention(block.attention_norm(x_BTD), inputs=inputs)
        routed_ND = block.ffn_norm(h_BTD).reshape(-1, D)
        experts_N = moe.router(routed_ND).experts_NK[:, 0]
        out_BTD = block(x_BTD, inputs=inputs)
        moe_out_ND = moe(block.ffn_norm(h_BTD)).reshape(-1, D)

    # Expected: per expert, the first `capacity` tokens in order are kept, the rest dropped.
    kept_N = torch.zeros(num_tokens, dtype=torch.bool)
    for e in range(E):
        kept_N[(experts_N == e).nonzero().squeeze(1)[:capacity]] = True
    assert int((~kept_N).sum()) > 0, "the test must overflow an expert"
    assert torch.all(moe_out_ND[~kept_N] == 0)
    assert torch.all(moe_out_ND[kept_N].abs().sum(-1) > 0)
    out_ND, h_ND = out_BTD.reshape(-1, D), h_BTD.reshape(-1, D)
    torch.testing.assert_close(out_ND[~kept_N], h_ND[~kept_N], rtol=0, atol=0)
    metrics = moe.metrics
    expected_counts = torch.bincount(experts_N, minlength=E)
    assert torch.equal(metrics.tokens_per_expert_E, expected_counts)
    assert int(metrics.tokens_per_expert_E.sum()) == num_tokens
    assert metrics.dropped_fraction.item() == pytest.approx(int((~kept_N).sum()) / num_tokens)


def test_second_choices_are_dropped_before_first_choices() -> None:
    cfg = dataclasses.replace(
        BASE, moe=MoEConfig(num_experts=E, top_k=2, router="gshard", capacity_factor=0.5)
    )
    moe = _moe(cfg)
    # Every token: first choice expert 0 or 1 (alternating), second choice expert 2.
    x_BTD = torch.zeros(1, 8, D)
    x_BTD[0, :, 0] = 1.0
    x_BTD[0, 0::2, 1] = 1.0
    x_BTD[0, 1::2, 2] = 1.0
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0] = torch.tensor([0.0, 5.0, 0.0] + [0.0] * (D - 3))
        moe.router.gate.weight[1] = torch.tensor([0.0, 0.0, 5.0] + [0.0] * (D - 3))
        moe.router.gate.weight[2] = torch.tensor([4.0, 0.0, 0.0] + [0.0] * (D - 3))
        routing = moe.router(x_BTD.reshape(-1, D))
        moe(x_BTD)
    assert routing.experts_NK[:, 1].eq(2).all()
    capacity = expert_capacity(cfg, num_tokens=8)  # ceil(0.5 * 8 * 2 / 4) = 2
    assert capacity == 2
    # Experts 0 and 1 each get 4 first choices (2 dropped each); expert 2 gets 8 second choices
    # of which 2 are kept: dropped = 2 + 2 + 6 = 10 of 16.
    assert moe.metrics.dropped_fraction.item() == pytest.approx(10 / 16)
    assert moe.metrics.tokens_per_expert_E.tolist() == [4, 4, 8, 0]


def test_load_balancing_and_z_loss_by_hand() -> None:
    moe = _moe()
    x_BTD = _x()
    moe(x_BTD)
    with torch.no_grad():
        logits_NE = x_BTD.reshape(-1, D) @ moe.router.gate.weight.T
        probs_NE = logits_NE.softmax(-1)
        top_NK = probs_NE.topk(2, dim=-1).indices
        num_tokens = logits_NE.shape[0]
        f = [float((top_NK == i).sum()) / (num_tokens * 2) for i in range(E)]
        p = [float(probs_NE[:, i].mean()) for i in range(E)]
        aux = E * sum(fi * pi for fi, pi in zip(f, p, strict=True))
        z = float((torch.logsumexp(logits_NE, -1) ** 2).mean())
    assert moe.metrics.aux_loss.item() == pytest.approx(aux, rel=1e-5)
    assert moe.metrics.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert int(moe.metrics.tokens_per_expert_E.sum()) == num_tokens * 2
    assert moe.metrics.dropped_fraction.item() == 0.0


def test_aux_losses_reach_the_router_gradient() -> None:
    moe = _moe()
    moe.aux_loss_coef, moe.z_loss_coef = 0.5, 0.25
    x_BTD = _x()
    gate_W = moe.router.gate.weight
    (grad_attached,) = torch.autograd.grad(_dense_grad_loss(moe(x_BTD)), (gate_W,))

    # Reference: the same main loss plus the hand-written weighted auxiliary losses.
    aux_free = _moe()
    aux_free.aux_loss_coef = aux_free.z_loss_coef = 0.0
    gate_ref = aux_free.router.gate.weight
    logits_NE = x_BTD.reshape(-1, D) @ gate_ref.T
    probs_NE = logits_NE.softmax(-1)
    counts_E = torch.bincount(probs_NE.topk(2, dim=-1).indices.reshape(-1), minlength=E)
    f_E = counts_E.float() / counts_E.sum()
    aux = E * (f_E * probs_NE.mean(0)).sum()
    z = (torch.logsumexp(logits_NE, -1) ** 2).mean()
    ref_loss = _dense_grad_loss(aux_free(x_BTD)) + 0.5 * aux + 0.25 * z
    (grad_ref,) = torch.autograd.grad(ref_loss, (gate_ref,))
    torch.testing.assert_close(grad_attached, grad_ref, rtol=1e-5, atol=1e-6)


def test_jitter_and_random_routing_are_deterministic_under_a_seed() -> None:
    cfg = dataclasses.replace(
        BASE,
        moe=MoEConfig(
            num_experts=E,
            top_k=2,
            router="gshard",
            jitter=0.1,
            random_second_expert=True,
            capacity_factor=1.0,
        ),
    )
    x_BTD = _x(4, 16)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        moe = _moe(cfg).train()
        torch.manual_seed(seed)
        out = moe(x_BTD)
        return out.detach(), moe.metrics.tokens_per_expert_E

    out_a, counts_a = run(3)
    out_b, counts_b = run(3)
    out_c, _ = run(4)
    assert torch.equal(out_a, out_b) and torch.equal(counts_a, counts_b)
    assert not torch.equal(out_a, out_c)
    # Random routing skips some second choices: fewer than N * K routed assignments.
    assert int(counts_a.sum()) < 64 * 2


def test_eval_mode_has_no_jitter() -> None:
    cfg = dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, jitter=0.5))
    moe = _moe(cfg).eval()
    x_BTD = _x()
    torch.manual_seed(0)
    a = moe(x_BTD)
    torch.manual_seed(1)
    assert torch.equal(a, moe(x_BTD))


@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "capacity"])
def test_experts_follow_autocast_into_one_bf16_grouped_product(dropless: bool) -> None:
    # The trainer's bf16 is autocast over fp32 weights. torch._grouped_mm is not on autocast's
    # lists, so without the cast the expert products would stay fp32: on CUDA that is the
    # per-expert fallback with a host sync. Every grouped product must see bf16 operands, and
    # the layer must not read anything on the host (tests.host_sync).
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.host_sync import HostSyncRecorder

    class GroupedDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[torch.dtype, torch.dtype]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._grouped_mm.default:
                self.seen.append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    moe_cfg = dataclasses.replace(BASE.moe, dropless=dropless, capacity_factor=1.0)
    moe = _moe(dataclasses.replace(BASE, moe=moe_cfg))
    x_BTD = _x()
    with HostSyncRecorder() as syncs, GroupedDtypes() as grouped:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_BTD = moe(x_BTD)
        _dense_grad_loss(y_BTD.float()).backward()
    assert syncs.calls == []
    assert len(grouped.seen) >= 3 * 2  # w1, w3, w2 forward; their gradients backward
    assert set(grouped.seen) == {(torch.bfloat16, torch.bfloat16)}
    assert moe.experts.w1.grad is not None and moe.experts.w1.grad.dtype == torch.float32
    if dropless:
        ref_BTD = _reference(moe, x_BTD.detach())
        torch.testing.assert_close(y_BTD.float(), ref_BTD, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_dropless_forward_has_no_host_sync_on_cuda() -> None:
    moe = _moe().to("cuda", torch.bfloat16)
    x_BTD = _x().detach().to("cuda", torch.bfloat16).requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y_BTD = moe(x_BTD)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_BTD = _reference(_moe(), _x().detach())
    torch.testing.assert_close(y_BTD.float().cpu(), ref_BTD, rtol=5e-2, atol=5e-2)
    _dense_grad_loss(y_BTD.float().cpu()).backward()
    assert x_BTD.grad is not None


# ---------------------------------------------------------------------------------------------
# padding, aux-loss type, eval capacity, statistics over a step


def _padded(x_real_BTD: torch.Tensor, *, pad_front: int, pad_back: int, seed: int = 5):
    """``x_real_BTD`` with ``pad_front``/``pad_back`` padding positions around each row and one
    extra all-padding row (random large values: routed, they would crowd the experts).
    Returns ``(x_BTD, mask_BT)``."""
    batch, seq, dim = x_real_BTD.shape
    gen = torch.Generator().manual_seed(seed)
    total = pad_front + seq + pad_back
    x_BTD = 3.0 * torch.randn(batch + 1, total, dim, generator=gen)
    x_BTD[:batch, pad_front : pad_front + seq] = x_real_BTD
    mask_BT = torch.zeros(batch + 1, total, dtype=torch.bool)
    mask_BT[:batch, pad_front : pad_front + seq] = True
    return x_BTD, mask_BT


@pytest.mark.parametrize("aux_loss_type", ["topk", "switch"])
@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "capacity"])
def test_padding_is_not_routed(dropless: bool, aux_loss_type: str) -> None:
    x_real_BTD = _x(2, 6).detach()  # N = 12 real tokens
    x_BTD, mask_BT = _padded(x_real_BTD, pad_front=3, pad_back=2)  # N = 3 * 11 = 33
    # Capacity C = ceil(cf * N * K / E) counts every position: the padded layer's factor is
    # chosen so that both layers get C = 3 (12 * 2 * 0.5 / 4 = 3; 33 * 2 * 0.18 / 4 = 2.97).
    moe_cfg = dataclasses.replace(
        BASE.moe, dropless=dropless, aux_loss_type=aux_loss_type, capacity_factor=0.5
    )
    ref = _moe(dataclasses.replace(BASE, moe=moe_cfg))
    padded = _moe(dataclasses.replace(BASE, moe=dataclasses.replace(moe_cfg, capacity_factor=0.18)))
    if not dropless:
        assert expert_capacity(ref.cfg, num_tokens=12) == expert_capacity(padded.cfg, num_tokens=33)
    with torch.no_grad():
        out_ref_BTD = ref(x_real_BTD)
        out_BTD = padded(x_BTD, token_mask_BT=mask_BT)
    torch.testing.assert_close(out_BTD[mask_BT], out_ref_BTD.reshape(-1, D), rtol=1e-6, atol=1e-6)
    assert torch.all(out_BTD[~mask_BT] == 0)
    got, want = padded.metrics, ref.metrics
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    assert got.dropped_fraction.item() == pytest.approx(want.dropped_fraction.item())
    assert got.aux_loss.item() == pytest.approx(want.aux_loss.item(), rel=1e-6)
    assert got.z_loss.item() == pytest.approx(want.z_loss.item(), rel=1e-6)
    if not dropless:
        assert want.dropped_fraction.item() > 0, "the test must overflow an expert"
        # The same padded batch with the padding routed drops other real assignments.
        with torch.no_grad():
            unmasked_BTD = padded(x_BTD)
        assert not torch.allclose(unmasked_BTD[mask_BT], out_ref_BTD.reshape(-1, D))


def _hand_logits_moe(logits_NE: torch.Tensor, *, top_k: int, router: str, aux_loss_type: str):
    """A layer whose router gives ``logits_NE`` for the basis inputs ``x_n = e_n``."""
    moe_cfg = MoEConfig(
        num_experts=E, top_k=top_k, router=router, dropless=True, aux_loss_type=aux_loss_type
    )
    moe = _moe(dataclasses.replace(BASE, moe=moe_cfg))
    num_tokens = logits_NE.shape[0]
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :num_tokens] = logits_NE.T
    x_BTD = torch.eye(D)[:num_tokens].reshape(1, num_tokens, D)
    return moe, x_BTD


LOGITS_NE = torch.tensor(
    [
        [2.0, 1.0, 0.0, -1.0],
        [2.5, 0.0, 1.5, 0.0],
        [0.0, 3.0, 2.0, 1.0],
        [1.0, 0.0, 0.5, 2.0],
        [2.0, -1.0, 1.0, 0.0],
        [0.0, 0.5, 1.0, 3.0],
    ]
)


def test_aux_loss_types_follow_their_papers() -> None:
    probs_NE = LOGITS_NE.softmax(-1)
    num_tokens = probs_NE.shape[0]
    # Top-2 choices by hand: first = argmax, second = argmax with the first removed.
    first_N = [int(row.argmax()) for row in probs_NE]
    second_N = []
    for row, first in zip(probs_NE, first_N, strict=True):
        rest = row.clone()
        rest[first] = -1.0
        second_N.append(int(rest.argmax()))
    p_E = probs_NE.mean(0)
    # Switch eq. 4-6: f_i = (1/N) sum_n 1[argmax p_n = i]; loss = E sum_i f_i P_i.
    f_switch = [sum(1 for e in first_N if e == i) / num_tokens for i in range(E)]
    switch_loss = E * sum(f * float(p) for f, p in zip(f_switch, p_E, strict=True))
    # transformers' load_balancing_loss_func: E sum_{k,i} mean_n 1[choice_k(n) = i] P_i; ours
    # divides by k (f_i over the N * k assignments).
    hf_loss = E * sum(
        (sum(1 for e in first_N if e == i) + sum(1 for e in second_N if e == i))
        / num_tokens
        * float(p_E[i])
        for i in range(E)
    )
    assert first_N != second_N and abs(switch_loss - hf_loss / 2) > 1e-3  # types differ here
    for aux_loss_type, expected in (("switch", switch_loss), ("topk", hf_loss / 2)):
        moe, x_BTD = _hand_logits_moe(
            LOGITS_NE, top_k=2, router="gshard", aux_loss_type=aux_loss_type
        )
        with torch.no_grad():
            moe(x_BTD)
        assert moe.metrics.aux_loss.item() == pytest.approx(expected, rel=1e-6), aux_loss_type
    # Top-1: both types are Switch's loss.
    for aux_loss_type in ("switch", "topk"):
        moe, x_BTD = _hand_logits_moe(
            LOGITS_NE, top_k=1, router="switch", aux_loss_type=aux_loss_type
        )
        with torch.no_grad():
            moe(x_BTD)
        assert moe.metrics.aux_loss.item() == pytest.approx(switch_loss, rel=1e-6)


def test_eval_mode_routes_with_the_eval_capacity_factor() -> None:
    x_BTD = _x(2, 8).detach()
    train_cfg = dataclasses.replace(BASE.moe, dropless=False, capacity_factor=0.5)
    with torch.no_grad():
        # Reference for eval_capacity_factor=1.5: a training-mode layer with that capacity.
        wide = _moe(
            dataclasses.replace(BASE, moe=dataclasses.replace(train_cfg, capacity_factor=1.5))
        )
        expected_BTD = wide(x_BTD)
        moe = _moe(
            dataclasses.replace(BASE, moe=dataclasses.replace(train_cfg, eval_capacity_factor=1.5))
        )
        train_BTD = moe(x_BTD)
        train_dropped = moe.metrics.dropped_fraction.item()
        eval_BTD = moe.eval()(x_BTD)
        assert torch.equal(eval_BTD, expected_BTD)
        assert train_dropped > moe.metrics.dropped_fraction.item()
        assert not torch.allclose(train_BTD, eval_BTD)
        # eval_capacity_factor None: dropless at eval (the token-by-token definition).
        dropless_eval = _moe(dataclasses.replace(BASE, moe=train_cfg)).eval()
        torch.testing.assert_close(
            dropless_eval(x_BTD), _reference(dropless_eval, x_BTD), rtol=1e-5, atol=1e-6
        )
        assert dropless_eval.metrics.dropped_fraction.item() == 0.0


def _stats_fields(stats) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(stats, f.name)
        for f in dataclasses.fields(stats)
        if getattr(stats, f.name) is not None
    }


def test_stats_sum_every_training_forward_until_read() -> None:
    cfg = dataclasses.replace(
        BASE,
        moe=dataclasses.replace(BASE.moe, dropless=False, capacity_factor=0.75, aux_loss_coef=0.1),
    )
    x1_BTD, x2_BTD = _x(2, 8, seed=1), _x(2, 8, seed=2)
    mask_BT = torch.ones(2, 8, dtype=torch.bool)
    mask_BT[1, 5:] = False
    lang_BT = torch.tensor([[0] * 8, [2] * 4 + [1] * 4])
    singles = []
    for x_BTD in (x1_BTD, x2_BTD):
        moe = _moe(cfg)
        moe.num_tracked_languages = 3
        moe(x_BTD, token_mask_BT=mask_BT, lang_ids_BT=lang_BT)
        singles.append(moe.stats())
        # Reference counts by hand from the router's choices.
        with torch.no_grad():
            experts_NK = moe.router(x_BTD.reshape(-1, D)).experts_NK
        real_N = mask_BT.reshape(-1)
        counts = torch.zeros(E, dtype=torch.int64)
        by_lang = torch.zeros(3, E, dtype=torch.int64)
        for n in range(16):
            for k in range(2):
                if real_N[n]:
                    counts[experts_NK[n, k]] += 1
                    by_lang[lang_BT.reshape(-1)[n], experts_NK[n, k]] += 1
        assert torch.equal(singles[-1].tokens_per_expert_E, counts)
        assert torch.equal(singles[-1].load_by_lang_LE, by_lang)
        assert int(singles[-1].num_routed) == 2 * 13 and int(singles[-1].num_forwards) == 1
        assert singles[-1].aux_loss_sum.item() == pytest.approx(moe.metrics.aux_loss.item())
    assert moe.stats() is None  # read with reset

    moe = _moe(cfg)
    moe.num_tracked_languages = 3
    for x_BTD in (x1_BTD, x2_BTD):
        moe(x_BTD, token_mask_BT=mask_BT, lang_ids_BT=lang_BT)
    with torch.no_grad():
        moe.eval()(x1_BTD)  # eval forwards are not accumulated
    moe.train()
    peek = moe.stats(reset=False)
    total = moe.stats()
    assert peek is total and moe.stats() is None
    expected = _stats_fields(singles[0] + singles[1])
    got = _stats_fields(total)
    assert got.keys() == expected.keys() and "load_by_lang_LE" in got
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=0, msg=name)
    assert int(total.num_forwards) == 2
    assert total.dropped_fraction.item() == pytest.approx(
        int(total.num_dropped) / int(total.num_routed)
    )


@pytest.mark.parametrize("how", ["utils.checkpoint", "checkpoint_wrapper"])
def test_recomputed_forward_counts_once(how: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, aux_loss_coef=0.1))
    inputs = AttentionInputs(rope=None, mask_B1TS=None, is_causal=True)

    def block() -> Block:
        torch.manual_seed(0)
        made = Block(cfg, use_moe=True)
        for param in made.parameters():
            torch.nn.init.normal_(param, std=0.3)
        return made

    plain, checkpointed = block(), block()
    x_BTD = _x(2, 8)
    plain(x_BTD, inputs=inputs).square().sum().backward()
    if how == "checkpoint_wrapper":
        wrapped = checkpoint_wrapper(checkpointed, preserve_rng_state=True)
        out_BTD = wrapped(x_BTD, inputs=inputs)
    else:
        out_BTD = torch.utils.checkpoint.checkpoint(
            checkpointed, x_BTD, inputs=inputs, use_reentrant=False
        )
    out_BTD.square().sum().backward()  # recomputes the block's forward
    want, got = plain.moe.stats(), checkpointed.moe.stats()
    assert int(got.num_forwards) == 1
    for name, value in _stats_fields(want).items():
        torch.testing.assert_close(_stats_fields(got)[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(
        checkpointed.moe.router.gate.weight.grad, plain.moe.router.gate.weight.grad
    )


def test_masked_capacity_forward_with_stats_has_no_host_sync() -> None:
    from tests.host_sync import HostSyncRecorder

    moe_cfg = dataclasses.replace(BASE.moe, dropless=False, capacity_factor=0.75)
    moe = _moe(dataclasses.replace(BASE, moe=moe_cfg))
    moe.num_tracked_languages = 2
    x_BTD, mask_BT = _padded(_x(2, 6).detach(), pad_front=1, pad_back=1)
    x_BTD.requires_grad_()
    lang_BT = torch.zeros(x_BTD.shape[:2], dtype=torch.int64)
    with HostSyncRecorder() as syncs:
        for _ in range(2):
            moe(x_BTD, token_mask_BT=mask_BT, lang_ids_BT=lang_BT).square().sum().backward()
        stats = moe.stats()
        _ = stats.dropped_fraction
    assert syncs.calls == []
    assert int(stats.num_forwards) == 2 and int(stats.load_by_lang_LE.sum()) == 2 * 2 * 12
