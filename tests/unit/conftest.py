"""Fixtures shared by the unit tests: a real sentencepiece tokenizer on the sample corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.text_inputs import MonoInput
from data_pipeline.tokenizer import train_tokenizer
from data_pipeline.transforms import Vocab
from tests.sample_data import SAMPLE, first_lines

TOKENIZER_LANGS = ("en", "de", "ja")
"""Languages of ``tok_dir``: two with spaces, one without."""


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sentencepiece tokenizer (1,500 pieces, the reserved sentinels and language tokens)
    trained on the first 200 train lines of en, de and ja of the sample corpus."""
    root = tmp_path_factory.mktemp("sample_tok")
    inputs = []
    for lang in TOKENIZER_LANGS:
        path = root / f"{lang}.txt"
        lines = first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 200)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        inputs.append(MonoInput(lang, (path,)))
    train_tokenizer(inputs, out=root / "tok", vocab_size=1500, seed=0, num_threads=1)
    return root / "tok"


@pytest.fixture(scope="session")
def vocab(tok_dir: Path) -> Vocab:
    """``tok_dir``'s ``transforms.Vocab``."""
    return Vocab.from_tokenizer(str(tok_dir))
