"""The trainer's side of the data pipeline: run config -> streaming loaders.

What to call: ``build_train_loader(cfg, dp_rank=r, dp_world_size=n)`` -> rank ``r``'s
``data_pipeline.loader.StreamingLoader`` (``ValueError`` when no manifest is configured, or what
the loader raises for bad data); ``build_valid_loaders(cfg, dp_rank=r, dp_world_size=n)`` ->
``train.eval_batches`` held-out batches per language and per pair set, as the run's objectives
use them, the same ones at every call (``{}`` without ``data.valid_manifest``);
``check_num_languages(cfg, languages)``. For checkpoints:
``loader_rank_state(loader, dp_rank=..., dp_world_size=..., num_workers=...)`` at save; at resume
``read_resume_rank_states(path, rank=..., world_size=..., dp_rank=..., dp_world_size=...,
num_workers=...)`` reads only the rank files this rank needs, and ``loader_resume_state(...,
index=...)`` gives what ``loader.load_state_dict`` takes (None for an imported model: data from
the start). No collectives: every rank reads its own files. Saved states that disagree on the
dp layout, or lack an old dp rank, raise ``ValueError``.

The objectives say which of the loader's batch kinds they need (``pretrain.objectives``: ``clm``
packed causal-LM rows; ``mlm`` BERT-masked rows with a share of TLM parallel-pair rows, e.g.
``objective.weights = {mlm: a, tlm: b}`` -> a TLM share of b / (a + b) of every batch).

Loader states in checkpoints are kept per data-parallel rank: every rank saves its loader's
state with its dp coordinate (:func:`loader_rank_state`), tensor / pipeline / expert-parallel
peers of one dp rank save the same state, and a resume hands the loader one state per old dp
rank (:func:`loader_resume_state`): its own when the dp layout (dp size, workers per rank) is
unchanged, else all of them for the loader's elastic re-dealing, whatever the world size. A
checkpoint's rank index (every rank's dp coordinate) tells a resuming rank which rank files
hold those states (:func:`loader_state_ranks`): one file for an exact resume, one per old dp
rank for an elastic one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from data_pipeline.loader import StreamingLoader, build_loader
from pretrain.config import RunConfig


def loader_settings(cfg: RunConfig):
    """``(transform, masking)``: the loader's batch kind and masking for the run's objectives
    (``pretrain.objectives.ObjectiveMix.loader_settings``)."""
    from pretrain.objectives.mix import ObjectiveMix

    return ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)


def build_train_loader(cfg: RunConfig, *, dp_rank: int, dp_world_size: int) -> StreamingLoader:
    """This rank's training loader.

    Raises:
        ValueError: no manifest configured, or what the loader raises for bad data.
    """
    if not cfg.data.manifest:
        raise ValueError("data.manifest ('') must name a shard directory or its manifest.json")
    transform, masking = loader_settings(cfg)
    return build_loader(
        cfg.data,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        objective=transform,
        masking=masking,
        seed=cfg.train.seed,
    )


def build_valid_loaders(
    cfg: RunConfig, *, dp_rank: int, dp_world_size: int
) -> dict[str, dict[str, list[dict]]]:
    """``train.eval_batches`` held-out batches per held-out set (the same ones at every call):
    ``{"lang": {language: batches}, "pair": {pair set: batches}}``. Languages hold the
    objectives' monolingual rows (when the run trains on any: TLM share < 1), pair sets their
    parallel rows (TLM, translation; when the run trains on pairs: TLM share > 0), each real
    pair set of ``data.valid_manifest`` alone (back-translated sets are not held-out data; a
    valid manifest without pairs validates a mixed run on its languages only).

    Raises:
        ValueError: a valid manifest without what the run's rows need (mono data for a run with
            monolingual rows; a real pair set for a pairs-only run).

    Returns ``{}`` when ``data.valid_manifest`` is empty.
    """
    if not cfg.data.valid_manifest:
        return {}
    return _valid_batches(cfg, dp_rank, dp_world_size)


# Validation batches are built once per process and reused: the same held-out tokens each time.
_VALID_CACHE: dict[tuple, dict[str, dict[str, list[dict]]]] = {}


def _valid_batches(cfg: RunConfig, dp_rank: int, dp_world_size: int) -> dict:
    transform, masking = loader_settings(cfg)
    key = (
        cfg.data.valid_manifest,
        cfg.data.seq_len,
        cfg.data.batch_size,
        dp_rank,
        dp_world_size,
        cfg.train.eval_batches,
        transform,
        masking,
    )
    if key in _VALID_CACHE:
        return _VALID_CACHE[key]
    share = masking.tlm_share

    def loader(weights: dict, pair_weights: dict, tlm_share: float):
        # pair rows only (1.0) or mono rows only (0.0); mono rows keep the run's kind of
        # seq2seq row (denoised or span-corrupted)
        only = replace(masking, tlm_share=tlm_share)
        if tlm_share == 1.0:
            only = replace(only, denoise_share=0.0)
        return build_loader(
            _valid_data_cfg(cfg, weights=weights, pair_weights=pair_weights),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            objective=transform,
            masking=only,
            seed=cfg.train.seed,
        )

    def batches(weights: dict, pair_weights: dict, tlm_share: float) -> list[dict]:
        rows = iter(loader(weights, pair_weights, tlm_share))
        return [next(rows) for _ in range(cfg.train.eval_batches)]

    def probe(tlm_share: float):
        return loader({}, {}, tlm_share).dataset

    result: dict[str, dict[str, list[dict]]] = {"lang": {}, "pair": {}}
    # a probe of the valid manifest's sources: mono rows where the run has any (the manifest
    # must then hold mono data), else pair rows only (it must then hold pairs)
    ds = probe(0.0 if share < 1.0 else 1.0)
    if share < 1.0:
        mono = [lang for lang, p in ds.mono_p.items() if p > 0]
        result["lang"] = {lang: batches({lang: 1.0}, {}, 0.0) for lang in mono}
    if share > 0.0:
        pairs = [n for n, p in ds.pair_p.items() if p > 0 and n not in ds.synthetic_pairs]
        if not pairs and share == 1.0:
            raise ValueError(
                f"data.valid_manifest ({cfg.data.valid_manifest!r}) has no real pair set to "
                "validate the run's pair rows on"
            )
        result["pair"] = {name: batches({}, {name: 1.0}, 1.0) for name in pairs}
    _VALID_CACHE[key] = result
    return result


def _valid_data_cfg(cfg: RunConfig, *, weights: dict[str, float], pair_weights: dict[str, float]):
    return replace(
        cfg.data,
        manifest=cfg.data.valid_manifest,
        language_weights=weights,
        pair_weights=pair_weights,
        synthetic_ratio=None,
        parallel_upsample=None,
        num_workers=0,
        shuffle_buffer=1,
    )


def check_num_languages(cfg: RunConfig, languages: list[str]) -> None:
    """With language embeddings on, ``model.num_languages`` must cover the run's language index.

    Args:
        languages: the run's language index (the tokenizer's language list, as the loader's
            ``dataset.languages`` holds it).

    Raises:
        ValueError: ``model.num_languages`` is positive and smaller than ``len(languages)``.
    """
    count = cfg.model.num_languages
    if 0 < count < len(languages):
        raise ValueError(
            f"model.num_languages ({count}) must be >= the run's languages ({len(languages)}: "
            f"{', '.join(languages)}), which index the language embeddings"
        )


def loader_rank_state(
    loader: StreamingLoader, *, dp_rank: int, dp_world_size: int, num_workers: int
) -> dict[str, Any]:
    """The loader part of a rank's checkpoint state: ``{"loader": state, "dp": {"rank",
    "world_size", "num_workers"}}`` (the dp coordinate lets a resume keep one state per dp
    rank)."""
    return {
        "loader": loader.state_dict(),
        "dp": {"rank": dp_rank, "world_size": dp_world_size, "num_workers": num_workers},
    }


def _dp_of(state: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(dp rank, dp world size, workers)`` a saved rank state belongs to. Checkpoints from
    before ``"dp"`` was saved: the loader state's own fields."""
    if "dp" in state:
        dp = state["dp"]
        return int(dp["rank"]), int(dp["world_size"]), int(dp["num_workers"])
    loader = state["loader"]
    return int(loader["dp_rank"]), int(loader["dp_world_size"]), int(loader["num_workers"])


