"""Held-out loss per language and per pair set during training, as the run's objectives see it.

What to call: ``Validator(cfg, dims=..., device=..., batch_loss=..., num_targets=...)``, then
``validator.due(step)`` and ``validator.run(parts)`` on every rank at the same steps (it reduces
over ``dp``). Guarantee: the same held-out batches at every call (``train.eval_batches`` per
held-out set of ``data.valid_manifest``, built once per process, ``pretrain.data``), a
token-weighted mean loss per set over every dp rank, the model put back in train mode.

The held-out sets follow the objective mix: a run that trains on monolingual rows (MLM, CLM,
span corruption, denoising) validates them per language (``valid_loss_per_lang``); a run that
trains on pair rows (TLM, translation) validates them per pair set (``valid_loss_per_pair``, the
real pair sets of the valid manifest). ``valid_loss`` weighs the two means as the run weighs its
rows: ``(1 - s) * mean(per language) + s * mean(per pair set)``, s the TLM / translation share
of rows, so a translation-only run's ``valid_loss`` is its held-out translation loss and a
monolingual run's is the mean over languages, as before pair sets were validated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from parallel.mesh import ParallelDims
from parallel.parallelize import local_value, reduce_metric
from pretrain.config import RunConfig
from pretrain.data import build_valid_loaders, loader_settings


class Validator:
    """Validation loss per language and per pair set (the module docstring).

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
        # the run's share of pair rows weighs the pair sets' mean in valid_loss
        self.pair_share = loader_settings(cfg)[1].tlm_share

    def due(self, step: int) -> bool:
        """Whether ``step`` validates (every ``train.eval_every`` steps; 0: never)."""
        every = self.cfg.train.eval_every
        return bool(every and step % every == 0)

    def run(self, parts: Sequence[torch.nn.Module]) -> dict[str, Any]:
        """``{"valid_loss", "valid_loss_per_lang", "valid_loss_per_pair"}`` (each per-set
        entry only when the run has such sets) over the held-out batches; ``{}`` without a
        valid manifest."""
        valid = build_valid_loaders(
            self.cfg, dp_rank=self.dims.dp_rank, dp_world_size=self.dims.dp_world_size
        )
        if not valid:
            return {}
        for part in parts:
            part.eval()
        losses: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for kind, sets in valid.items():
                for name, batches in sorted(sets.items()):
                    losses.setdefault(kind, {})[name] = self._mean_loss(batches)
        for part in parts:
            part.train()
        out: dict[str, Any] = {}
        total = 0.0
        for kind, weight in (("lang", 1.0 - self.pair_share), ("pair", self.pair_share)):
            if losses.get(kind):
                out[f"valid_loss_per_{kind}"] = losses[kind]
                total += weight * sum(losses[kind].values()) / len(losses[kind])
        out["valid_loss"] = total
        return out

    def _mean_loss(self, batches: list[dict[str, Any]]) -> float:
        """Summed losses over summed target counts of ``batches`` on every dp rank."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        count = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in batches:
            total += local_value(self.batch_loss(batch)).float()
            count += self.num_targets(batch).float().to(self.device)
        total = reduce_metric(total, dims=self.dims, axis="dp", op="sum")
        count = reduce_metric(count, dims=self.dims, axis="dp", op="sum")
        return float(total / count.clamp(min=1))
