"""Loader state: exact resume per simulated rank, worker processes, elastic world-size change."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import StreamingDataset, StreamingLoader
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import MaskingConfig

VOCAB = synthetic_vocab(512)
DOCS = {"en": 500, "de": 200, "el": 15}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, docs=DOCS, pairs={"en-de": 120}, sample_tokens=200)
    return root


def _ds(root: Path, *, rank: int = 0, world: int = 1, **kw) -> StreamingDataset:
    args = dict(seq_len=48, batch_size=3, vocab=VOCAB, seed=3, shuffle_buffer=4)
    return StreamingDataset(root, dp_rank=rank, dp_world_size=world, **{**args, **kw})


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


KINDS = {
    "clm": {},
    "clm_reset_carry": {"reset_position_ids": True, "min_carry_tokens": 5},
    "mlm_tlm": {"objective": "mlm", "masking": MaskingConfig(tlm_share=0.4, whole_word=True)},
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_is_bit_for_bit(root: Path, kind: str, rank: int) -> None:
    ds = _ds(root, rank=rank, world=2, **KINDS[kind])
    it = iter(ds)
    _take(it, 7)
    state = json.loads(json.dumps(ds.state_dict()))  # survives JSON (any checkpoint format)
    reference = _take(it, 9)
    resumed = _ds(root, rank=rank, world=2, **KINDS[kind])
    resumed.load_state_dict(state)
    assert _same(_take(iter(resumed), 9), reference)
    # and from the list of every rank's state (what the trainer passes on elastic resume)
    other = _ds(root, rank=1 - rank, world=2, **KINDS[kind])
    again = _ds(root, rank=rank, world=2, **KINDS[kind])
    again.load_state_dict([other.state_dict(), state])
    assert _same(_take(iter(again), 9), reference)
    assert again.counters == resumed.counters


def test_ranks_differ_and_seeds_matter(root: Path) -> None:
    a = _take(iter(_ds(root, rank=0, world=2)), 2)
    b = _take(iter(_ds(root, rank=1, world=2)), 2)
    c = _take(iter(_ds(root, rank=0, world=2, seed=4)), 2)
    assert not _same(a, b) and not _same(a, c)


@pytest.mark.parametrize(
    "kw",
    [
        {"objective": "mlm", "masking": MaskingConfig(tlm_share=0.5)},
        # CLM batches share their position_ids / attention_mask tensors: they must cross the
        # worker boundary unchanged batch after batch
        {"objective": "clm"},
    ],
    ids=["mlm_tlm", "clm"],
)
def test_worker_processes_give_the_in_process_batches_and_resume(root: Path, kw: dict) -> None:
    kw = {"num_workers": 2, **kw}
    reference = _take(iter(_ds(root, **kw)), 9)
    loader = StreamingLoader(_ds(root, **kw))
    it = iter(loader)
    assert _same(_take(it, 5), reference[:5])
    state = loader.state_dict()
    assert state["next_worker"] == 1  # the 6th batch comes from the second worker
    del it
    resumed = StreamingLoader(_ds(root, **kw))
    resumed.load_state_dict(state)
    assert _same(_take(iter(resumed), 4), reference[5:])


def _pending(ds: StreamingDataset) -> dict[str, int]:
    """Smallest position any slot still owns, per source (whether pass 0 is finished)."""
    low = {}
    for slot in ds.state_dict()["slots"]:
        for name, st in slot["streams"].items():
            owned = [r[0] for r in st["ranges"]] + st["buffer"] + [p[0] for p in st["partials"]]
            low[name] = min(low.get(name, 1 << 60), *owned)
    return low


@pytest.mark.parametrize(("old_world", "new_world", "new_workers"), [(2, 3, 0), (3, 1, 2)])
def test_elastic_resume_loses_and_repeats_no_document(
    root: Path, old_world: int, new_world: int, new_workers: int
) -> None:
    kw = {
        "seq_len": 40,
        "batch_size": 2,
        "track_docs": True,
        "language_weights": {"en": 1, "de": 1, "el": 1},
    }
    old = [_ds(root, rank=r, world=old_world, **kw) for r in range(old_world)]
    log: list[tuple] = []
    for r, ds in enumerate(old):
        _take(iter(ds), 9 + 4 * r)  # ranks stopped at different points of their streams
        log += ds.doc_log
    states = [ds.state_dict() for ds in old]
    new = [
        _ds(root, rank=r, world=new_world, num_workers=new_workers, **kw) for r in range(new_world)
    ]
    for ds in new:
        ds.load_state_dict(states[::-1])  # every old rank's state, in any order
        it = iter(ds)
        while (
            min(_pending(ds)[n] >= ds.sources[n].num_samples for n in ("en", "de", "el")) is False
        ):
            next(it)
        log += ds.doc_log
    seen = Counter((name, doc) for name, _, doc, pass_index in log if pass_index == 0)
    for lang, num_docs in DOCS.items():
        counts = [seen[(lang, d)] for d in range(num_docs)]
        assert counts == [1] * num_docs, (lang, Counter(counts))
    later = Counter(entry for entry in log if entry[3] > 0)
    assert max(later.values()) == 1  # no repeats in the next passes either
    # counters survive the re-dealing: the new ranks' totals include the old ranks' totals
    old_docs = sum(sum(ds.counters["documents"].values()) for ds in old)
    assert sum(sum(ds.counters["documents"].values()) for ds in new) == len(log)
    assert len(log) > old_docs


def test_elastic_resume_needs_every_old_rank(root: Path) -> None:
    old = [_ds(root, rank=r, world=2) for r in range(2)]
    new = _ds(root, rank=0, world=3)
    with pytest.raises(
        ValueError, match=r"covers ranks \[1\] of dp world size 2: .*every old rank"
    ):
        new.load_state_dict([old[1].state_dict()])


def test_state_of_another_seed_is_refused(root: Path) -> None:
    state = _ds(root).state_dict()
    with pytest.raises(ValueError, match="another manifest or seed"):
        _ds(root, seed=99).load_state_dict(state)
