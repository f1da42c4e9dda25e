"""Shared pieces of the per-family state-dict adapters (torchtitan ``state_dict_adapter`` style).

What to call (from an adapter): ``require(key, value=v, expected=e, target=cls)`` /
``require_hf(key, value=v, expected=e, source=cls)`` raise the one-line ``ValueError`` for a
value the other side cannot represent; ``rename(state_dict, table=...)`` renames every key
(``ValueError`` for a key the table does not know); ``rope_theta_of(hf_config, source=cls)``
gives the default-RoPE base (``ValueError`` for a scaled RoPE variant); ``as_config(hf_config,
model_type)`` gives a transformers config object from an object or a ``config.json`` dict.

An adapter converts between our model's state dict and a transformers model's *in-memory* state
dict (``model.state_dict()`` of the transformers class, which is what ``from_pretrained`` gives
from any on-disk layout and what ``save_pretrained`` writes back out). Weights are only renamed,
concatenated or split; values are never changed, so a round trip is bit-exact.

transformers is imported inside functions only: importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


def require(key: str, *, value: Any, expected: Any, target: str) -> None:
    """Raise the one-line error for a config value the export target cannot represent.

    Raises:
        ValueError: ``value != expected``.
    """
    if value != expected:
        raise ValueError(f"model.{key} ({value!r}) must be {expected!r} to export to {target}")


def require_hf(key: str, *, value: Any, expected: Any, source: str) -> None:
    """Raise the one-line error for a transformers config value our models cannot represent.

    Raises:
        ValueError: ``value != expected``.
    """
    if value != expected:
        raise ValueError(f"{source} config {key} ({value!r}) must be {expected!r} to import")


def rope_theta_of(hf_config: Any, *, source: str) -> float:
    """The default-RoPE base of a transformers config (v5 ``rope_parameters`` or legacy field).

    Raises:
        ValueError: a scaled RoPE variant (llama3, yarn, ...), which our models do not implement.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    require_hf("rope_parameters.rope_type", value=rope_type, expected="default", source=source)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{source} config has no rope_theta")
    return float(theta)


def rename(state_dict: StateDict, *, table: dict[str, str]) -> StateDict:
    """Rename every key through ``table``; every key must be covered.

    Raises:
        ValueError: a key the table does not know (a state dict of another shape).
    """
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if key not in table:
            raise ValueError(f"state dict key {key!r} has no mapping for this model family")
        out[table[key]] = tensor
    return out


def as_config(hf_config: Any, model_type: str) -> Any:
    """A transformers config object from an object or a plain dict (``config.json`` contents)."""
    if isinstance(hf_config, dict):
        from transformers import AutoConfig

        fields = {k: v for k, v in hf_config.items() if k != "model_type"}
        return AutoConfig.for_model(hf_config.get("model_type", model_type), **fields)
    return hf_config
