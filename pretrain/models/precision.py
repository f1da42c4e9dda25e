"""Autocast for the ops that autocast does not list.

What to call: ``autocast_operands(*tensors)`` before ``torch._grouped_mm`` or ``flex_attention``:
under an active CUDA/CPU autocast the operands come back in its dtype, else unchanged.

``torch.autocast`` casts the operands of the ops on its lists (``mm``, SDPA, ...) to its dtype.
``torch._grouped_mm`` and ``flex_attention`` are on none, so under the trainer's bf16 (autocast
over fp32 weights) they would see fp32 or mixed operands: the grouped product would leave its
bf16 kernel, FlexAttention would reject mixed dtypes. Their callers cast with
:func:`autocast_operands` first, as autocast does for ``mm``.
"""

from __future__ import annotations

import torch


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for their device, else as
    they are (gradients flow back to the original dtype)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)
