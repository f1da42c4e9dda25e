"""ERNIE-M back-translation masked LM (``objective.weights={btmlm: 1}``): the row layout on real
tokens against a per-row reimplementation of the rule, the target-language draw, the loader's
batches and exact resume, the config rules, and the loss (placeholders filled with the
model's own argmax, then cross-entropy at the masked source positions) against the formula
written out here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.transforms import (
    IGNORE_INDEX,
    MaskingConfig,
    Vocab,
    btmlm_rows,
    btmlm_source_len,
    join_mono,
)
from pretrain.batches import model_inputs, target_side
from pretrain.config import load_config, validate_config
from pretrain.models import build_model
from pretrain.objectives import OBJECTIVES, ObjectiveMix
from tests.objective_checks import assert_resumes
from tests.sample_data import REPO, SAMPLE, first_lines

LANGS = ("en", "de", "ja")
T = 40


@pytest.fixture(scope="module")
def raw(tok_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``([M, n], [M])``: raw cuts of real documents (en, de, ja joined with eos) and the
    language index of each, ``n = btmlm_source_len(T)``."""
    tok = load_tokenizer(str(tok_dir))
    n = btmlm_source_len(T)
    rows, langs = [], []
    for index, lang in enumerate(LANGS):
        docs = tok.encode(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 60))
        flat = np.concatenate([np.array(d, dtype=np.int32) for d in docs])
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        ids, _ = join_mono(flat, offsets, eos_id=tok.special_ids["eos"])
        cut = len(ids) // n
        rows.append(ids[: cut * n].reshape(cut, n).astype(np.int32))
        langs += [index] * cut
    return np.concatenate(rows), np.array(langs)


def _tags(vocab: Vocab) -> np.ndarray:
    return np.array([vocab.lang_token_ids[lang] for lang in LANGS], dtype=np.int64)


def test_rows_follow_the_ernie_m_layout(raw, vocab: Vocab) -> None:
    raw_MR, lang_M = raw
    n = raw_MR.shape[1]
    targets = np.array([0, 1, 2])
    rng = np.random.default_rng(5)
    out = btmlm_rows(raw_MR, lang_M, seq_len=T, vocab=vocab, lang_tag_L=_tags(vocab),
                     targets=targets, cfg=MaskingConfig(), rng=rng)  # fmt: skip
    # The rule, row by row: one draw per row over the other languages, then the layout.
    draws = np.random.default_rng(5).integers(0, np.full(len(lang_M), 2))
    for m, (row, lang) in enumerate(zip(raw_MR.tolist(), lang_M.tolist())):
        others = [t for t in targets.tolist() if t != lang]
        target = others[draws[m]]
        assert out["target_M"][m] == target
        tag = vocab.lang_token_ids[LANGS[target]]
        layout = row + [vocab.eos_id, tag] + [vocab.mask_id] * n + [vocab.eos_id]
        layout += [vocab.pad_id] * (T - len(layout))
        assert out["source_ids"][m].tolist() == layout
        assert out["position_ids"][m].tolist() == [*range(n + 1), *range(n + 2)] + [0] * (
            T - 2 * n - 3
        )
        assert out["lang_ids"][m].tolist() == [lang] * (n + 1) + [target] * (n + 2) + [lang] * (
            T - 2 * n - 3
        )
        real = [True] * (2 * n + 3) + [False] * (T - 2 * n - 3)
        assert out["attention_mask"][m].tolist() == real
        assert out["doc_ids"][m].tolist() == [0 if r else -1 for r in real]
        assert out["placeholder_mask"][m].tolist() == [i in range(n + 2, 2 * n + 2)
                                                       for i in range(T)]  # fmt: skip
    # Masking only inside R: labels hold R's ids there, the rest of the input is the layout.
    labels, inputs, source = out["labels"], out["input_ids"], out["source_ids"]
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, n:].any()
    np.testing.assert_array_equal(labels[chosen], source[chosen])
    np.testing.assert_array_equal(inputs[:, n:], source[:, n:])
    np.testing.assert_array_equal(inputs[~chosen], source[~chosen])
    special = vocab.special_mask_V()
    maskable = ~special[raw_MR]
    rate = chosen[:, :n].sum() / maskable.sum()
    assert 0.13 < rate < 0.17, rate
    assert abs((inputs[chosen] == vocab.mask_id).mean() - 0.8) < 0.05


