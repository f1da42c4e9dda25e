"""Objective transforms of the streaming loader, in numpy: joining, packing boundaries, masking.

Shape legend: ``B`` sequences per batch, ``T`` tokens per sequence, ``N`` tokens of one joined
sample, ``D`` documents (or pairs) of one sample, ``V`` vocabulary size.

A *joined* sample is the token stream the packers cut sequences from:

- mono: every document followed by eos, ``doc_0 </s> doc_1 </s> ...``; a sequence may start or
  end anywhere in it (CLM / MLM packing: no token is lost, documents run across sequences);
- pair: every pair as one segment ``src </s> tgt </s>`` with per-token language ids and
  positions restarting at the target; segments are packed whole (TLM).

Everything here is pure numpy on whole arrays: no Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PyTorch cross-entropy's default ignore_index)."""
ID_DTYPE = np.int32
"""dtype of the loader's per-token outputs (ids, labels, positions, document and language ids):
int32 holds every vocabulary id and position and halves the bytes of int64."""
WORD_START = "\u2581"
"""Sentencepiece's word-boundary mark: a piece starting with it begins a word."""
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3000, 0x303F),  # CJK Symbols and Punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF),  # Hangul Syllables, Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF00, 0xFF9F),  # Fullwidth forms (CJK punctuation, digits, letters), Halfwidth Katakana
    (0x20000, 0x3134F),  # CJK Unified Ideographs Extensions B-G, Compatibility Supplement
)


_CJK_LEAD_BYTES = {f"<0x{b:02X}>" for b in range(0xE3, 0xEE)}
"""Byte-fallback pieces that start the UTF-8 form of a character in U+3000-U+DFFF: CJK
punctuation, kana, ideographs, Hangul (and a few rare scripts in U+A000-U+ABFF)."""


