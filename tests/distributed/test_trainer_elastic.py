"""Resume at another data-parallel layout, at the trainer level: tp2 -> dp2, pp2 -> 1 process
and dp2 -> dp1 -> dp2 each resume, and the documents of the pass are neither lost nor repeated.

How documents are counted: every rank's loader logs each document it starts (``track_docs``,
in process, so what the trainer consumed; one log per dp rank, since tp/pp peers read the same
batches). After the last phase the rest of the pass is dealt in one process from the last
checkpoint's loader states; the logs of all phases plus that rest must hold each document of
the first pass exactly once: as many distinct documents per language as the manifest counts
(a lost document would never appear) and none twice.

Also here: ``tokens_per_lang`` in ``metrics.jsonl`` is the global count of a step (the sum of
the dp ranks' batches, tp peers counted once), and a checkpoint written by tp peers reshards to
another dp size (``checkpoints_tools reshard``) with one loader state per new dp rank.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from pretrain.checkpoint import complete_checkpoints
from pretrain.data import build_train_loader, loader_resume_state
from tests.distributed.trainer_runs import logged_losses as _losses
from tests.distributed.trainer_runs import trainer_config as _cfg

BASE = ("checkpoint.every=0", "train.eval_every=0", "data.valid_manifest=")


def _run_logged(rank: int, world_size: int, cfg) -> dict:
    """One rank of a phase; its consumed document log and each step's batch token counts."""
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    trainer.loader.dataset.track_docs = True  # read when iteration starts (in fit)
    step_fn, tokens = trainer.train_step, []

    def step(batches):
        tokens.append([int(x) for x in sum(b["tokens_per_lang"] for b in batches).tolist()])
        return step_fn(batches)

    trainer.train_step = step
    code = trainer.fit()
    return {
        "code": code,
        "dp_rank": trainer.dims.dp_rank,
        "docs": list(trainer.loader.dataset.doc_log),
        "tokens": tokens,
        "languages": trainer.languages,
    }


def _phase(shards, run_dir: Path, world_size: int, *extra: str) -> list[dict]:
    cfg = _cfg("tiny_decoder.yaml", shards, run_dir, *BASE, *extra)
    results = run_distributed(_run_logged, world_size=world_size, args=(cfg,))
    assert [r["code"] for r in results] == [0] * world_size
    return results


def _dp_logs(results: list[dict]) -> list[list[tuple]]:
    """One document log per dp rank (tp/pp peers consume the same batches: the same log)."""
    by_dp: dict[int, list[tuple]] = {}
    for result in results:
        if result["dp_rank"] in by_dp:
            assert by_dp[result["dp_rank"]] == result["docs"]  # peers agree
        by_dp.setdefault(result["dp_rank"], result["docs"])
    return [by_dp[d] for d in sorted(by_dp)]


def _documents_per_language(cfg) -> dict[str, int]:
    from data_pipeline.manifest import load_manifest, manifest_path

    manifest = load_manifest(manifest_path(cfg.data.manifest))
    return {lang: int(v["documents"]) for lang, v in manifest["languages"].items()}


def _first_pass(log: list[tuple]) -> Counter:
    """How often each document ``(source, file, ordinal)`` started in the first pass."""
    return Counter(tuple(entry[:-1]) for entry in log if entry[-1] == 0)


def _check_every_document_once(shards, run_dir: Path, phases: list[list[dict]]) -> None:
    cfg = _cfg("tiny_decoder.yaml", shards, run_dir, *BASE)
    documents = _documents_per_language(cfg)
    log = [entry for results in phases for dp_log in _dp_logs(results) for entry in dp_log]
    seen = _first_pass(log)
    assert seen and max(seen.values()) == 1  # nothing repeated while training

    # The rest of the pass from the last checkpoint, in one process (the same re-dealing).
    last = complete_checkpoints(run_dir / "checkpoints")[-1][1]
    rank_states = {
        int(f.stem.split("_")[1]): torch.load(f, weights_only=True) for f in last.glob("rank_*.pt")
    }
    tail = build_train_loader(cfg, dp_rank=0, dp_world_size=1).dataset
    tail.load_state_dict(loader_resume_state(rank_states, dp_rank=0, dp_world_size=1,
                                             num_workers=0))  # fmt: skip
    tail.track_docs = True
    batches = iter(tail)

    def distinct() -> Counter:
        return Counter(name for name, *_ in seen)

    for _ in range(5_000):  # about 15 passes: a shuffle buffer may hold a sample back long
        if distinct() == Counter(documents):
            break
        before = len(tail.doc_log)
        next(batches)
        seen.update(_first_pass(tail.doc_log[before:]))
    repeated = {doc: n for doc, n in seen.items() if n > 1}
    assert not repeated, sorted(repeated)[:5]
    assert distinct() == Counter(documents)  # every document of the pass, once


