"""AdamW with decay-free norms, biases and embeddings, and the learning-rate schedules.

What to call: ``build_optimizer(model, cfg.optim, device_type="cpu")`` -> an ``AdamW`` over
:func:`param_groups` (weight decay on matrices only; fused by default on CUDA when the
parameters are on the device, unfused when they live on the host, as under FSDP2 CPU offload;
an explicit ``optim.fused`` is kept); ``build_scheduler(optimizer, cfg.optim, total_steps=n)``
-> a ``LambdaLR`` over ``lr_factor(step, cfg=..., total_steps=n)``, the multiplier of
``optim.lr`` for the update at 0-based ``step``, a pure function of the step (the scheduler's
state, the step, is saved with checkpoints).

Decay-free: every parameter of an ``nn.Embedding`` (token, position and language tables) and
every parameter with fewer than two dims (norm weights, biases); a tied output projection shares
the embedding's tensor and is therefore decay-free too.

Schedules (all after a linear warmup from 0 to ``lr`` over ``warmup_steps``):

- ``cosine``: half cosine from ``lr`` to ``min_lr_ratio * lr`` at the last step;
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of the steps, then a
  linear decay to ``min_lr_ratio * lr``;
- ``linear``: linear decay to ``min_lr_ratio * lr`` (BERT / XLM-R);
- ``constant``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices) and a decay-free one.

    Decay-free: every parameter of an ``nn.Embedding`` (token, position and language tables), and
    every parameter with fewer than two dims (norm weights, biases). A tied output projection
    shares the embedding's tensor and is therefore decay-free too.

    Returns:
        ``[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]``,
        groups left out when empty.
    """
    embedding_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for param in model.parameters():  # unique tensors: a tied weight appears once
        if not param.requires_grad:
            continue
        if id(param) in embedding_params or param.ndim < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def params_on_host(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` (its local shard, for a DTensor) lives in host memory:
    a CPU run, or FSDP2 CPU offload (``parallel.cpu_offload``) on an accelerator."""
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.device.type == "cpu":
            return True
    return False


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, device_type: str = "cpu"
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`.

    Fused by default on CUDA when the parameters are on the device; unfused (foreach, the host
    implementation) when they live on the CPU, as under FSDP2 CPU offload, where the optimizer
    state and step stay on the host. ``cfg.fused`` set explicitly is kept.
    """
    fused: bool | None = cfg.fused
    if fused is None:
        fused = device_type == "cuda" and not params_on_host(model)
    return torch.optim.AdamW(
        param_groups(model, weight_decay=cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_factor(step: int, *, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` for the update made at ``step`` (0-based)."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
    raise ValueError(
        f"optim.schedule ({cfg.schedule!r}) must be one of cosine, wsd, linear, constant"
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over :func:`lr_factor`; its state (the step) is saved with checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg=cfg, total_steps=total_steps)
    )