def is_cjk_char(char: str) -> bool:
    """Whether ``char`` is a CJK ideograph, a kana, a Hangul syllable (or jamo), or CJK
    punctuation (which BERT splits off as a word too)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def is_cjk_piece(piece: str) -> bool:
    """Whether a piece holds a CJK ideograph, kana or Hangul character: such a piece is a word
    of its own for whole-word masking (BERT's Chinese rule, which splits text around every CJK
    character; a sentencepiece piece of several such characters stays one word)."""
    return any(map(is_cjk_char, piece))


@dataclass(frozen=True)
class Vocab:
    """What the transforms need to know about the tokenizer.

    Attributes:
        size: number of ids ``V``.
        pad_id, eos_id, mask_id: special ids.
        special_ids: every id that is never masked or drawn as a random replacement (pad, unk,
            bos, eos, mask, cls, sep, language tags, sentinels).
        word_start_V: bool per id, True where the piece starts a word (whole-word masking);
            None when unknown (whole-word masking then raises).
        cjk_V: bool per id, True for pieces of CJK ideographs, kana, Hangul or CJK punctuation
            (:func:`is_cjk_piece`): each is a word of its own, and the piece after it starts a
            word; None: no such rule (scripts with spaces only). ``from_tokenizer`` also marks
            the first byte piece of a byte-spelled CJK character in ``word_start_V``.
    """

    size: int
    pad_id: int
    eos_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    word_start_V: np.ndarray | None = None
    cjk_V: np.ndarray | None = None

    @classmethod
    def from_tokenizer(cls, directory: str) -> Vocab:
        """Build from a Rosetta tokenizer directory (sentencepiece model + sidecar).

        Raises:
            FileNotFoundError, ValueError: as ``tokenizer.load_tokenizer``.
        """
        from data_pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer(directory)
        ids = tok.special_ids
        specials = set(ids.values()) | set(tok.lang_ids.values()) | set(tok.sentinel_ids)
        pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        cjk_V = np.array([is_cjk_piece(p) for p in pieces], dtype=bool)
        cjk_V[list(specials)] = False
        # a rare CJK character spelled in byte pieces is a word too: its first byte starts one
        word_start_V = np.array(
            [p.startswith(WORD_START) or p in _CJK_LEAD_BYTES for p in pieces], dtype=bool
        )
        word_start_V |= cjk_V
        return cls(
            size=tok.vocab_size,
            pad_id=ids["pad"],
            eos_id=ids["eos"],
            mask_id=ids["mask"],
            special_ids=tuple(sorted(specials)),
            word_start_V=word_start_V,
            cjk_V=cjk_V,
        )

    def special_mask_V(self) -> np.ndarray:
        """Bool ``[V]``: True for ids that are never masked."""
        out = np.zeros(self.size, dtype=bool)
        out[list(self.special_ids)] = True
        return out


@dataclass(frozen=True)
class MaskingConfig:
    """BERT masking (plain values; the trainer maps ``objective.*`` onto them).

    Attributes:
        mask_prob: share of (non-special, non-pad) tokens selected for prediction.
        replace_prob: of the selected, the share replaced by the mask id.
        random_prob: of the selected, the share replaced by a random non-special id; the rest
            keep their id.
        whole_word: select whole words rather than single pieces (see :func:`word_starts`: a
            word starts at a piece with the word-start mark, at a special token and after one,
            at every CJK piece and after one).
        max_word_pieces: with ``whole_word``, a word of more pieces is cut into words of at most
            this many (text without spaces, long numbers or URLs would else be masked in one
            piece; >= 1).
        tlm_share: share of the sequences of each MLM batch taken from parallel pairs (TLM).
    """

    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    whole_word: bool = False
    tlm_share: float = 0.0
    max_word_pieces: int = 8

    def check(self) -> None:
        """Raises: ValueError naming the value and the rule."""
        for name in ("mask_prob", "replace_prob", "random_prob", "tlm_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking.{name} ({value}) must be in [0, 1]")
        if isinstance(self.max_word_pieces, bool) or not (
            isinstance(self.max_word_pieces, int) and self.max_word_pieces >= 1
        ):
            raise ValueError(
                f"masking.max_word_pieces ({self.max_word_pieces!r}) must be an integer >= 1"
            )
        if self.replace_prob + self.random_prob > 1.0:
            raise ValueError(
                f"masking.replace_prob + random_prob ({self.replace_prob} + {self.random_prob}) "
                "must be <= 1"
            )


# --- joining ---------------------------------------------------------------------------------


def join_mono(tokens_N: np.ndarray, doc_offsets: np.ndarray, *, eos_id: int) -> tuple:
    """Join the documents of a mono sample stored without eos, each followed by eos: the
    layout the sharding job stores now (``data_pipeline.shard_format``).

    Args:
        tokens_N: ``[N]`` ids of the sample's documents back to back.
        doc_offsets: ``[D + 1]`` rising offsets, ``doc_offsets[0] == 0``, last ``== N``.

    Returns:
        ``(ids [N + D], offsets [D + 1])``: ``ids`` keeps the dtype of ``tokens_N`` (the
        packers widen once, when they copy into a batch); document ``i`` is
        ``ids[offsets[i] : offsets[i + 1]]``, its eos last.
    """
    num_docs = len(doc_offsets) - 1
    total = len(tokens_N) + num_docs
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    offsets[1:] = doc_offsets[1:]
    offsets[1:] += np.arange(1, num_docs + 1)
    ends = offsets[1:] - 1
    is_eos = np.zeros(total, dtype=bool)
    is_eos[ends] = True
    ids = np.empty(total, dtype=np.result_type(tokens_N.dtype, np.min_scalar_type(eos_id)))
    ids[~is_eos] = tokens_N
    ids[ends] = eos_id
    return ids, offsets


def join_pairs(
    src_N: np.ndarray,
    src_offsets: np.ndarray,
    tgt_N: np.ndarray,
    tgt_offsets: np.ndarray,
    *,
    eos_id: int,
    src_lang: int,
    tgt_lang: int,
    swap_D: np.ndarray | None = None,
) -> tuple:
    """Join a pair sample into segments ``src </s> tgt </s>``, one per pair (``tgt </s> src
    </s>`` for the pairs marked in ``swap_D``).

    Returns:
        ``(ids [M], lang [M] int64, pos [M] int64, seg_offsets [D + 1] int64)`` with
        ``M = S + G + 2 D``; ``ids`` keeps the token dtype; ``pos`` restarts at 0 at each source
        and each target; ``seg_offsets`` bound the pair segments.
    """
    src_len_D = np.diff(src_offsets.astype(np.int64)) + 1
    tgt_len_D = np.diff(tgt_offsets.astype(np.int64)) + 1
    num_pairs = len(src_len_D)
    # interleave [src_0+eos, tgt_0+eos, src_1+eos, ...] as 2D parts (a swapped pair's target
    # part first); the source parts stay in pair order, so the masked writes below fill them
    part_len = np.empty(2 * num_pairs, dtype=np.int64)
    if swap_D is None:
        part_len[0::2] = src_len_D
        part_len[1::2] = tgt_len_D
    else:
        part_len[0::2] = np.where(swap_D, tgt_len_D, src_len_D)
        part_len[1::2] = np.where(swap_D, src_len_D, tgt_len_D)
    part_start = np.zeros(2 * num_pairs + 1, dtype=np.int64)
    np.cumsum(part_len, out=part_start[1:])
    total = int(part_start[-1])
    # positions: a running count that steps back to 0 at each part start
    step = np.ones(total, dtype=np.int64)
    if total:
        step[0] = 0
        step[part_start[1:-1]] = 1 - part_len[:-1]
    pos = np.cumsum(step, out=step)
    part_src = np.arange(2 * num_pairs) % 2 == 0  # which parts are source sides
    if swap_D is not None:
        part_src[0::2] = ~swap_D
        part_src[1::2] = swap_D
    part_lang = np.where(part_src, src_lang, tgt_lang).astype(np.int64)
    lang = np.repeat(part_lang, part_len)
    from_src = np.repeat(part_src, part_len)
    eos_at = part_start[1:] - 1
    is_token = np.ones(total, dtype=bool)
    is_token[eos_at] = False
    ids = np.empty(
        total, dtype=np.result_type(src_N.dtype, tgt_N.dtype, np.min_scalar_type(eos_id))
    )
    ids[is_token & from_src] = src_N
    ids[is_token & ~from_src] = tgt_N
    ids[eos_at] = eos_id
    return ids, lang, pos, part_start[0::2].copy()


# --- per-sequence boundaries -----------------------------------------------------------------


def boundaries_from_starts(start_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position ids restarting at each segment start, and per-sequence segment ids.

    Args:
        start_BT: bool ``[B, T]``, True where a document (segment) starts; position 0 of every
            row counts as a start whatever it holds.

    Returns:
        ``(position_ids [B, T], doc_ids [B, T])``, ``ID_DTYPE`` (int32); ``doc_ids`` count
        segments from 0 in each row (equal ids attend to each other under per-document masking).
    """
    start_BT = start_BT.copy()
    start_BT[:, 0] = True
    t_T = np.arange(start_BT.shape[1], dtype=ID_DTYPE)
    last_start_BT = np.maximum.accumulate(np.where(start_BT, t_T, 0), axis=1)
    doc_ids_BT = np.cumsum(start_BT, axis=1, dtype=ID_DTYPE)
    doc_ids_BT -= 1
    return np.subtract(t_T, last_start_BT, out=last_start_BT), doc_ids_BT


