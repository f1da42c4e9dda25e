"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pretrain.config import OptimConfig
from pretrain.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
    params_on_host,
)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.tok.weight  # tied


def test_norms_biases_embeddings_are_decay_free():
    model = _Toy()
    decayed, free = param_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and free["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.proj.weight)}
    assert {id(p) for p in free["params"]} == {
        id(model.tok.weight),
        id(model.proj.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }


def test_optimizer_uses_config():
    cfg = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(_Toy(), cfg)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_fused_default_is_off_for_host_parameters():
    # Parameters on the CPU (a CPU run, or FSDP2 CPU offload on CUDA): the host AdamW.
    model = _Toy()
    assert build_optimizer(model, OptimConfig(), device_type="cuda").defaults["fused"] is False
    assert build_optimizer(model, OptimConfig(), device_type="cpu").defaults["fused"] is False
    assert params_on_host(model)
    explicit = build_optimizer(model, OptimConfig(fused=True), device_type="cuda")
    assert explicit.defaults["fused"] is True


def test_params_on_host_is_false_off_the_cpu():
    with torch.device("meta"):
        model = _Toy()
    assert not params_on_host(model)


def _factors(schedule: str, **kw) -> list[float]:
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, **kw)
    return [lr_factor(s, cfg=cfg, total_steps=100) for s in range(100)]


def test_warmup_is_linear_to_peak():
    f = _factors("cosine")
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_ends_at_floor():
    f = _factors("cosine")
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[99] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_wsd_is_flat_then_decays_to_floor():
    f = _factors("wsd", decay_fraction=0.2)
    assert f[10:80] == pytest.approx([1.0] * 70)
    assert f[99] == pytest.approx(0.1)
    assert f[80] == pytest.approx(1 - 0.9 / 20)


def test_linear_and_constant():
    lin = _factors("linear")
    assert lin[10] == pytest.approx(1.0) and lin[55] == pytest.approx(1 - 0.9 * 0.5)
    assert _factors("constant")[10:] == pytest.approx([1.0] * 90)


def test_scheduler_drives_optimizer_lr():
    cfg = OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=4)
    opt = build_optimizer(_Toy(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])
    assert seen[4] == pytest.approx(2e-3) and seen[5] < 2e-3