def _dp_holders(
    entries: Mapping[int, Mapping[str, Any]],
) -> tuple[tuple[int, int], dict[int, int]]:
    """``((old dp world size, old workers per rank), {dp rank: lowest global rank holding it}``
    from every saved rank's state or rank-index entry (anything :func:`_dp_of` reads).

    Raises:
        ValueError: the ranks disagree on the dp layout, or some old dp rank has no state.
    """
    layouts, holders = set(), {}
    for rank in sorted(entries):
        dp_rank, dp_world, workers = _dp_of(entries[rank])
        layouts.add((dp_world, workers))
        holders.setdefault(dp_rank, rank)
    if len(layouts) != 1:
        raise ValueError(f"checkpoint rank states disagree on the dp layout: {sorted(layouts)}")
    (layout,) = layouts
    if sorted(holders) != list(range(layout[0])):
        raise ValueError(
            f"checkpoint holds loader states of dp ranks {sorted(holders)} of dp world size "
            f"{layout[0]}: a resume needs every old dp rank's state"
        )
    return layout, holders


def loader_states_by_dp_rank(
    rank_states: Mapping[int, Mapping[str, Any]],
) -> tuple[tuple[int, int], dict[int, dict]]:
    """One loader state per old dp rank from every saved rank's state (the lowest global rank
    of each dp rank: its tp/pp/ep peers hold the same state).

    Returns:
        ``((old dp world size, old workers per rank), {dp rank: loader state})``.

    Raises:
        ValueError: the ranks disagree on the dp layout, or some old dp rank has no state.
    """
    layout, holders = _dp_holders(rank_states)
    return layout, {dp: rank_states[rank]["loader"] for dp, rank in holders.items()}


