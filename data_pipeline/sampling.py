"""Alpha-smoothed language sampling, shared by tokenizer training and the streaming loader.

What to call: ``language_probabilities(counts, alpha=)`` (p_l of every language, alpha checked
by ``check_alpha``), ``natural_probabilities(counts)``, ``RowSchedule`` (the loader's global,
seeded row schedule: which source each global row comes from; exact resume from a row index).

With ``n_l`` the amount of data in language ``l`` (tokens, characters or documents: the caller
chooses the unit) and ``N = sum_k n_k``::

    q_l = n_l / N
    p_l = q_l^alpha / sum_k q_k^alpha

``alpha = 1`` keeps the natural distribution, ``alpha -> 0`` approaches uniform; XLM-R used 0.3,
mT5 0.3, XLM 0.5. Languages with ``n_l == 0`` get ``p_l == 0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def check_alpha(alpha: float, *, name: str = "alpha") -> float:
    """Return ``alpha`` as a float after checking it lies in (0, 1].

    Raises:
        ValueError: ``alpha`` is not a finite number in (0, 1].
    """
    value = float(alpha)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} ({alpha}) must be in (0, 1]")
    return value


def language_probabilities(counts: Mapping[str, int | float], *, alpha: float) -> dict[str, float]:
    """Alpha-smoothed sampling probabilities ``p_l`` for per-language data sizes ``counts``.

    Args:
        counts: ``{lang: n_l}``, sizes in any one unit; order is kept in the result.
        alpha: smoothing exponent in (0, 1].

    Returns:
        ``{lang: p_l}``, summing to 1.

    Raises:
        ValueError: alpha outside (0, 1], a negative count, or no data at all.
    """
    alpha = check_alpha(alpha)
    for lang, n in counts.items():
        if n < 0:
            raise ValueError(f"count for language {lang!r} ({n}) must be >= 0")
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError(f"language counts ({dict(counts)}) must have a positive sum")
    smoothed = {lang: (n / total) ** alpha if n > 0 else 0.0 for lang, n in counts.items()}
    norm = sum(smoothed.values())
    return {lang: s / norm for lang, s in smoothed.items()}


def natural_probabilities(counts: Mapping[str, int | float]) -> dict[str, float]:
    """``q_l = n_l / N`` for ``counts`` (the alpha = 1 case).

    Raises:
        ValueError: a negative count, or no data at all.
    """
    return language_probabilities(counts, alpha=1.0)


# --- the global row schedule -----------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic, in place on a
    temporary)."""
    x = x ^ (x >> np.uint64(30))
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def hashed_u64(seed: int, keys_N: np.ndarray, count: int) -> np.ndarray:
    """Stateless random bits: ``[N, count]`` uint64, a pure function of ``(seed, keys_N[i],
    column)`` (splitmix64 over the chain).

    The loader draws from it what must not depend on which slot or process asks, nor on how far
    a slot had got: the dealing permutation of a global step, the direction of a TLM pair.
    """
    h = np.asarray(keys_N, dtype=np.int64).astype(np.uint64) ^ np.uint64(_mix_int(seed))
    h = _mix64(h)
    out = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN + h[:, None]
    return _mix64(out)


def _mix_int(x: int) -> int:
    """:func:`_mix64` of one Python integer (taken modulo 2^64)."""
    x = (int(x) + int(_GOLDEN)) & _U64
    x = ((x ^ (x >> 30)) * int(_MIX1)) & _U64
    x = ((x ^ (x >> 27)) * int(_MIX2)) & _U64
    return x ^ (x >> 31)


_M32 = np.uint64(0xFFFFFFFF)


