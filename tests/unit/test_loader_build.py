"""``build_loader``: a typed ``DataConfig`` in, every field of it honoured."""

from __future__ import annotations

import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import StreamingDataset, build_loader
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import MaskingConfig

VOCAB = synthetic_vocab(512)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, docs={"en": 200, "de": 80}, pairs={"en-de": 60}, sample_tokens=150)
    return out


def _cfg(root: Path) -> DataConfig:
    return DataConfig(  # every field off its default
        manifest=str(root),
        alpha=0.7,
        language_weights={"en": 1.0, "de": 3.0},
        seq_len=48,
        batch_size=3,
        num_workers=0,
        shuffle_buffer=2,
        seed=11,
        pair_weights={"en-de": 2.0},
        reset_position_ids=True,
        min_carry_tokens=5,
        on_bad_shard="raise",
        tlm_swap_prob=0.25,
    )


def test_every_field_reaches_the_dataset(root: Path) -> None:
    cfg = _cfg(root)
    masking = MaskingConfig(tlm_share=0.5)
    loader = build_loader(
        cfg, dp_rank=1, dp_world_size=2, objective="mlm", masking=masking, seed=0, vocab=VOCAB
    )
    # the reference: the dataset built by hand from the same values
    want = StreamingDataset(
        str(root),
        dp_rank=1,
        dp_world_size=2,
        seq_len=48,
        batch_size=3,
        objective="mlm",
        vocab=VOCAB,
        masking=masking,
        alpha=0.7,
        language_weights={"en": 1.0, "de": 3.0},
        pair_weights={"en-de": 2.0},
        seed=11,
        num_workers=0,
        shuffle_buffer=2,
        reset_position_ids=True,
        min_carry_tokens=5,
        on_bad_shard="raise",
        tlm_swap_prob=0.25,
    )
    ds = loader.dataset
    for name in ("reset_position_ids", "min_carry_tokens", "on_bad_shard", "tlm_swap_prob"):
        assert getattr(ds, name) == getattr(want, name) == asdict(cfg)[name], name
    assert (ds.seed, ds.shuffle_buffer, ds.seq_len, ds.batch_size) == (11, 2, 48, 3)
    assert ds.mono_p == want.mono_p and ds.pair_p == want.pair_p
    assert ds.mono_p["de"] == pytest.approx(0.75)
    got, ref = iter(loader), iter(want)
    for _ in range(4):
        a, b = next(got), next(ref)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_seed_falls_back_to_the_argument_only_when_unset(root: Path) -> None:
    cfg = DataConfig(manifest=str(root), seq_len=32, batch_size=2)
    assert build_loader(cfg, dp_rank=0, dp_world_size=1, seed=5, vocab=VOCAB).dataset.seed == 5
    cfg.seed = 6
    assert build_loader(cfg, dp_rank=0, dp_world_size=1, seed=5, vocab=VOCAB).dataset.seed == 6


def test_a_config_that_is_not_a_data_config_is_refused(root: Path) -> None:
    # attribute look-alikes used to be read with getattr defaults for missing fields
    cfg = types.SimpleNamespace(**asdict(DataConfig(manifest=str(root))))
    with pytest.raises(
        TypeError, match=r"^build_loader: cfg \(SimpleNamespace\) must be a DataConfig$"
    ):
        build_loader(cfg, dp_rank=0, dp_world_size=1, vocab=VOCAB)
