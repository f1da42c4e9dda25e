"""One language index for a run: the tokenizer's language list, whatever the manifest holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.loader import StreamingDataset
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards

VOCAB = synthetic_vocab(512)
TOKENIZER_LANGS = ["de", "el", "en", "fr", "ja"]


def _shards(root: Path, docs: dict, *, pairs: dict | None = None, langs=TOKENIZER_LANGS) -> Path:
    write_synthetic_shards(root, docs=docs, pairs=pairs, sample_tokens=200)
    # the sidecar of the tokenizer the sharding job copies beside the shards (only its
    # language list is read when the vocab is given)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "spm.json").write_text(json.dumps({"languages": langs}))
    return root


def _ds(root: Path, **kw) -> StreamingDataset:
    args = dict(dp_rank=0, dp_world_size=1, seq_len=32, batch_size=4, vocab=VOCAB)
    return StreamingDataset(root, **{**args, **kw})


def test_train_and_valid_manifests_share_the_tokenizer_index(tmp_path: Path) -> None:
    train = _ds(_shards(tmp_path / "train", {"en": 80, "de": 40}, pairs={"en-ja": 30}))
    valid = _ds(_shards(tmp_path / "valid", {"el": 20, "fr": 20, "en": 20}))
    assert train.languages == valid.languages == TOKENIZER_LANGS
    assert train.lang_index["en"] == valid.lang_index["en"] == 2
    batch = next(iter(valid))
    assert batch["tokens_per_lang"].shape == (5,) and batch["docs_per_lang"].shape == (5,)
    assert set(batch["lang_ids"].unique().tolist()) <= {1, 2, 3}
    assert list(valid.counters["tokens"]) == TOKENIZER_LANGS


def test_an_explicit_language_list_wins(tmp_path: Path) -> None:
    ds = _ds(_shards(tmp_path, {"en": 30}), languages=["en", "zz"])
    assert ds.lang_index == {"en": 0, "zz": 1}


def test_a_language_outside_the_index_is_one_line(tmp_path: Path) -> None:
    root = _shards(tmp_path, {"en": 30, "ko": 10}, langs=["de", "en"])
    with pytest.raises(ValueError, match=r"manifest '.*' has language 'ko', which is not in the "):
        _ds(root)
    with pytest.raises(ValueError, match=r"has language 'en', which is not in the run's language"):
        _ds(root, languages=["ko"])


def test_without_a_tokenizer_sidecar_the_manifest_languages_are_used(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, docs={"en": 30, "de": 10}, sample_tokens=200)
    assert _ds(tmp_path).languages == ["de", "en"]