def _permute_round(i: np.ndarray, w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """One pass of Kensler's hash permutation ("Correlated Multi-Jittered Sampling", 2013):
    every step is a bijection of the low bits under the mask ``w``, so the result is a
    bijection of ``[0, w]``."""
    s = np.uint64
    i = i ^ p
    i = (i * s(0xE170893D)) & _M32
    i ^= p >> s(16)
    i ^= (i & w) >> s(4)
    i ^= p >> s(8)
    i = (i * s(0x0929EB3F)) & _M32
    i ^= p >> s(23)
    i ^= (i & w) >> s(1)
    i = (i * (s(1) | p >> s(27))) & _M32
    i = (i * s(0x6935FA69)) & _M32
    i ^= (i & w) >> s(11)
    i = (i * s(0x74DCB303)) & _M32
    i ^= (i & w) >> s(2)
    i = (i * s(0x9E501CC3)) & _M32
    i ^= (i & w) >> s(2)
    i = (i * s(0xC860A3DF)) & _M32
    i &= w
    i ^= i >> s(5)
    return i


def permuted_positions(seed: int, keys_K: np.ndarray, n: int, idx: np.ndarray) -> np.ndarray:
    """``perm_k[idx]`` for ``K`` pseudo-random permutations ``perm_k`` of ``[0, n)``, each a
    pure function of ``(seed, keys_K[k])``: int64 ``[K, len(idx)]``, computed for the asked
    entries only (Kensler's hash permutation with cycle walking; ``n < 2^32``).

    The loader deals a global step's rows with it: rank r's rows are ``perm[r B : (r + 1) B]``,
    found without building the whole permutation of ``dp_world_size x B`` rows.
    """
    assert 0 < n < 1 << 32, n
    p_K = hashed_u64(seed, keys_K, 1)[:, 0] & _M32
    w = (1 << max(1, (n - 1).bit_length())) - 1
    w_ = np.uint64(w)
    shape = (len(p_K), len(idx))
    p = np.broadcast_to(p_K[:, None], shape).copy()
    out = _permute_round(np.broadcast_to(np.asarray(idx, dtype=np.uint64), shape), w_, p)
    bad = out >= np.uint64(n)
    while bad.any():  # cycle walking: w < 2 n, so fewer than two rounds are needed on average
        out[bad] = _permute_round(out[bad], w_, p[bad])
        bad = out >= np.uint64(n)
    return ((out + p) % np.uint64(n)).astype(np.int64)


class RowSchedule:
    """The global row sequence of one kind of rows (mono, or pairs): which source every row of
    the run comes from, a pure function of the probabilities.

    Row ``m`` (0-based) of source ``l`` has the key ``(m + 0.5) / p_l`` (Webster / Sainte-Laguë
    divisors); the sequence is every ``(l, m)`` sorted by key, ties by source order. Why it
    tracks ``p_l`` over any window: below a threshold key ``t`` source ``l`` has ``c_l(t) =
    #{m >= 0 : (m + 0.5) / p_l < t} = max(0, ceil(t p_l - 1/2))`` rows, within half a row of
    ``t p_l``; the first ``R`` rows are those below the key of row ``R`` (ties aside), a ``t``
    with ``sum_l c_l(t) = R``, so ``t`` is within ``L/2`` of ``R`` and drifts from it only as the
    fractional parts of the ``t p_l`` do. A window of ``N`` rows thus holds ``N p_l`` rows of
    source ``l`` within ``1 + L p_l`` at worst and about one row in practice (the tests measure
    it); the first ``L`` rows do not go one to each source whatever its ``p_l`` (what keys
    ``m / p_l`` from 0 would do). Counts come in closed form and are fixed up with the key
    function itself, so every process on any machine gets the same bits (IEEE division is
    exactly rounded); nothing depends on what was emitted before.

    Args:
        probs: ``p_l`` per source in source order (zeros allowed: those sources get no rows).
    """

    def __init__(self, probs: Sequence[float]) -> None:
        p = np.asarray(list(probs), dtype=np.float64)
        self.index = np.flatnonzero(p > 0)  # schedule position -> source index
        self.p = p[self.index]
        num = len(self.p)
        # counts at a prefix R start from the threshold t0 = R - L/2 - 1 (at most R rows below
        # it) and add the next D = R - S(t0) rows in key order, all below t0 + L + 2: per source
        # at most floor((L + 2) p_l) + 1 of them (one more for the rounding of keys)
        self._margin = num / 2 + 1
        per_source = np.floor((num + 2) * self.p).astype(np.int64) + 2
        self._cand_l = np.repeat(np.arange(num), per_source)
        self._cand_j = np.arange(len(self._cand_l)) - np.repeat(
            np.cumsum(per_source) - per_source, per_source
        )
        self._cand_p = self.p[self._cand_l]

    def _keys(self, m: np.ndarray, p: np.ndarray) -> np.ndarray:
        return (m + 0.5) / p

    def _count_below(self, t_N: np.ndarray) -> np.ndarray:
        """``[N, L]``: ``#{m >= 0 : key(l, m) < t}`` per threshold and source."""
        t = t_N[:, None]
        c = np.maximum(np.ceil(t * self.p - 0.5), 0).astype(np.int64)
        # the closed form is off by at most one where t p_l - 1/2 rounds across an integer
        c += self._keys(c, self.p) < t
        c -= (c > 0) & (self._keys(c - 1, self.p) >= t)
        return c

    def counts(self, rows: np.ndarray) -> np.ndarray:
        """``[N, L]`` int64: rows of each scheduled source among the first ``rows[i]`` rows
        (``L`` = the sources with ``p > 0``, in ``self.index`` order)."""
        rows = np.asarray(rows, dtype=np.int64)
        c0 = self._count_below(rows - self._margin)
        deficit = rows - c0.sum(axis=1)
        assert (deficit >= 0).all(), "threshold above the prefix"
        if not deficit.any():
            return c0
        keys = self._keys(c0[:, self._cand_l] + self._cand_j, self._cand_p)
        # candidates are laid out source by source: a stable sort breaks ties by source order
        order = np.argsort(keys, axis=1, kind="stable")
        taken = np.arange(order.shape[1]) < deficit[:, None]
        row_of = np.broadcast_to(np.arange(len(rows))[:, None], order.shape)
        num = len(self.p)
        flat = row_of[taken] * num + self._cand_l[order[taken]]
        return c0 + np.bincount(flat, minlength=len(rows) * num).reshape(len(rows), num)

    def sources_at(self, rows: np.ndarray) -> np.ndarray:
        """Source index of each of ``rows`` (any order): int64 ``[N]``; cheaper than
        :meth:`sources` for a few rows far apart (row ``x`` is the next candidate after the
        first ``x`` rows, see :meth:`counts`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64)
        c0 = self._count_below(rows - self._margin)
        deficit = rows - c0.sum(axis=1)
        keys = self._keys(c0[:, self._cand_l] + self._cand_j, self._cand_p)
        order = np.argsort(keys, axis=1, kind="stable")
        return self.index[self._cand_l[order[np.arange(len(rows)), deficit]]]

    def sources(self, start: int, stop: int) -> np.ndarray:
        """Source index of every row ``start .. stop - 1`` of the sequence, in row order: int64
        ``[stop - start]`` (one sort of the range's keys)."""
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        assert len(self.p), "rows asked of a schedule without sources"
        first, last = self.counts(np.array([start, stop], dtype=np.int64))
        n = last - first
        # the range's rows source by source: the stable sort by key puts tied keys in source
        # order
        src = np.repeat(np.arange(len(self.p)), n)
        m = np.arange(stop - start) - np.repeat(np.cumsum(n) - n - first, n)
        order = np.argsort(self._keys(m, self.p[src]), kind="stable")
        return self.index[src[order]]
