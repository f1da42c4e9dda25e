"""T5's prefix LM on an encoder-decoder (``objective.weights={prefix_lm: 1}``): each monolingual
row a raw cut split at a uniform point, the prefix for the encoder and the rest as the target
behind pad; the config rules."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.transforms import IGNORE_INDEX
from pretrain.config import load_config, validate_config
from pretrain.objectives import ObjectiveMix
from tests.sample_data import REPO

ENCDEC = REPO / "configs" / "tiny_encdec.yaml"


def _cfg(*overrides: str):
    cfg = load_config(ENCDEC, ["train.run_dir=unused", "model.vocab_size=2000", *overrides])
    validate_config(cfg)
    return cfg


def test_rows_are_a_raw_cut_split_at_a_uniform_point(shards) -> None:
    cfg = _cfg("objective.weights={prefix_lm: 1}", "data.seq_len=32")
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert transform == "seq2seq" and masking.prefix_lm
    data = DataConfig(manifest=str(shards["shards"]), seq_len=32, batch_size=8)
    loader = build_loader(data, dp_rank=0, dp_world_size=1, objective=transform, masking=masking,
                          seed=2)  # fmt: skip
    eos, pad = loader.dataset.vocab.eos_id, loader.dataset.vocab.pad_id
    assert loader.dataset.decoder_len == 32  # derived: data.seq_len
    splits = []
    for batch in [b for _, b in zip(range(6), loader)]:
        for row in range(8):
            src = batch["input_ids"][row][batch["attention_mask"][row]]
            n = int(batch["decoder_attention_mask"][row].sum())
            tgt = batch["labels"][row][:n]
            assert bool((batch["labels"][row][n:] == IGNORE_INDEX).all())
            assert int(src[-1]) == eos and int(tgt[-1]) == eos
            # the raw cut: min(S, T) - 1 = 31 tokens, split between the two sides
            assert len(src) - 1 + n - 1 == 31
            assert 1 <= len(src) - 1 <= 30
            splits.append(len(src) - 1)
            dec = batch["decoder_input_ids"][row][:n]
            assert int(dec[0]) == pad and torch.equal(dec[1:], tgt[:-1])
    # uniform over 1..30: 48 draws spread over the range (a fixed split would give one value)
    assert len(set(splits)) > 15 and min(splits) < 8 and max(splits) > 23, sorted(splits)


def test_config_rules() -> None:
    mix = ObjectiveMix.from_config(_cfg("objective.weights={prefix_lm: 3, translation: 1}"))
    assert mix.names == ["prefix_lm", "translation"]
    with pytest.raises(ValueError, match=r"\(t5, prefix_lm\) all take the mono rows"):
        _cfg("objective.weights={t5: 1, prefix_lm: 1}")
    with pytest.raises(ValueError, match=r"must be >= 3 for prefix-LM rows"):
        _cfg("objective.weights={prefix_lm: 1}", "objective.decoder_len=2")