def test_targets_are_the_other_languages_uniformly(raw, vocab: Vocab) -> None:
    raw_MR, lang_M = raw
    counts = np.zeros((3, 3))
    rng = np.random.default_rng(0)
    for _ in range(20):
        out = btmlm_rows(raw_MR, lang_M, seq_len=T, vocab=vocab, lang_tag_L=_tags(vocab),
                         targets=np.array([0, 1, 2]), cfg=MaskingConfig(), rng=rng)  # fmt: skip
        np.add.at(counts, (lang_M, out["target_M"]), 1)
    assert np.all(np.diag(counts) == 0)
    # each other language half of a language's rows, within 4.5 binomial standard deviations
    rows_L = counts.sum(axis=1, keepdims=True)
    shares = counts / rows_L
    bound = 4.5 * np.sqrt(0.25 / rows_L)
    off = ~np.eye(3, dtype=bool)
    assert np.all((np.abs(shares - 0.5) < bound)[off]), shares
    # A language outside the targets draws from all of them.
    out = btmlm_rows(raw_MR, np.full(len(lang_M), 2), seq_len=T, vocab=vocab,
                     lang_tag_L=_tags(vocab), targets=np.array([0, 1]), cfg=MaskingConfig(),
                     rng=np.random.default_rng(0))  # fmt: skip
    assert set(out["target_M"].tolist()) == {0, 1}


def test_rows_refuse_what_cannot_be_laid_out(raw, vocab: Vocab) -> None:
    raw_MR, lang_M = raw
    common = dict(vocab=vocab, lang_tag_L=_tags(vocab), cfg=MaskingConfig())
    with pytest.raises(ValueError, match=r"btmlm rows of 18 raw tokens need seq_len >= 39"):
        btmlm_rows(raw_MR, lang_M, seq_len=38, targets=np.arange(3), rng=None, **common)
    with pytest.raises(ValueError, match=r"language index 0 has no other target language"):
        btmlm_rows(raw_MR, lang_M, seq_len=T, targets=np.array([0]),
                   rng=np.random.default_rng(0), **common)  # fmt: skip


def _loader(shards, vocab=None, **data):
    cfg = DataConfig(manifest=str(shards["shards"]), **{"seq_len": T, "batch_size": 4, **data})
    return build_loader(cfg, dp_rank=0, dp_world_size=1, objective="btmlm",
                        masking=MaskingConfig(), seed=2, vocab=vocab)  # fmt: skip


def test_loader_batches_and_exact_resume(shards) -> None:
    loader = _loader(shards)
    batches = iter(loader)
    first = next(batches)
    n = btmlm_source_len(T)
    assert first["input_ids"].shape == first["btmlm_source_ids"].shape == (4, T)
    assert first["placeholder_mask"].sum() == 4 * n
    assert int(first["tokens_per_lang"].sum()) == 4 * n
    ds = loader.dataset
    target_langs = first["lang_ids"][:, n + 1]
    assert bool((target_langs != first["lang_ids"][:, 0]).all())
    tags = ds.vocab.lang_token_ids
    for row, target in zip(first["btmlm_source_ids"].tolist(), target_langs.tolist()):
        assert row[n + 1] == tags[ds.languages[target]]
    assert_resumes(lambda: _loader(shards), skip=1, count=2)


def test_loader_needs_a_second_language_with_a_tag(shards) -> None:
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"data.seq_len \(4\) must be >= 5 for btmlm rows"):
        _loader(shards, seq_len=4)
    vocab = Vocab.from_tokenizer(str(shards["tok"]))
    only_en = replace(vocab, lang_token_ids={"en": vocab.lang_token_ids["en"]})
    with pytest.raises(ValueError, match=r"btmlm rows of 'en' need another language with a "
                                         r"<lang:xx> token"):  # fmt: skip
        _loader(shards, vocab=only_en)


