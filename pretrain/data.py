"""The trainer's side of the data pipeline: run config -> streaming loaders.

Objectives map onto the loader's two kinds of batch: ``clm`` -> packed causal-LM rows; ``mlm``
and ``tlm`` -> BERT-masked rows, with a share of TLM (parallel-pair) rows. A weighted mix
``objective.weights = {mlm: a, tlm: b}`` becomes a TLM share of b / (a + b) of every batch
unless ``objective.tlm_share`` is set; ``objective.name = tlm`` alone means TLM rows only.
"""

from __future__ import annotations

from dataclasses import replace

from data_pipeline.loader import StreamingLoader, build_loader, masking_from_objective
from pretrain.config import RunConfig


def loader_objective(cfg: RunConfig) -> str:
    """The loader's batch kind for the run's objective(s)."""
    names = set(cfg.objective.weights) if cfg.objective.weights else {cfg.objective.name}
    return "clm" if names == {"clm"} else "mlm"


def tlm_share(cfg: RunConfig) -> float:
    """Share of TLM rows in each masked batch."""
    obj = cfg.objective
    if obj.tlm_share > 0:
        return obj.tlm_share
    weights = dict(obj.weights) if obj.weights else {obj.name: 1.0}
    total = weights.get("mlm", 0.0) + weights.get("tlm", 0.0)
    return weights.get("tlm", 0.0) / total if total > 0 else 0.0


def build_train_loader(cfg: RunConfig, *, dp_rank: int, dp_world_size: int) -> StreamingLoader:
    """This rank's training loader.

    Raises:
        ValueError: no manifest configured, or what the loader raises for bad data.
    """
    if not cfg.data.manifest:
        raise ValueError("data.manifest ('') must name a shard directory or its manifest.json")
    masking = replace(masking_from_objective(cfg.objective), tlm_share=tlm_share(cfg))
    return build_loader(
        cfg.data,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        objective=loader_objective(cfg),
        masking=masking,
        seed=cfg.train.seed,
    )


def build_valid_loaders(
    cfg: RunConfig, *, dp_rank: int, dp_world_size: int
) -> dict[str, list[dict]]:
    """``train.eval_batches`` held-out batches per language (the same ones at every call).

    Returns ``{}`` when ``data.valid_manifest`` is empty.
    """
    if not cfg.data.valid_manifest:
        return {}
    return _valid_batches(cfg, dp_rank, dp_world_size)


# Validation batches are built once per process and reused: the same held-out tokens each time.
_VALID_CACHE: dict[tuple, dict[str, list[dict]]] = {}


def _valid_batches(cfg: RunConfig, dp_rank: int, dp_world_size: int) -> dict[str, list[dict]]:
    key = (
        cfg.data.valid_manifest,
        cfg.data.seq_len,
        cfg.data.batch_size,
        dp_rank,
        dp_world_size,
        cfg.train.eval_batches,
        loader_objective(cfg),
    )
    if key in _VALID_CACHE:
        return _VALID_CACHE[key]
    # Validation per language: monolingual rows only.
    masking = replace(masking_from_objective(cfg.objective), tlm_share=0.0)
    probe = build_loader(
        _valid_data_cfg(cfg, weights={}),
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        objective=loader_objective(cfg),
        masking=masking,
        seed=cfg.train.seed,
    )
    result = {}
    mono = [lang for lang, p in probe.dataset.mono_p.items() if p > 0]
    for lang in mono:
        loader = build_loader(
            _valid_data_cfg(cfg, weights={lang: 1.0}),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            objective=loader_objective(cfg),
            masking=masking,
            seed=cfg.train.seed,
        )
        batches = iter(loader)
        result[lang] = [next(batches) for _ in range(cfg.train.eval_batches)]
    _VALID_CACHE[key] = result
    return result


def _valid_data_cfg(cfg: RunConfig, *, weights: dict[str, float]):
    return replace(
        cfg.data,
        manifest=cfg.data.valid_manifest,
        language_weights=weights,
        num_workers=0,
        shuffle_buffer=1,
    )
