"""Per-source sample streams dealt to loader slots: which sample each slot reads next.

What to call (the streaming loader, ``data_pipeline.loader``, is the one user):

- ``Source(name, kind, paths, samples_per_shard, tokens)``: one language or language pair of a
  manifest; ``source.locate(g, seed=...)`` is the ``(shard index, sample index)`` at stream
  position ``g``;
- ``StreamState.fresh(slot=s, num_slots=S)``: slot ``s``'s stream of one source at the start of
  training; ``state.next_position(capacity=..., rng=...)`` draws its next position through the
  shuffle buffer; ``to_dict()`` / ``from_dict()`` round-trip it as plain lists and ints;
- ``redistribute(old_states, num_slots=S', samples=...)``: the streams of ``S`` old slots dealt
  over ``S'`` new ones (elastic resume).

Guarantees: the sample order is a pure function of ``(seed, source, position)``; within a pass
every sample goes to exactly one slot; an elastic resume neither loses nor repeats a position
any old slot had not consumed. Reading the samples themselves is ``shard_format.ShardReader``'s.

How:

A *source* is one language (mono shards) or one language pair (pair shards). Its ``n`` samples
(every sample of every shard of the source, from the manifest) are visited in *passes*; pass
``p`` visits them in an order drawn from ``(seed, source, p)`` alone: the shards permuted, then
the samples of each shard permuted (a slot reads one shard at a time, the page cache is shared).
Passes come in chunks of ``max(1, ORDER_CHUNK_SAMPLES // n)``: one generator, seeded with
``(seed, source, p // chunk)``, draws the chunk's passes in turn (a small source would otherwise
seed a generator every few samples).
Concatenating the passes gives an endless sequence of *positions* ``g = 0, 1, 2, ...``: position
``g`` is sample ``order_p[g % n]`` of pass ``p = g // n``.

*Slots* are the (dp rank, dataloader worker) pairs, ``S = dp_world_size * max(1, num_workers)``
of them. Slot ``s`` owns the positions ``g = s, s + S, s + 2S, ...`` of every source: every
sample of a pass goes to exactly one slot, and a source with fewer samples than slots still feeds
every slot (passes simply go by faster). Positions are pulled into a shuffle buffer of sample
references (no data is held) and drawn from it at random; the drawn sample is decoded, joined
(``transforms``) and consumed from a token cursor.

State of one source in one slot (plain lists and ints; see :class:`StreamState`)::

    {"ranges": [[start, step, stop], ...],   # positions still to pull, in order; stop -1 = endless
     "buffer": [g, ...],                      # shuffle buffer (sample references)
     "partials": [[g, cursor], ...]}          # samples being consumed: token cursor in the joined
                                              # sample; the first one is the current sample

Elastic resume (:func:`redistribute`) pools every old slot's state and deals it to the new slots
without losing or repeating a position: each old range is split into ``S'`` interleaved
sub-ranges (one per new slot) up to the end ``G0`` of the furthest pass any old slot had reached,
and the regular dealing restarts at ``G0`` with stride ``S'``; buffered references are dealt
round-robin; an old slot's partly consumed samples (its packing remainder) go to new slot
``old % S'``.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

ENDLESS = -1
"""``stop`` of a range that never ends (the regular dealing of a slot)."""


# --- pass orders -----------------------------------------------------------------------------


ORDER_CHUNK_SAMPLES = 4096
"""Passes of a source are drawn in chunks of about this many samples (see the module docstring)."""

_ONE_SAMPLE_ORDER = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
"""The order of every pass of a one-sample source (what the permutations of one element give)."""


def source_seed(name: str) -> int:
    """A stable (process- and platform-independent) integer for a source name."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass
class Source:
    """One language (or language pair) of a manifest: its shards and their sample counts.

    Attributes:
        name: ``"en"`` or ``"en-de"``.
        kind: ``"mono"`` or ``"pair"``.
        paths: absolute shard paths, in manifest order.
        samples_per_shard: samples of each shard, from the manifest.
        tokens: n_l (tokens in the manifest).
    """

    name: str
    kind: str
    paths: list[str]
    samples_per_shard: list[int]
    tokens: int
    _orders: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _chunks: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def num_samples(self) -> int:
        """n: samples per pass."""
        return sum(self.samples_per_shard)

    def order(self, pass_index: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass ``pass_index``'s visiting order as ``(shard index [n], sample index [n])``."""
        hit = self._orders.get(pass_index)
        if hit is not None:
            return hit
        n = self.num_samples
        if n == 1:  # every pass visits the one sample: no generator to seed
            return _ONE_SAMPLE_ORDER
        chunk = max(1, ORDER_CHUNK_SAMPLES // n)
        key = pass_index // chunk
        state = self._chunks.get(key)
        if state is None or state[1] > pass_index:  # (re)start the chunk at its first pass
            state = (np.random.default_rng([seed, source_seed(self.name), key]), key * chunk)
        rng, p = state
        while p <= pass_index:
            shards = rng.permutation(len(self.paths))
            counts = [self.samples_per_shard[shard] for shard in shards]
            samples = [rng.permutation(count) for count in counts]
            hit = (
                np.repeat(shards.astype(np.int64), counts),
                samples[0] if len(samples) == 1 else np.concatenate(samples),
            )
            self._orders[p] = hit
            if len(self._orders) > max(8, 2 * chunk):  # at most ~2 chunks of small passes
                self._orders.popitem(last=False)
            p += 1
        self._chunks[key] = (rng, p)
        if len(self._chunks) > 2:
            self._chunks.popitem(last=False)
        return hit

    def locate(self, position: int, *, seed: int) -> tuple[int, int]:
        """``(shard index, sample index)`` at endless-stream position ``position``."""
        n = self.num_samples
        shard_of, sample_of = self.order(position // n, seed=seed)
        return int(shard_of[position % n]), int(sample_of[position % n])


# --- per-slot stream state -------------------------------------------------------------------


@dataclass
class StreamState:
    """One source's stream in one slot (see the module docstring for the layout)."""

    ranges: list[list[int]]
    buffer: list[int]
    partials: list[list[int]]

    @classmethod
    def fresh(cls, *, slot: int, num_slots: int) -> StreamState:
        """The state of slot ``slot`` of ``num_slots`` at the start of training."""
        return cls(ranges=[[slot, num_slots, ENDLESS]], buffer=[], partials=[])

    def to_dict(self) -> dict:
        """A deep copy as plain lists and ints."""
        return {
            "ranges": [list(r) for r in self.ranges],
            "buffer": list(self.buffer),
            "partials": [list(p) for p in self.partials],
        }

    @classmethod
    def from_dict(cls, state: dict) -> StreamState:
        """Inverse of :meth:`to_dict` (copies)."""
        return cls(
            ranges=[[int(x) for x in r] for r in state["ranges"]],
            buffer=[int(g) for g in state["buffer"]],
            partials=[[int(x) for x in p] for p in state["partials"]],
        )

    def pull(self) -> int | None:
        """Next position from the ranges, or None when they are exhausted."""
        while self.ranges:
            r = self.ranges[0]
            start, step, stop = r
            if stop != ENDLESS and start >= stop:
                self.ranges.pop(0)
                continue
            r[0] = start + step
            return start
        return None

    def next_position(self, *, capacity: int, rng: np.random.Generator) -> int:
        """Fill the shuffle buffer to ``capacity`` and draw one position from it at random.

        Raises:
            ValueError: nothing left to draw (only after a faulty state).
        """
        while len(self.buffer) < capacity:
            g = self.pull()
            if g is None:
                break
            self.buffer.append(g)
        if not self.buffer:
            raise ValueError("stream exhausted: no ranges and an empty buffer")
        # uniform over the buffer (random() has 53 bits; integers() costs ~3x per call)
        i = int(rng.random() * len(self.buffer))
        # swap-remove: O(1), and the order stays a function of the rng alone
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def frontier(self) -> int:
        """Next position of the endless range (the one regular dealing would pull next)."""
        for start, _, stop in self.ranges:
            if stop == ENDLESS:
                return start
        raise ValueError("stream state has no endless range")


def redistribute(
    old: list[dict[str, dict]], *, num_slots: int, samples: dict[str, int]
) -> list[dict[str, dict]]:
    """Deal the streams of ``len(old)`` slots over ``num_slots`` new slots (elastic resume).

    Args:
        old: per old slot (in slot order), ``{source: StreamState dict}``.
        num_slots: ``S'``, the number of new slots.
        samples: samples per pass ``n`` of each source.

    Returns:
        Per new slot, ``{source: StreamState dict}``. Every position that no old slot had
        consumed is owned by exactly one new slot; partly consumed samples of old slot ``r``
        go to new slot ``r % S'``.
    """
    new: list[dict[str, dict]] = [{} for _ in range(num_slots)]
    for name, n in samples.items():
        states = [StreamState.from_dict(o[name]) for o in old]
        furthest = max(s.frontier() for s in states)
        g0 = -(-furthest // n) * n  # the end of the furthest pass any old slot has entered
        outs = [StreamState(ranges=[], buffer=[], partials=[]) for _ in range(num_slots)]
        dealt = 0  # elements dealt so far, so that sub-range sizes stay balanced
        for state in states:
            for start, step, stop in state.ranges:
                stop = g0 if stop == ENDLESS else stop
                count = max(0, -(-(stop - start) // step))
                for j in range(min(count, num_slots)):
                    target = (dealt + j) % num_slots
                    outs[target].ranges.append([start + j * step, step * num_slots, stop])
                dealt += count
        for j, out in enumerate(outs):
            out.ranges.append([g0 + j, num_slots, ENDLESS])
        refs = [g for state in states for g in state.buffer]
        for k, g in enumerate(refs):
            outs[k % num_slots].buffer.append(g)
        for r, state in enumerate(states):
            outs[r % num_slots].partials.extend(state.partials)
        for j, out in enumerate(outs):
            new[j][name] = out.to_dict()
    return new