def _validated(*overrides):
    cfg = load_config(REPO / "configs" / "tiny_encoder.yaml", ["train.run_dir=unused",
                                                                *overrides])  # fmt: skip
    validate_config(cfg)
    return cfg


def test_config_rules() -> None:
    assert OBJECTIVES["btmlm"].families == ("encoder",)
    cfg = _validated("objective.weights={btmlm: 1}")
    assert ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)[0] == "btmlm"
    with pytest.raises(ValueError, match=r"objective.weights.btmlm needs parallel.pp 1 \(got 2\)"):
        _validated("objective.weights={btmlm: 1}", "parallel.pp=2", "model.tie_embeddings=false",
                   "parallel.dp_shard=1")  # fmt: skip
    with pytest.raises(ValueError, match=r"ask for different batch transforms \(btmlm, mlm\)"):
        _validated("objective.weights={mlm: 1, btmlm: 1}")


def test_the_loss_is_mlm_over_the_source_given_the_models_own_fill(shards) -> None:
    """Step 1 fills each placeholder with the argmax of the model's logits on the unmasked row
    (special ids never); step 2's loss is the summed cross-entropy of the logits of the filled,
    masked row at R's masked positions."""
    cfg = load_config(REPO / "configs" / "tiny_encoder.yaml",
                      ["train.run_dir=unused", "model.vocab_size=2000", "model.num_languages=4",
                       "model.dropout=0.0"])  # fmt: skip
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = next(iter(_loader(shards)))
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    assert {"lang_ids_BT", "document_ids_BT", "position_ids_BT"} <= set(kwargs)
    mix = ObjectiveMix({"btmlm": 1.0})
    calls = []

    def logits_at(b, ids_BT, where_BT):
        calls.append(ids_BT)
        with torch.no_grad():
            return model(ids_BT, **model_inputs(b, cfg.model, torch.device("cpu")))[where_BT]

    filled = mix.prepare(batch, logits_at)
    assert len(calls) == 1 and calls[0] is batch["btmlm_source_ids"]
    # The formula, written out: argmax over the non-special ids at the placeholders.
    with torch.no_grad():
        logits = model(batch["btmlm_source_ids"], **kwargs)
    where = batch["placeholder_mask"]
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    allowed[list(load_tokenizer(str(shards["tok"])).special_ids.values())] = False
    allowed[batch["placeholder_excluded"]] = False
    fill = logits[where][:, allowed].argmax(-1)
    want_ids = batch["input_ids"].clone()
    want_ids[where] = torch.nonzero(allowed).squeeze(1)[fill].to(want_ids.dtype)
    torch.testing.assert_close(filled["input_ids"], want_ids, rtol=0, atol=0)
    assert not bool((filled["input_ids"][where] == 0).any())  # the fill is not the pad id
    # The placeholders change; nothing else does.
    changed = filled["input_ids"] != batch["input_ids"]
    assert bool(changed.any()) and not bool(changed[~where].any())
    # Step 2: the loss at R's masked positions, through the mix's chunked path.
    labels = mix.targets(batch["labels"])
    lang_ids, mask, pair_rows = target_side(filled)
    groups = mix.target_groups(lang_ids, mask, num_languages=4, pair_rows_B=pair_rows)
    hidden = model(filled["input_ids"], return_hidden=True, **kwargs)
    weight, bias = model.output_projection()
    loss, sums, counts = mix.loss(hidden, weight, bias, labels, groups, num_groups=4)
    full = model(want_ids, **kwargs)
    chosen = batch["labels"] != IGNORE_INDEX
    expected = F.cross_entropy(full[chosen], batch["labels"][chosen].long(), reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert int(counts.sum()) == int(chosen.sum()) == int(mix.num_targets(batch["labels"]))
    # Every target is a source token: grouped under its row's own language.
    row_lang = batch["lang_ids"][:, 0]
    per_lang = torch.bincount(row_lang.repeat_interleave(chosen.sum(1)), minlength=4)
    torch.testing.assert_close(counts, per_lang.float())
