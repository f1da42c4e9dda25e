"""The global language schedule: one row sequence dealt over (dp rank, worker, row).

28 synthetic languages with a 400x size spread, dp 4: the mix of every window of global steps
follows p_l, ranks emit different sequences, every rank reads every language, and resume
(exact and elastic, dp 4 -> dp 2 x 2 workers -> dp 4) continues the same global sequence with
no document of the pass lost or repeated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import StreamingDataset
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards

VOCAB = synthetic_vocab(512)
LANGS = [f"l{i:02d}" for i in range(28)]
# documents per language: 2 .. 800, a 400x spread
DOCS = {lang: round(2 * 400 ** (i / 27)) for i, lang in enumerate(LANGS)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("langs28")
    write_synthetic_shards(root, docs=DOCS, sample_tokens=150, max_doc_len=30)
    return root


def _ds(root: Path, *, rank: int, world: int, **kw) -> StreamingDataset:
    args = dict(seq_len=16, batch_size=8, vocab=VOCAB, seed=11, shuffle_buffer=4)
    return StreamingDataset(root, dp_rank=rank, dp_world_size=world, **{**args, **kw})


def _row_langs(batch: dict) -> list[int]:
    return batch["lang_ids"][:, 0].tolist()


def _run(datasets: list[StreamingDataset], steps: int) -> list[list[dict]]:
    """``steps`` global steps: one batch of every rank each."""
    its = [iter(ds) for ds in datasets]
    return [[next(it) for it in its] for _ in range(steps)]


def test_every_window_of_global_steps_follows_p(root: Path) -> None:
    ranks = [_ds(root, rank=r, world=4) for r in range(4)]
    p = ranks[0].mono_p
    assert max(DOCS.values()) / min(DOCS.values()) == 400
    steps = _run(ranks, 40)
    tokens_SL = np.array([sum(b["tokens_per_lang"].numpy() for b in step) for step in steps])
    p_L = np.array([p[lang] for lang in ranks[0].languages])
    for first in range(len(steps) - 8 + 1):
        window = tokens_SL[first : first + 8].sum(axis=0)
        share = window / window.sum()
        assert np.abs(share - p_L).max() < 0.01, (first, np.abs(share - p_L).max())
    # (b) the ranks' per-step sequences differ: not in lockstep
    seqs = [[tuple(_row_langs(step[r])) for step in steps] for r in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert sum(x != y for x, y in zip(seqs[a], seqs[b])) > 0.9 * len(steps)
    # a global batch holds many more languages than one rank's batch_size
    assert min(len({x for b in step for x in _row_langs(b)}) for step in steps) > 8


def test_every_rank_reads_every_language(root: Path) -> None:
    ranks = [_ds(root, rank=r, world=4) for r in range(4)]
    steps = _run(ranks, 60)
    for r in range(4):
        seen = Counter(x for step in steps for x in _row_langs(step[r]))
        assert len(seen) == len(LANGS), r


def test_aligned_dealing_still_reaches_every_language(tmp_path: Path) -> None:
    # p = 1/3 each, B = 2, dp = 3: a contiguous dealing of the sequence A B C A B C would give
    # rank 0 only A and B, forever; the step's permutation deals every language to every rank
    write_synthetic_shards(tmp_path, docs={"a": 60, "b": 60, "c": 60}, sample_tokens=100)
    kw = {"batch_size": 2, "language_weights": {"a": 1, "b": 1, "c": 1}}
    ranks = [_ds(tmp_path, rank=r, world=3, **kw) for r in range(3)]
    steps = _run(ranks, 60)
    for r in range(3):
        seen = Counter(x for step in steps for x in _row_langs(step[r]))
        assert sorted(seen) == [0, 1, 2] and min(seen.values()) > 25, (r, seen)
    # and the global step holds each language twice
    assert all(Counter(x for b in step for x in _row_langs(b)) == {0: 2, 1: 2, 2: 2}
               for step in steps)  # fmt: skip


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_exact_resume_at_dp4_is_bit_for_bit(root: Path) -> None:
    for kw in ({}, {"num_workers": 2}):
        ds = _ds(root, rank=2, world=4, **kw)
        it = iter(ds)
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(ds.state_dict()))
        reference = [next(it) for _ in range(12)]
        resumed = _ds(root, rank=2, world=4, **kw)
        resumed.load_state_dict(state)
        again = iter(resumed)
        assert _same([next(again) for _ in range(12)], reference)


def _pass0_done(datasets: list[StreamingDataset]) -> bool:
    """Whether every slot has pulled every position of pass 0 of every source."""
    for ds in datasets:
        for slot in ds.state_dict()["slots"]:
            for name, st in slot["streams"].items():
                owned = [r[0] for r in st["ranges"]] + st["buffer"] + [p[0] for p in st["partials"]]
                if min(owned) < ds.sources[name].num_samples:
                    return False
    return True


def test_elastic_resume_continues_the_global_sequence(root: Path) -> None:
    kw = {"track_docs": True}
    dp4 = [_ds(root, rank=r, world=4, **kw) for r in range(4)]
    first = _run(dp4, 10)
    log = [e for ds in dp4 for e in ds.doc_log]
    states = [ds.state_dict() for ds in dp4]
    # the uninterrupted dp 4 run, for the global sequence it would go on with
    ref4 = [_ds(root, rank=r, world=4) for r in range(4)]
    reference = _run(ref4, 14)[10:]
    # dp 2 x 2 workers (four slots again, but two per rank): two steps of 16 rows cover the
    # 32 rows of one dp 4 step, in the same global sequence
    dp2 = [_ds(root, rank=r, world=2, num_workers=2, **kw) for r in range(2)]
    for ds in dp2:
        ds.load_state_dict(states)
    second = _run(dp2, 8)
    for j in range(4):
        got = Counter(x for step in second[2 * j : 2 * j + 2] for b in step for x in _row_langs(b))
        want = Counter(x for b in reference[j] for x in _row_langs(b))
        assert got == want, j
    # back to dp 4, then on until every slot is past pass 0 of every language
    states = [ds.state_dict() for ds in dp2]
    log += [e for ds in dp2 for e in ds.doc_log]
    back = [_ds(root, rank=r, world=4, **kw) for r in range(4)]
    for ds in back:
        ds.load_state_dict(states)
    its = [iter(ds) for ds in back]
    steps = 0
    while not _pass0_done(back):  # checked every 5 steps (a state_dict per slot is not free)
        for _ in range(5):
            for it in its:
                next(it)
        steps += 5
    assert steps > 20
    log += [e for ds in back for e in ds.doc_log]
    seen = Counter((name, doc) for name, _, doc, pass_index in log if pass_index == 0)
    for lang, num_docs in DOCS.items():
        counts = [seen[(lang, d)] for d in range(num_docs)]
        assert counts == [1] * num_docs, (lang, Counter(counts))
    assert max(Counter(e for e in log if e[3] > 0).values()) == 1
    assert first and second


def test_states_of_the_per_slot_schedule_are_refused(root: Path) -> None:
    state = _ds(root, rank=0, world=1).state_dict()
    state["format"] = "rosetta-loader/1"
    with pytest.raises(ValueError, match=r"^loader state format \('rosetta-loader/1'\) must be"):
        _ds(root, rank=0, world=1).load_state_dict(state)


def test_a_new_batch_size_starts_a_generation_after_the_rows_consumed(root: Path) -> None:
    ds = _ds(root, rank=0, world=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    resumed = _ds(root, rank=0, world=2, batch_size=4)
    resumed.load_state_dict(ds.state_dict())
    slot = resumed.state_dict()["slots"][0]
    assert (slot["row0"], slot["batches"]) == (3 * 2 * 8, 0)
    assert next(iter(resumed))["input_ids"].shape == (4, 16)


def test_row_lookups_agree_with_the_sorted_span(root: Path, monkeypatch) -> None:
    # past PLAN_ROWS rows per step a slot looks each row up alone (dp in the thousands):
    # the same sources, so the same batches, as sorting its span of the sequence
    from data_pipeline import loader
    from data_pipeline.transforms import MaskingConfig

    write_synthetic_shards(root / "with_pairs", docs=DOCS, pairs={"l00-l27": 60, "l05-l20": 90})
    kw = {"objective": "mlm", "masking": MaskingConfig(tlm_share=0.3), "num_workers": 2}
    runs = []
    for plan_rows in (loader.PLAN_ROWS, 1):
        monkeypatch.setattr(loader, "PLAN_ROWS", plan_rows)
        runs.append(_run([_ds(root / "with_pairs", rank=r, world=3, **kw) for r in range(3)], 9))
    for a, b in zip(*runs):
        assert all(_same([x], [y]) for x, y in zip(a, b))

    def tlm_rows(b: dict) -> int:  # TLM rows hold two languages (mono rows one)
        return int((b["lang_ids"] != b["lang_ids"][:, :1]).any(dim=1).sum())

    per_rank = [tlm_rows(b) for step in runs[0] for b in step]
    assert len(set(per_rank)) > 1  # a rank's TLM row count varies
    assert {sum(tlm_rows(b) for b in step) for step in runs[0]} <= {7, 8}  # 0.3 x 24 a step