# --- masking ---------------------------------------------------------------------------------


def word_starts(
    ids_BT: np.ndarray,
    *,
    vocab: Vocab,
    max_word_pieces: int,
    special_BT: np.ndarray | None = None,
) -> np.ndarray:
    """Bool ``[B, T]``: True where a word starts, for whole-word masking.

    A word starts at ``t = 0`` of every row, at a piece with the word-start mark, at a special
    token and right after one, at every CJK piece (ideograph, kana, Hangul: ``vocab.cjk_V``) and
    right after one; a run of more than ``max_word_pieces`` pieces between starts is cut into
    words of ``max_word_pieces`` pieces (the last one shorter).

    Raises:
        ValueError: ``vocab`` has no word-start table.
    """
    if vocab.word_start_V is None:
        raise ValueError("masking.whole_word needs the tokenizer's word-start table")
    if special_BT is None:
        special_BT = vocab.special_mask_V()[ids_BT]
    start_BT = vocab.word_start_V[ids_BT] | special_BT
    start_BT[:, 1:] |= special_BT[:, :-1]
    if vocab.cjk_V is not None:
        cjk_BT = vocab.cjk_V[ids_BT]
        start_BT |= cjk_BT
        start_BT[:, 1:] |= cjk_BT[:, :-1]
    start_BT[:, 0] = True
    start_N = start_BT.reshape(-1)  # every row starts a word, so no run crosses rows
    t_N = np.arange(start_N.size)
    since_start_N = t_N - np.maximum.accumulate(np.where(start_N, t_N, 0))
    start_N |= since_start_N % max_word_pieces == 0
    return start_N.reshape(start_BT.shape)


