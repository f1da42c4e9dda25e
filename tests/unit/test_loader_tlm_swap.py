"""``data.tlm_swap_prob``: the direction of each TLM pair is drawn per pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, validate_data
from data_pipeline.loader import StreamingDataset
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import MaskingConfig

VOCAB = synthetic_vocab(512)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pairs")
    written = write_synthetic_shards(
        root, docs={"en": 50}, pairs={"en-de": 400}, sample_tokens=300, max_doc_len=20
    )
    return root, written


def _ds(root: Path, **kw) -> StreamingDataset:
    args = dict(
        dp_rank=0,
        dp_world_size=1,
        seq_len=96,
        batch_size=4,
        vocab=VOCAB,
        seed=5,
        objective="mlm",
        masking=MaskingConfig(tlm_share=1.0, mask_prob=0.0),
    )
    return StreamingDataset(root, **{**args, **kw})


def _directions(ds: StreamingDataset, written: dict, batches: int) -> tuple[int, int]:
    """``(pairs, reversed pairs)`` over ``batches`` batches, each pair checked against the
    pairs written (either order), positions and language ids with it."""
    forward = {tuple(s.tolist()) + (3,) + tuple(t.tolist()) + (3,) for s, t in written}
    backward = {tuple(t.tolist()) + (3,) + tuple(s.tolist()) + (3,) for s, t in written}
    en, de = ds.lang_index["en"], ds.lang_index["de"]
    it = iter(ds)
    pairs = flipped = 0
    for _ in range(batches):
        batch = next(it)
        for b in range(batch["input_ids"].shape[0]):
            ids, doc = batch["input_ids"][b].numpy(), batch["doc_ids"][b].numpy()
            lang, pos = batch["lang_ids"][b].numpy(), batch["position_ids"][b].numpy()
            for d in range(doc.max() + 1):
                seg, lg, p = ids[doc == d], lang[doc == d], pos[doc == d]
                n_first = int(np.flatnonzero(seg == 3)[0]) + 1
                first = lg[0]
                assert (lg[:n_first] == first).all() and (lg[n_first:] == en + de - first).all()
                assert p.tolist() == list(range(n_first)) + list(range(len(seg) - n_first))
                key = tuple(seg.tolist())
                assert key in (backward if first == de else forward)
                pairs += 1
                flipped += int(first == de)
    return pairs, flipped


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_pairs_are_reversed_with_tlm_swap_prob(corpus, prob: float) -> None:
    root, written = corpus
    pairs, flipped = _directions(_ds(root, tlm_swap_prob=prob), written["pairs"]["en-de"], 40)
    assert pairs > 300
    if prob == 0.0:
        assert flipped == 0
    elif prob == 1.0:
        assert flipped == pairs
    else:  # binomial(pairs, 1/2): within 4 standard deviations
        assert abs(flipped - pairs / 2) < 4 * math.sqrt(pairs / 4), (flipped, pairs)


def test_swapped_pairs_resume_bit_for_bit(corpus) -> None:
    root, _ = corpus
    masking = MaskingConfig(tlm_share=0.5)
    ds = _ds(root, masking=masking)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))
    reference = [next(it) for _ in range(10)]
    resumed = _ds(root, masking=masking)
    resumed.load_state_dict(state)
    again = iter(resumed)
    for a in reference:
        b = next(again)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_tlm_swap_prob_is_checked() -> None:
    with pytest.raises(ValueError, match=r"^data.tlm_swap_prob \(1.5\) must be in \[0, 1\]$"):
        validate_data(DataConfig(tlm_swap_prob=1.5))
    assert DataConfig().tlm_swap_prob == 0.5


def test_tlm_swap_prob_is_checked_by_the_dataset(corpus) -> None:
    with pytest.raises(ValueError, match=r"^data.tlm_swap_prob \(-0.1\) must be in \[0, 1\]$"):
        _ds(corpus[0], tlm_swap_prob=-0.1)