def _metric_tokens(run_dir: Path) -> dict[int, dict[str, int]]:
    from pretrain.plots import read_metrics

    return {r["step"]: r["tokens_per_lang"] for r in read_metrics(run_dir / "metrics.jsonl")}


def _check_global_tokens(run_dir: Path, results: list[dict]) -> None:
    """The logged per-step count is the sum of the dp ranks' batches (peers once)."""
    logged = _metric_tokens(run_dir)
    languages = results[0]["languages"]
    per_dp = {r["dp_rank"]: r["tokens"] for r in results}
    for index in range(len(results[0]["tokens"])):
        total = [sum(per_dp[d][index][i] for d in per_dp) for i in range(len(languages))]
        expected = {lang: n for lang, n in zip(languages, total) if n}
        assert logged[index + 1] == expected, index + 1


def test_tp2_resumes_on_dp2(shards, tmp_path: Path):
    run_dir = tmp_path / "run"
    first = _phase(shards, run_dir, 2, "parallel.tp=2", "train.steps=6", "train.stop_at=3")
    _check_global_tokens(run_dir, first)  # tp peers: counted once
    second = _phase(shards, run_dir, 2, "train.steps=6", "train.resume=auto")
    assert {r["dp_rank"] for r in second} == {0, 1}
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    _check_every_document_once(shards, run_dir, [first, second])

    # The same change offline: reshard the tp2 checkpoint to dp2, one loader state per dp rank.
    from checkpoints_tools.convert import reshard

    step3 = run_dir / "checkpoints" / "step_3"
    reshard(step3, out=tmp_path / "dp2", overrides=["parallel.tp=1", "parallel.dp_shard=2"])
    states = [torch.load(tmp_path / "dp2" / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    assert [s["dp"] for s in states] == [
        {"rank": r, "world_size": 2, "num_workers": 0} for r in (0, 1)
    ]
    assert states[0]["loader"] != states[1]["loader"]


def test_pp2_with_document_masks_resumes_in_one_process(shards, tmp_path: Path):
    # The tiny preset as it is (document masking on) under PP2, then one process; its curve
    # follows an uninterrupted one-process run.
    run_dir = tmp_path / "run"
    first = _phase(shards, run_dir, 2, "parallel.pp=2", "parallel.microbatches=2",
                   "train.steps=6", "train.stop_at=3")  # fmt: skip
    second = _phase(shards, run_dir, 1, "train.steps=6", "train.resume=auto")
    _check_every_document_once(shards, run_dir, [first, second])
    _phase(shards, tmp_path / "one", 1, "train.steps=6")
    one, curve = _losses(tmp_path / "one"), _losses(run_dir)
    assert sorted(curve) == sorted(one) == list(range(1, 7))
    for step in one:
        assert curve[step] == pytest.approx(one[step], rel=1e-4), step


def test_dp2_dp1_dp2_resumes_and_logs_global_tokens(shards, tmp_path: Path):
    run_dir = tmp_path / "run"
    first = _phase(shards, run_dir, 2, "train.steps=6", "train.stop_at=2")
    _check_global_tokens(run_dir, first)  # the sum of both dp ranks' batches
    second = _phase(shards, run_dir, 1, "train.steps=6", "train.stop_at=4", "train.resume=auto")
    third = _phase(shards, run_dir, 2, "train.steps=6", "train.resume=auto")
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    _check_every_document_once(shards, run_dir, [first, second, third])
