"""Key/value cache for generation: the keys and values of the tokens seen so far, per attention.

What to call: ``cache = KVCache()``, then ``model(new_tokens, cache=cache, ...)`` (decoder
family: ``pretrain.models.transformer.Transformer.forward``; encoder-decoder: ``decode(...,
cache=cache)``) once per generation step; ``cache.select(index_B)`` for the cache of rows
``index_B`` (beam reordering, finished rows dropped). Guarantees: a forward over the new tokens
with the cache gives the same hidden states as a forward over the whole prefix without it (the
model computes the new tokens' positions and masks from ``cache.length``); the cache's tensors
are never modified in place, so a cache handed to ``select`` stays valid.

Each attention module holds one :class:`LayerKV` slot, keyed by its path in the model
(``layers.3.attention``); cross-attention slots hold the keys/values of the encoder memory,
computed at the first step and reused (``static``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerKV:
    """One attention module's cached ``k_BKSHd`` / ``v_BKSHd`` (heads before positions, as SDPA
    takes them); ``static``: computed once (cross-attention) rather than grown each step."""

    k_BKSHd: torch.Tensor | None = None
    v_BKSHd: torch.Tensor | None = None
    static: bool = False

    def extend(
        self, k_BKNHd: torch.Tensor, v_BKNHd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys/values; returns the whole ``(k_BKSHd, v_BKSHd)``."""
        if self.k_BKSHd is not None:
            k_BKNHd = torch.cat([self.k_BKSHd, k_BKNHd], dim=2)
            v_BKNHd = torch.cat([self.v_BKSHd, v_BKNHd], dim=2)
        self.k_BKSHd, self.v_BKSHd = k_BKNHd, v_BKNHd
        return k_BKNHd, v_BKNHd


@dataclass
class KVCache:
    """Per-attention :class:`LayerKV` slots and the number of cached positions ``length``
    (the same for every self-attention slot: the model advances it once per forward)."""

    layers: dict[str, LayerKV] = field(default_factory=dict)
    length: int = 0

    def slot(self, name: str, *, static: bool = False) -> LayerKV:
        """The slot of the attention module at ``name`` (created empty on first use)."""
        if name not in self.layers:
            self.layers[name] = LayerKV(static=static)
        return self.layers[name]

    def select(self, index_B: torch.Tensor) -> KVCache:
        """The cache of rows ``index_B`` (repeats allowed), as a new cache."""
        layers = {}
        for name, kv in self.layers.items():
            if kv.k_BKSHd is None:
                layers[name] = LayerKV(static=kv.static)
                continue
            layers[name] = LayerKV(
                kv.k_BKSHd.index_select(0, index_B), kv.v_BKSHd.index_select(0, index_B), kv.static
            )
        return KVCache(layers, self.length)
