"""Shared by the objective tests: a validated tiny-encoder config and the exact-resume check of a
loader.

What to call: ``encoder_config(*overrides)`` (``configs/tiny_encoder.yaml`` with a 2000-piece
vocabulary, validated: the objectives' model settings applied); ``assert_resumes(make_loader,
skip=, count=)`` (the batches after a saved state equal those of a fresh loader resumed from it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.sample_data import REPO


def encoder_config(*overrides: str):
    """``configs/tiny_encoder.yaml`` with ``model.vocab_size=2000`` and ``overrides``,
    validated (``pretrain.config.validate_config``)."""
    from pretrain.config import load_config, validate_config

    cfg = load_config(
        REPO / "configs" / "tiny_encoder.yaml",
        ["train.run_dir=unused", "model.vocab_size=2000", *overrides],
    )
    validate_config(cfg)
    return cfg


def assert_resumes(make_loader: Callable[[], object], *, skip: int = 1, count: int = 3) -> dict:
    """Read ``skip`` batches of ``make_loader()``, save its state, read ``count`` more; a new
    loader resumed from the state must give those ``count`` batches bit for bit. Returns the
    state."""
    loader = make_loader()
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    state = loader.state_dict()
    after = [next(batches) for _ in range(count)]
    resumed = make_loader()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for want in after:
        got = next(again)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    return state