def loader_state_ranks(
    index: Mapping[int, Mapping[str, Any]],
    *,
    dp_rank: int,
    dp_world_size: int,
    num_workers: int,
) -> list[int]:
    """The saved ranks whose ``rank_<r>.pt`` hold the loader state(s) this rank resumes from,
    read from a checkpoint's rank index (``{rank: {"dp": {...}}}``, written at save): the one
    holding this dp rank's state when the dp layout is unchanged (exact resume), else one per
    old dp rank (elastic) — never one per old rank. The same ranks
    :func:`loader_states_by_dp_rank` takes its states from.

    Raises:
        ValueError: as :func:`loader_states_by_dp_rank`.
    """
    if not index:
        return []
    layout, holders = _dp_holders(index)
    if layout == (dp_world_size, num_workers):
        return [holders[dp_rank]]
    return [holders[r] for r in sorted(holders)]


def loader_resume_state(
    rank_states: Mapping[int, Mapping[str, Any]],
    *,
    dp_rank: int,
    dp_world_size: int,
    num_workers: int,
    index: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict | list[dict] | None:
    """What this rank's loader resumes from (``loader.load_state_dict``): its own dp rank's
    state when the dp layout (dp world size, workers per rank) is the one saved (exact resume),
    else one state per old dp rank (elastic: the loader re-deals the pass's remaining
    documents); None without saved rank states (an imported model: data from the start).

    Args:
        rank_states: saved rank states by rank: every rank's, or (with ``index``) at least
            those of :func:`loader_state_ranks`.
        index: the checkpoint's rank index entries (``{rank: {"dp": {...}}}``), which give the
            dp layout without every rank's state; None: ``rank_states`` holds every rank.

    Raises:
        ValueError: as :func:`loader_states_by_dp_rank`; a rank :func:`loader_state_ranks`
            names missing from ``rank_states``.
    """
    if not rank_states:
        return None
    if index is None:
        layout, states = loader_states_by_dp_rank(rank_states)
        if layout == (dp_world_size, num_workers):
            return states[dp_rank]
        return [states[r] for r in sorted(states)]
    layout, holders = _dp_holders(index)
    exact = layout == (dp_world_size, num_workers)
    ranks = [holders[dp_rank]] if exact else [holders[r] for r in sorted(holders)]
    missing = [r for r in ranks if r not in rank_states]
    if missing:
        raise ValueError(f"checkpoint rank states of ranks {missing} are needed but not read")
    if exact:
        return rank_states[ranks[0]]["loader"]
    return [rank_states[r]["loader"] for r in ranks]


def read_resume_rank_states(
    path: str | os.PathLike,
    *,
    rank: int,
    world_size: int,
    dp_rank: int,
    dp_world_size: int,
    num_workers: int,
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]] | None, bool]:
    """The saved rank states a resuming rank needs from checkpoint ``path``, reading only
    those files: with a rank index (``pretrain.checkpoint.read_rank_index``) its own
    ``rank_<rank>.pt`` when the world size is unchanged (its RNG states) plus the files of
    :func:`loader_state_ranks` (one for an exact resume, one per old dp rank for an elastic
    one); without one (an older checkpoint) every rank file.

    Returns:
        ``(rank states by rank, the index entries or None, whether the world size is the saved
        one)``; hand the first two to :func:`loader_resume_state` (``index=``).

    Raises:
        ValueError: as :func:`loader_state_ranks`.
    """
    from pretrain.checkpoint import read_rank_index, read_rank_states

    index = read_rank_index(path)
    if index is None:
        rank_states = read_rank_states(path)
        return rank_states, None, len(rank_states) == world_size
    same_world = index["world_size"] == world_size
    needed = loader_state_ranks(
        index["ranks"], dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=num_workers
    )
    rank_states = read_rank_states(path, ranks=[*needed, rank] if same_world else needed)
    return rank_states, index["ranks"], same_world
