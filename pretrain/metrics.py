"""The training metrics of a log window: throughput, MFU, loss per language and objective, MoE
routing.

What to call: a :class:`MetricsWindow` per run; ``window.add(batches, step_out)`` after every
step, ``window.read(step_out, ...)`` on a log step (it returns the metrics line and starts the
next window). Every rank calls ``read`` at the same steps: it reduces fixed-shape tables over
the mesh (one collective per table), so the numbers are global (all data-parallel ranks, every
pipeline stage) and identical on every rank.

Window: every micro-batch of every step since the last log line. ``tokens_per_s`` counts the
positions fed to the model, padding included: an encoder-decoder batch's source and decoder
positions both (``pretrain.batches.batch_tokens``); ``tokens_per_lang`` counts the text read.
Train loss per language and per objective comes from the loss groups the objectives report
(``pretrain.objectives.mix``); MoE routing from the layers' accumulated ``MoEStats`` (read and
reset here; padding is not routed, so it counts nowhere). Runs with pair rows (TLM,
translation) also report the run's text tokens so far per pair set (``pair_tokens``) and their
``real_pair_tokens`` / ``synthetic_pair_tokens`` totals (back-translated sets are synthetic).
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from parallel.mesh import ParallelDims
from parallel.parallelize import reduce_metric
from pretrain.flops import mfu
from pretrain.objectives.mix import ObjectiveMix


class MetricsWindow:
    """Accumulates one log window's tokens, loss groups and time; :meth:`read` reports them.

    Args:
        dims: the run's layout (reductions over ``dp``, ``tp``, ``pp``).
        mix: the run's objectives (loss groups and their names).
        languages: the run's language index.
        moe_layer_names: ``layers.{i}.moe`` of every MoE layer of the whole model.
        num_experts: experts per MoE layer.
        flops_per_token, peak_flops: for MFU (no MFU when ``peak_flops`` is None).
        device: where the group sums live.
    """

    def __init__(
        self,
        *,
        dims: ParallelDims,
        mix: ObjectiveMix,
        languages: Sequence[str],
        moe_layer_names: Sequence[str],
        num_experts: int,
        flops_per_token: float,
        peak_flops: float | None,
        device: torch.device,
    ) -> None:
        self.dims, self.mix, self.languages = dims, mix, list(languages)
        self.moe_layer_names, self.num_experts = list(moe_layer_names), num_experts
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.device = device
        self.num_groups = mix.num_groups(len(self.languages))
        self.group_sums = torch.zeros(self.num_groups, dtype=torch.float32, device=device)
        self.group_counts = torch.zeros(self.num_groups, dtype=torch.float32, device=device)
        self.lang_tokens: dict[str, int] = defaultdict(int)
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, batches: Sequence[dict[str, Any]], out: dict[str, Any]) -> None:
        """Count one step: its micro-batches' tokens per language, its tokens and loss groups
        (``out``: what ``Trainer.train_step`` returned; no host sync)."""
        for batch in batches:
            for index, count in enumerate(batch["tokens_per_lang"].tolist()):
                if count:
                    self.lang_tokens[self.languages[index]] += int(count)
        self.tokens += out["tokens"]
        self.group_sums += out["group_sums"]
        self.group_counts += out["group_counts"]

    def reset(self) -> None:
        self.group_sums.zero_()
        self.group_counts.zero_()
        self.lang_tokens.clear()
        self.tokens, self.start = 0, time.perf_counter()

    def read(
        self,
        out: dict[str, Any],
        *,
        lr: float,
        skipped_steps: int,
        bad_samples: int,
        parts: Sequence[torch.nn.Module],
        pair_tokens: Mapping[str, int] | None = None,
        synthetic_pairs: Sequence[str] = (),
    ) -> dict[str, Any]:
        """The metrics line of the window ending with step result ``out`` (settled), then a
        new window. ``bad_samples``: this rank's corrupt-shard samples skipped so far.
        ``pair_tokens``: this rank's text tokens read so far per pair set (the loader's
        ``counters["pair_tokens"]``; None when no pair rows are scheduled), with the names of
        the synthetic (back-translated) ones in ``synthetic_pairs``."""
        elapsed = time.perf_counter() - self.start
        global_tokens = float(reduce_metric(float(self.tokens), dims=self.dims, op="sum"))
        tokens_per_s = global_tokens / max(elapsed, 1e-9)
        metrics: dict[str, Any] = {
            "loss": out["loss"],
            "lr": lr,
            "grad_norm": out["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "memory_gib": memory_gib(self.device),
            "skipped_steps": skipped_steps,
            # Samples of corrupt shards skipped so far (data.on_bad_shard=skip), summed over
            # dp ranks; 0 on clean data.
            "bad_samples": int(reduce_metric(float(bad_samples), dims=self.dims, op="sum")),
        }
        if self.peak_flops is not None:
            metrics["mfu"] = mfu(
                tokens_per_s / self.dims.world_size,
                flops_per_token=self.flops_per_token,
                peak=self.peak_flops,
            )
        metrics.update(self._language_metrics())
        if pair_tokens:
            metrics.update(self._pair_metrics(pair_tokens, synthetic_pairs))
        metrics.update(
            moe_metrics(
                parts,
                self.moe_layer_names,
                num_experts=self.num_experts,
                languages=self.languages,
                dims=self.dims,
                device=self.device,
            )
        )
        self.reset()
        return metrics

    def _language_metrics(self) -> dict[str, Any]:
        """Train loss per language and per objective, and tokens per language, summed over dp
        ranks (one fixed table: every rank reduces the same shape)."""
        G, L = self.num_groups, len(self.languages)
        lang_tokens = [float(self.lang_tokens.get(lang, 0)) for lang in self.languages]
        table = torch.cat(
            [
                self.group_sums.double().cpu(),
                self.group_counts.double().cpu(),
                torch.tensor(lang_tokens, dtype=torch.float64),
            ]
        )
        table = reduce_metric(table, dims=self.dims, axis="dp", op="sum")
        sums, counts, tokens = table[:G], table[G : 2 * G], table[2 * G : 2 * G + L]
        out: dict[str, Any] = {
            "tokens_per_lang": {
                lang: int(tokens[i]) for i, lang in enumerate(self.languages) if tokens[i] > 0
            }
        }
        out.update(self.mix.group_metrics(sums, counts, self.languages))
        return out

    def _pair_metrics(
        self, pair_tokens: Mapping[str, int], synthetic_pairs: Sequence[str]
    ) -> dict[str, Any]:
        """Text tokens read so far per pair set, and their real / synthetic totals, summed
        over dp ranks (the same pair sets, in the same order, on every rank)."""
        names = list(pair_tokens)
        counts = torch.tensor([float(pair_tokens[n]) for n in names], dtype=torch.float64)
        counts = reduce_metric(counts, dims=self.dims, axis="dp", op="sum").tolist()
        per_pair = {name: int(n) for name, n in zip(names, counts)}
        synthetic = set(synthetic_pairs)
        return {
            "pair_tokens": per_pair,
            "real_pair_tokens": sum(n for k, n in per_pair.items() if k not in synthetic),
            "synthetic_pair_tokens": sum(n for k, n in per_pair.items() if k in synthetic),
        }


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations, or the host's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def moe_metrics(
    parts: Sequence[torch.nn.Module],
    layer_names: Sequence[str],
    *,
    num_experts: int,
    languages: Sequence[str],
    dims: ParallelDims,
    device: torch.device,
) -> dict[str, Any]:
    """MoE routing over the window: every micro-batch of every step since the last read, every
    pipeline stage, every data-parallel rank (the layers' ``MoEStats``, read and reset here).

    Keys: ``moe_aux_loss`` / ``moe_z_loss`` (mean over layers of each layer's mean unweighted
    loss), ``moe_routed`` (routed assignments, all layers: tokens x top-k x MoE layers, less
    GShard's skipped second choices), ``moe_dropped_fraction`` (dropped / routed assignments, all
    layers), ``moe_expert_load`` (share of routed assignments per expert, all layers) and
    ``moe_load_by_lang`` (per layer, per language: the share of that language's routed
    assignments sent to each expert). Empty for a dense model or a window without a forward.
    """
    names = list(layer_names)
    if not names:
        return {}
    stats = {}
    for part in parts:
        if hasattr(part, "moe_stats"):
            stats.update(part.moe_stats(reset=True))
    num_langs = len(languages)
    # One float64 row per layer (a fixed table: every rank reduces the same shape):
    # [tokens per expert (E) | routed, dropped, aux sum, z sum, forwards | by language (L*E)]
    width = num_experts + 5 + num_langs * num_experts
    rows = []
    for name in names:
        layer = stats.get(name)
        if layer is None:  # on another pipeline stage, or no forward in the window
            rows.append(torch.zeros(width, dtype=torch.float64, device=device))
            continue
        by_lang = layer.load_by_lang_LE
        if by_lang is None:
            by_lang = torch.zeros(num_langs, num_experts, device=device)
        pieces = [layer.tokens_per_expert_E, layer.num_routed, layer.num_dropped]
        pieces += [layer.aux_loss_sum, layer.z_loss_sum, layer.num_forwards, by_lang]
        rows.append(torch.cat([t.reshape(-1).to(device, torch.float64) for t in pieces]))
    table = torch.stack(rows).cpu()
    # Ranks with other tokens add up: dp always; tp where each tp rank routes its own chunk
    # (ep_over_tp; the loss sums are then global on every tp rank, and the forward counts add up
    # alike, so their ratio stays the mean); pp holds disjoint layers.
    table = reduce_metric(table, dims=dims, axis="dp", op="sum")
    if dims.ep_over_tp:
        table = reduce_metric(table, dims=dims, axis="tp", op="sum")
    if dims.pp > 1:
        table = reduce_metric(table, dims=dims, axis="pp", op="sum")
    experts = table[:, :num_experts]
    routed, dropped, aux, z, forwards = table[:, num_experts : num_experts + 5].unbind(1)
    seen = forwards > 0
    if not bool(seen.any()):
        return {}
    load = experts.sum(0)
    by_lang = table[:, num_experts + 5 :].reshape(len(names), num_langs, num_experts)
    load_by_lang = {}
    for index, name in enumerate(names):
        shares = {}
        for lang_index, lang in enumerate(languages):
            counts = by_lang[index, lang_index]
            if counts.sum() > 0:
                shares[lang] = [round(float(x), 4) for x in counts / counts.sum()]
        if shares:
            load_by_lang[name] = shares
    out: dict[str, Any] = {
        "moe_aux_loss": float((aux[seen] / forwards[seen]).mean()),
        "moe_z_loss": float((z[seen] / forwards[seen]).mean()),
        "moe_routed": int(routed.sum()),
        "moe_dropped_fraction": float(dropped.sum() / routed.sum().clamp(min=1)),
        "moe_expert_load": [round(float(x), 4) for x in load / load.sum().clamp(min=1)],
    }
    if load_by_lang:
        out["moe_load_by_lang"] = load_by_lang
    return out
