"""Shared pytest set-up: markers, determinism, thread count, and the fixtures several test
directories use: ``shards`` (small real shards from the bundled sample) and ``clean``
(uncorrupted synthetic shards)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from data_pipeline.synthetic import write_synthetic_shards
from tests.sample_data import build_sample_shards


def pytest_configure(config: pytest.Config) -> None:
    # DeepSpeed's C++ ops (shared-memory comm, host Adam), built once by `make test`'s set-up:
    # a test run reuses them instead of compiling them again (minutes on 2 cores).
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR",
        str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions"),
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer and shards from the sample (``build_sample_shards``), built once per module:
    ``{"shards": DIR, "tok": DIR}``."""
    return build_sample_shards(tmp_path_factory.mktemp("trainer_data"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic shards, 300 en and 100 de documents of 200-token samples, built once per module
    (the loader error tests copy and corrupt them)."""
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, docs={"en": 300, "de": 100}, sample_tokens=200)
    return root