def mask_tokens(
    ids_BT: np.ndarray,
    *,
    vocab: Vocab,
    cfg: MaskingConfig,
    rng: np.random.Generator,
    valid_BT: np.ndarray | None = None,
    special_V: np.ndarray | None = None,
    normal_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: select, then replace by mask / random id / keep.

    Args:
        ids_BT: ``[B, T]`` token ids of a signed integer dtype (not modified).
        vocab: special ids and, for whole-word masking, the word-start table.
        cfg: probabilities and whole-word switch.
        rng: the only source of randomness (its state is part of the loader's state).
        valid_BT: bool ``[B, T]``, False on padding; None means all valid.
        special_V: cached ``vocab.special_mask_V()``.
        normal_ids: cached ``np.flatnonzero(~special_V)`` (the random replacements).

    Returns:
        ``(input_ids [B, T], labels [B, T])`` of the dtype of ``ids_BT``; ``labels`` is
        ``IGNORE_INDEX`` except at selected positions, where it holds the original id. Special
        ids are never selected.

    Raises:
        ValueError: whole-word masking without a word-start table.
    """
    if special_V is None:
        special_V = vocab.special_mask_V()
    special_BT = special_V[ids_BT]
    maskable_BT = ~special_BT if valid_BT is None else (~special_BT & valid_BT)
    if cfg.whole_word:
        start_BT = word_starts(
            ids_BT, vocab=vocab, max_word_pieces=cfg.max_word_pieces, special_BT=special_BT
        )
        word_of_BT = np.cumsum(start_BT.ravel()).reshape(ids_BT.shape) - 1
        chosen_W = rng.random(int(word_of_BT[-1, -1]) + 1) < cfg.mask_prob
        selected_BT = chosen_W[word_of_BT] & maskable_BT
    else:
        selected_BT = (rng.random(ids_BT.shape) < cfg.mask_prob) & maskable_BT
    # only the selected positions (about mask_prob of them) draw an action and are written
    selected_S = np.flatnonzero(selected_BT)
    action_S = rng.random(len(selected_S))
    ids_N = ids_BT.reshape(-1)
    labels_BT = np.full(ids_BT.shape, IGNORE_INDEX, dtype=ids_BT.dtype)
    labels_BT.reshape(-1)[selected_S] = ids_N[selected_S]
    inputs_BT = ids_BT.copy()
    inputs_N = inputs_BT.reshape(-1)
    inputs_N[selected_S[action_S < cfg.replace_prob]] = vocab.mask_id
    to_random_R = selected_S[
        (action_S >= cfg.replace_prob) & (action_S < cfg.replace_prob + cfg.random_prob)
    ]
    if len(to_random_R):
        if normal_ids is None:
            normal_ids = np.flatnonzero(~special_V)
        inputs_N[to_random_R] = normal_ids[rng.integers(0, len(normal_ids), len(to_random_R))]
    return inputs_BT, labels_BT
