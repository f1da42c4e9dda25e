"""Held-out loss per language during training.

What to call: ``Validator(cfg, dims=..., device=..., batch_loss=..., num_targets=...)``, then
``validator.due(step)`` and ``validator.run(parts)`` on every rank at the same steps (it reduces
over ``dp``). Guarantee: the same held-out batches at every call (``train.eval_batches`` per
language of ``data.valid_manifest``, monolingual rows only, built once per process), a
token-weighted mean loss per language over every dp rank, the model put back in train mode.
Encoder-decoder runs validate their monolingual objective (span corruption or denoising) per
language: the held-out rows are monolingual, their loss the decoder's over its labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from parallel.mesh import ParallelDims
from parallel.parallelize import local_value, reduce_metric
from pretrain.config import RunConfig
from pretrain.data import build_valid_loaders


class Validator:
    """Validation loss per language.

    Args:
        cfg: the run config (``data.valid_manifest``, ``train.eval_every``,
            ``train.eval_batches``).
        dims: the run's layout.
        device: where the sums live.
        batch_loss: ``batch -> summed loss`` of one held-out batch, forward only (the trainer's
            loss through every pipeline stage, or one forward).
        num_targets: ``batch -> its predicted-token count`` (an int64 CPU scalar).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        dims: ParallelDims,
        device: torch.device,
        batch_loss: Callable[[dict[str, Any]], torch.Tensor],
        num_targets: Callable[[dict[str, Any]], torch.Tensor],
    ) -> None:
        self.cfg, self.dims, self.device = cfg, dims, device
        self.batch_loss, self.num_targets = batch_loss, num_targets

    def due(self, step: int) -> bool:
        """Whether ``step`` validates (every ``train.eval_every`` steps; 0: never)."""
        every = self.cfg.train.eval_every
        return bool(every and step % every == 0)

    def run(self, parts: Sequence[torch.nn.Module]) -> dict[str, float]:
        """``{language: mean loss}`` over the held-out batches; ``{}`` without a valid
        manifest."""
        valid = build_valid_loaders(
            self.cfg, dp_rank=self.dims.dp_rank, dp_world_size=self.dims.dp_world_size
        )
        if not valid:
            return {}
        for part in parts:
            part.eval()
        result = {}
        with torch.no_grad():
            for lang, batches in sorted(valid.items()):
                total = torch.zeros((), dtype=torch.float32, device=self.device)
                count = torch.zeros((), dtype=torch.float32, device=self.device)
                for batch in batches:
                    # Summed losses and target counts: a token-weighted mean per language.
                    total += local_value(self.batch_loss(batch)).float()
                    count += self.num_targets(batch).float().to(self.device)
                total = reduce_metric(total, dims=self.dims, axis="dp", op="sum")
                count = reduce_metric(count, dims=self.dims, axis="dp", op="sum")
                result[lang] = float(total / count.clamp(min=1))
        for part in parts:
            part.train()
        return result
