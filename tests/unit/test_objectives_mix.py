"""Multi-task mixing of the encoder's masked objectives in one batch (``objective.weights={mlm:
1, span: 1, tlm: 1}``): each objective's share of the global rows follows its weight within a
point over 8 steps, every language gets every transform, each row is masked by its own
objective's rule, an interrupted loader resumes to the same batches, and the loss groups follow
each row's transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.transforms import IGNORE_INDEX, ROW_TRANSFORMS
from pretrain.config import load_config, validate_config
from pretrain.objectives import ObjectiveMix
from tests.objective_checks import assert_resumes
from tests.sample_data import REPO
from tests.selections import runs_of

PAIR, MLM, SPAN = (ROW_TRANSFORMS.index(k) for k in ("pair", "mlm", "span"))
WEIGHTS = {"mlm": 1.0, "span": 2.0, "tlm": 1.0}


def _loaders(shards, weights, *, ranks: int, batch_size: int, seq_len: int = 64, **data):
    cfg = load_config(REPO / "configs" / "tiny_encoder.yaml", ["train.run_dir=unused"])
    cfg.objective.weights = dict(weights)
    validate_config(cfg)
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    data = DataConfig(manifest=str(shards["shards"]), seq_len=seq_len, batch_size=batch_size,
                      **data)  # fmt: skip
    return [
        build_loader(
            data, dp_rank=r, dp_world_size=ranks, objective=transform, masking=masking, seed=4
        )  # fmt: skip
        for r in range(ranks)
    ]


def test_row_shares_follow_the_weights_over_the_global_batch(shards) -> None:
    loaders = _loaders(shards, WEIGHTS, ranks=2, batch_size=16)
    iters = [iter(loader) for loader in loaders]
    kinds, langs, batches = [], [], []
    for _ in range(8):  # global steps: both ranks' batches
        for it in iters:
            batch = next(it)
            batches.append(batch)
            kinds.append(batch["row_transform"].numpy())
            langs.append(batch["lang_ids"][:, 0].numpy())
    kinds, langs = np.concatenate(kinds), np.concatenate(langs)
    assert len(kinds) == 8 * 32
    shares = np.bincount(kinds, minlength=len(ROW_TRANSFORMS)) / len(kinds)
    want = {PAIR: 0.25, MLM: 0.25, SPAN: 0.5}
    for kind, share in want.items():
        assert abs(shares[kind] - share) <= 0.01, shares
    # every language's monolingual rows get both transforms, near the 1 : 2 of the weights
    for lang in np.unique(langs[kinds != PAIR]):
        mono = kinds[(langs == lang) & (kinds != PAIR)]
        assert abs((mono == SPAN).mean() - 2 / 3) < 0.1, (lang, np.bincount(mono))
    # each row masked by its own rule: span rows select runs of whole words, BERT rows single
    # pieces; pair rows hold two languages
    runs = {MLM: [], SPAN: []}
    for batch in batches:
        labels = batch["labels"].numpy()
        for row, kind in enumerate(batch["row_transform"].tolist()):
            selected = labels[row] != IGNORE_INDEX
            assert selected.any()
            if kind == PAIR:
                real = batch["attention_mask"][row]
                assert len(set(batch["lang_ids"][row][real].tolist())) == 2
            else:
                runs[kind] += runs_of(selected)
    assert np.mean(runs[SPAN]) > 2.5 and np.mean(runs[MLM]) < 1.5


def test_no_language_is_tied_to_one_transform(shards) -> None:
    """Two languages alternating row by row and two transforms alternating row by row: each
    language still gets both (the transforms follow each language's own rows)."""
    (loader,) = _loaders(shards, {"mlm": 1.0, "span": 1.0}, ranks=1, batch_size=16,
                         language_weights={"en": 1.0, "de": 1.0})  # fmt: skip
    batches = iter(loader)
    kinds, langs = [], []
    for _ in range(8):
        batch = next(batches)
        kinds.append(batch["row_transform"].numpy())
        langs.append(batch["lang_ids"][:, 0].numpy())
    kinds, langs = np.concatenate(kinds), np.concatenate(langs)
    assert len(np.unique(langs)) == 2
    for lang in np.unique(langs):
        assert abs((kinds[langs == lang] == SPAN).mean() - 0.5) <= 1 / 32, lang


def test_one_kind_is_the_single_objectives_batch(shards) -> None:
    """{span: 1} through the mixed path's settings gives the batches the span loader gives."""
    (mixed,) = _loaders(shards, {"span": 1.0}, ranks=1, batch_size=8)
    data = DataConfig(manifest=str(shards["shards"]), seq_len=64, batch_size=8)
    alone = build_loader(data, dp_rank=0, dp_world_size=1, objective="span",
                         masking=mixed.dataset.masking, seed=4)  # fmt: skip
    for got, want in zip(iter(mixed), iter(alone)):
        torch.testing.assert_close(got["input_ids"], want["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(got["labels"], want["labels"], rtol=0, atol=0)
        break


def test_mixed_rows_resume_exactly(shards) -> None:
    assert_resumes(lambda: _loaders(shards, WEIGHTS, ranks=1, batch_size=8)[0])


def test_groups_follow_each_rows_transform() -> None:
    mix = ObjectiveMix({"mlm": 1.0, "tlm": 1.0, "span": 2.0})
    lang_ids = torch.tensor([[0, 0, 1], [2, 2, 2], [1, 1, 1]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    row_transform = torch.tensor([PAIR, SPAN, MLM], dtype=torch.int32)
    groups = mix.target_groups(lang_ids, mask, num_languages=3, row_transform_B=row_transform)
    # objectives in weight order: mlm 0, tlm 1, span 2
    assert groups.tolist() == [[3, 3, 4], [8, 8, 8], [1, 1, 1]]
    transform, masking = mix.loader_settings(load_config(
        REPO / "configs" / "tiny_encoder.yaml", ["train.run_dir=unused"]).objective)  # fmt: skip
    assert transform == "mlm" and masking.tlm_share == 0.25
    assert masking.mono_kinds == (("mlm", 1.0), ("span", 2.0))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"mlm": 1, "btmlm": 1}, r"ask for different batch transforms \(btmlm, mlm\)"),
        ({"mlm": 1, "clm": 1}, r"objective.weights.clm \('clm'\) needs model.family in decoder"),
    ],
)
def test_objectives_that_do_not_share_a_batch_are_refused(weights, message) -> None:
    cfg = load_config(REPO / "configs" / "tiny_encoder.yaml", ["train.run_dir=unused"])
    cfg.objective.weights = weights
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)
