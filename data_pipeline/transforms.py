"""Objective transforms of the streaming loader, in numpy: joining, packing boundaries, masking.

Shape legend: ``B`` sequences per batch, ``T`` tokens per sequence, ``N`` tokens of one joined
sample, ``D`` documents (or pairs) of one sample, ``V`` vocabulary size.

A *joined* sample is the token stream the packers cut sequences from:

- mono: every document followed by eos, ``doc_0 </s> doc_1 </s> ...``; a sequence may start or
  end anywhere in it (CLM / MLM packing: no token is lost, documents run across sequences);
- pair: every pair as one segment ``src </s> tgt </s>`` with per-token language ids and
  positions restarting at the target; segments are packed whole (TLM).

Objectives beyond BERT masking, each a function a loader calls per row, batch or document,
with a numpy Generator as its only source of randomness:

- T5 span corruption: :func:`t5_span_lengths` (raw row length for full packed rows),
  :func:`random_spans_noise_mask`, :func:`span_corrupt` (``[B, L]`` -> inputs ``[B, I]``,
  targets ``[B, G]``), sentinels from :func:`sentinel_ids_from_tokenizer`;
- BART / mBART denoising of one document: :func:`denoise` with a :class:`DenoisingConfig`
  (:data:`BART_DENOISING`, :data:`MBART_DENOISING`), built from :func:`permute_sentences`,
  :func:`text_infill` and :func:`rotate_document`; sentence ends from
  :func:`sentence_end_table`; :func:`decoder_inputs` for teacher forcing;
- encoder-decoder rows of the loader (span corruption, denoising, translation):
  :class:`Seq2SeqConfig` (its lengths) in :class:`MaskingConfig`'s ``seq2seq``;
- SpanBERT span masking: :func:`span_mask` with a :class:`SpanMaskingConfig` (spans from
  :func:`select_spans`), outputs as :func:`mask_tokens`;
- ERNIE-M back-translation masked LM: :func:`btmlm_rows` (a raw row, then placeholders of
  another language for the model to fill), row length from :func:`btmlm_source_len`;
- BERT / ALBERT segment pairs for NSP and SOP: :func:`segment_pairs`.

Everything here is pure numpy on whole arrays: no Python loop over tokens (the span
transforms loop over rows and spans only).
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
            bos, eos, mask, cls, sep, language tags, sentinels, the ``<bt>`` tag).
        word_start_V: bool per id, True where the piece starts a word (whole-word masking);
            None when unknown (whole-word masking then raises).
        cjk_V: bool per id, True for pieces of CJK ideographs, kana, Hangul or CJK punctuation
            (:func:`is_cjk_piece`): each is a word of its own, and the piece after it starts a
            word; None: no such rule (scripts with spaces only). ``from_tokenizer`` also marks
            the first byte piece of a byte-spelled CJK character in ``word_start_V``.
        sentinel_ids: ids of ``<extra_id_0>``, ``<extra_id_1>``, ... (T5 span corruption);
            empty when unknown.
        lang_token_ids: language code -> id of its ``<lang:xx>`` token (translation tags,
            mBART's language token); None when unknown.
        sentence_end_V: bool per id (:func:`sentence_end_table`: BART's sentence permutation);
            None when unknown.
        cls_id, sep_id: BERT's ``<cls>`` / ``<sep>`` (segment pairs); None when unknown.
    """

    size: int
    pad_id: int
    eos_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    word_start_V: np.ndarray | None = None
    cjk_V: np.ndarray | None = None
    sentinel_ids: tuple[int, ...] = ()
    lang_token_ids: dict[str, int] | None = None
    sentence_end_V: np.ndarray | None = None
    cls_id: int | None = None
    sep_id: int | None = None

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
            sentinel_ids=tuple(tok.sentinel_ids),
            lang_token_ids=dict(tok.lang_ids),
            sentence_end_V=sentence_end_table(pieces, eos_id=ids["eos"]),
            cls_id=ids.get("cls"),
            sep_id=ids.get("sep"),
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
        tlm_share: share of the sequences of each MLM batch taken from parallel pairs (TLM);
            of each ``seq2seq`` batch, the share of translation rows.
        denoise_share: of each ``seq2seq`` batch, the share of BART-denoised monolingual rows
            (positive: every monolingual row is denoised; 0: every one is span-corrupted).
        span_boundary: span-masked rows also carry SpanBERT's span-boundary inputs
            (``span_left``, ``span_right``, ``span_offset``: :func:`span_mask`).
        seq2seq: the settings of ``seq2seq`` batches (None: :class:`Seq2SeqConfig`'s defaults).
        mono_kinds: of an ``mlm`` batch's monolingual rows, the transform of each (``mlm``: BERT
            masking, ``span``: SpanBERT span masking) and its share of those rows, e.g.
            ``(("mlm", 0.5), ("span", 0.5))``; None: every one as the loader's objective says.
        unmasked_pairs: the pair rows of an ``mlm`` batch are left unmasked, without token
            targets (their objective, XLCo, contrasts their two sides).
        prefix_lm: the monolingual rows of a ``seq2seq`` batch are prefix-LM rows (a raw cut
            split at a uniform point: the prefix for the encoder, the rest the target).
    """

    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    whole_word: bool = False
    tlm_share: float = 0.0
    max_word_pieces: int = 8
    denoise_share: float = 0.0
    seq2seq: Seq2SeqConfig | None = None
    mono_kinds: tuple[tuple[str, float], ...] | None = None
    span_boundary: bool = False
    unmasked_pairs: bool = False
    prefix_lm: bool = False

    def check(self) -> None:
        """Raises: ValueError naming the value and the rule."""
        for name in ("mask_prob", "replace_prob", "random_prob", "tlm_share", "denoise_share"):
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
        if self.tlm_share + self.denoise_share > 1.0 + 1e-9:  # shares of one mix: rounding
            raise ValueError(
                f"masking.tlm_share + denoise_share ({self.tlm_share} + {self.denoise_share}) "
                "must be <= 1"
            )
        if self.seq2seq is not None:
            self.seq2seq.check()
        if self.mono_kinds is not None:
            kinds = [kind for kind, _ in self.mono_kinds]
            if not kinds or not set(kinds) <= set(MIXED_MONO_KINDS) or len(set(kinds)) < len(kinds):
                raise ValueError(
                    f"masking.mono_kinds ({kinds}) must name each of "
                    f"{', '.join(MIXED_MONO_KINDS)} at most once"
                )
            if any(share < 0 for _, share in self.mono_kinds) or not any(
                share > 0 for _, share in self.mono_kinds
            ):
                raise ValueError(
                    f"masking.mono_kinds ({list(self.mono_kinds)}): shares must be >= 0 with a "
                    "positive sum"
                )


MIXED_MONO_KINDS = ("mlm", "span", "electra", "simcse")
"""The transforms monolingual rows of one ``mlm`` batch may mix (``MaskingConfig.mono_kinds``)."""
ROW_TRANSFORMS = ("pair", "mlm", "span", "btmlm", "electra", "simcse")
"""Values of an encoder batch's ``row_transform``: TLM pair rows, BERT-masked, span-masked and
BTMLM monolingual rows, ELECTRA's (BERT-masked as ``mlm``; its discriminator scores them) and
SimCSE's (left unmasked: no token targets)."""


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


# --- T5 span corruption ----------------------------------------------------------------------
# Shape legend here: ``L`` tokens of one row before corruption, ``I`` input tokens, ``G`` target
# tokens, ``S`` noise spans.


def t5_span_lengths(
    inputs_length: int, *, noise_density: float = 0.15, mean_span: float = 3.0
) -> tuple[int, int]:
    """How many raw tokens to cut per row so that span corruption fills ``inputs_length``:
    T5's ``random_spans_helper`` (one sentinel per span on each side, one eos on each side).

    Returns:
        ``(tokens_length, targets_length)``: rows of ``tokens_length`` raw tokens corrupt into
        inputs of at most ``inputs_length`` and targets of ``targets_length`` ids, eos included
        (exactly ``inputs_length`` for the lengths pre-training uses, e.g. 512 -> (568, 114)).

    Raises:
        ValueError: ``inputs_length`` < 2, ``noise_density`` outside (0, 1) or ``mean_span``
            < 1.
    """
    _check_t5_args(noise_density, mean_span)
    if isinstance(inputs_length, bool) or not (
        isinstance(inputs_length, int) and inputs_length >= 2
    ):
        raise ValueError(f"span_corruption.inputs_length ({inputs_length!r}) must be an int >= 2")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_span))
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # T5's rounding fix-up
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _check_t5_args(noise_density: float, mean_span: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"span_corruption.noise_density ({noise_density}) must be in (0, 1)")
    if not mean_span >= 1.0:
        raise ValueError(f"span_corruption.mean_span ({mean_span}) must be >= 1")


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_segments]`` positive lengths summing to ``num_items``, all such partitions equally
    likely (T5's ``_random_segmentation``: shuffle ``num_segments - 1`` cut marks)."""
    cuts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.concatenate([[0], np.cumsum(cuts)])
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    *,
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> np.ndarray:
    """Bool ``[length]``: T5's ``random_spans_noise_mask``.

    ``round(length * noise_density)`` noise tokens (at least 1, at most ``length - 1``) in
    ``round(noise / mean_span)`` spans (at least 1); noise and non-noise spans alternate, starting
    with non-noise (so the mask ends with a noise span); the lengths of both kinds are uniform
    random partitions. Two ``rng`` draws (the noise, then the non-noise partition).

    Raises:
        ValueError: ``noise_density`` outside (0, 1) or ``mean_span`` < 1.
    """
    _check_t5_args(noise_density, mean_span)
    orig_length = length
    length = max(length, 2)  # T5 avoids degeneracy the same way
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    noise_S = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_S = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_S, noise_S], axis=1).reshape(-1)
    is_noise = np.repeat(np.tile(np.array([False, True]), num_spans), interleaved)
    return is_noise[:orig_length]


def _spans_to_sentinels(
    tokens_BL: np.ndarray, drop_BL: np.ndarray, sentinel_ids: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """Every run of ``drop`` replaced by one sentinel, the k-th run of each row by
    ``sentinel_ids[k]`` (T5's ``noise_span_to_unique_sentinel``); rows stay equally long."""
    prev_BL = np.zeros_like(drop_BL)
    prev_BL[:, 1:] = drop_BL[:, :-1]
    first_BL = drop_BL & ~prev_BL
    span_BL = np.cumsum(first_BL, axis=1) - 1
    out_BL = np.where(first_BL, sentinel_ids[np.maximum(span_BL, 0)], tokens_BL).astype(dtype)
    keep_BL = ~(drop_BL & prev_BL)
    return out_BL[keep_BL].reshape(len(tokens_BL), -1)


def span_corrupt(
    tokens_BL: np.ndarray,
    *,
    rng: np.random.Generator,
    sentinel_ids: np.ndarray | list[int],
    noise_density: float = 0.15,
    mean_span: float = 3.0,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of a row (``[L]``) or of a batch of equally long rows (``[B, L]``).

    Each row draws its own :func:`random_spans_noise_mask` (rows in order); every noise span is
    replaced by one sentinel in the inputs, and the targets are the noise spans each preceded by
    its sentinel (T5's ``noise_span_to_unique_sentinel`` / ``nonnoise_span_to_unique_sentinel``):
    ``inputs = a <s0> c <s1> ...``, ``targets = <s0> b <s1> d ...`` for ``tokens = a b c d``.
    Every row of one length gets the same number of spans, so a batch stays rectangular; rows
    of :func:`t5_span_lengths`' ``tokens_length`` give exactly its ``inputs_length`` and
    ``targets_length`` with ``eos_id``. Tokens are not treated specially (eos between joined
    documents may be noise, as in T5).

    Args:
        tokens_BL: ``[L]`` or ``[B, L]`` token ids (not modified), ``L >= 1``.
        rng: the only source of randomness.
        sentinel_ids: ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in that order
            (:func:`sentinel_ids_from_tokenizer`).
        eos_id: appended to every input and target row when given.

    Returns:
        ``(inputs [I] or [B, I], targets [G] or [B, G])``; the dtype holds the tokens' dtype
        and the sentinel ids.

    Raises:
        ValueError: bad density or span length; fewer sentinels than spans; no rows or tokens.
    """
    one_row = tokens_BL.ndim == 1
    tokens_BL = np.atleast_2d(tokens_BL)
    if tokens_BL.ndim != 2 or min(tokens_BL.shape) < 1:
        raise ValueError(
            f"span_corruption tokens (shape {tokens_BL.shape}) must be [L] or [B, L], B, L > 0"
        )
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    num_rows, length = tokens_BL.shape
    noise_BL = np.empty(tokens_BL.shape, dtype=bool)
    for row in range(num_rows):
        noise_BL[row] = random_spans_noise_mask(
            length, rng=rng, noise_density=noise_density, mean_span=mean_span
        )
    first_B = noise_BL[:1]  # every row has the same number of spans
    num_spans = int(np.count_nonzero(first_B[:, 1:] & ~first_B[:, :-1]) + first_B[:, :1].sum())
    if num_spans > len(sentinels):
        raise ValueError(
            f"span_corruption.sentinel_ids ({len(sentinels)}) must cover the {num_spans} noise "
            f"spans of a {length}-token row"
        )
    top = [int(sentinels.max(initial=0))] + ([] if eos_id is None else [eos_id])
    dtype = np.result_type(tokens_BL.dtype, *(np.min_scalar_type(v) for v in top))
    inputs_BI = _spans_to_sentinels(tokens_BL, noise_BL, sentinels, dtype)
    targets_BG = _spans_to_sentinels(tokens_BL, ~noise_BL, sentinels, dtype)
    if eos_id is not None:
        eos_B1 = np.full((num_rows, 1), eos_id, dtype=dtype)
        inputs_BI = np.concatenate([inputs_BI, eos_B1], axis=1)
        targets_BG = np.concatenate([targets_BG, eos_B1], axis=1)
    if one_row:
        return inputs_BI[0], targets_BG[0]
    return inputs_BI, targets_BG


def sentinel_ids_from_tokenizer(directory: str) -> np.ndarray:
    """``int64 [num_sentinels]``: ids of ``<extra_id_0>``, ``<extra_id_1>``, ... of a Rosetta
    tokenizer directory, in that order.

    Raises:
        FileNotFoundError, ValueError: as ``tokenizer.load_tokenizer``.
    """
    from data_pipeline.tokenizer import load_tokenizer

    return np.asarray(load_tokenizer(directory).sentinel_ids, dtype=np.int64)


# --- BART / mBART denoising ------------------------------------------------------------------
# Shape legend here: ``N`` tokens of one document, ``M`` tokens of its noised source, ``K``
# span lengths drawn (spans and insertions), ``S`` spans of at least one word, ``I`` insertions.

SENTENCE_FINAL = frozenset(".!?\u2026\u3002\uff01\uff1f\uff0e\u0964\u061f")
"""Characters that end a sentence: . ! ? ... and the CJK, Devanagari and Arabic forms."""


@dataclass(frozen=True)
class DenoisingConfig:
    """BART / mBART denoising (fairseq's ``DenoisingDataset`` with ``mask_length=span-poisson``
    and ``replace_length=1``).

    Attributes:
        mask_ratio: share of the document's words masked by text infilling (BART 0.3, mBART
            0.35); 0 turns infilling off.
        poisson_lambda: mean span length in words; a span of 0 words inserts a mask.
        random_ratio: share of the span masks (and inserted masks) written as a random
            non-special id instead of the mask id.
        permute_ratio: share of the sentences permuted (1: all; 0: off).
        rotate_prob: probability of rotating the document to start at a random token.
        max_word_pieces: longest word in pieces (as :class:`MaskingConfig`).
    """

    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    random_ratio: float = 0.0
    permute_ratio: float = 1.0
    rotate_prob: float = 0.0
    max_word_pieces: int = 8

    def check(self) -> None:
        """Raises: ValueError naming the value and the rule."""
        for name in ("mask_ratio", "random_ratio", "permute_ratio", "rotate_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"denoising.{name} ({value}) must be in [0, 1]")
        if not self.poisson_lambda > 0.0:
            raise ValueError(f"denoising.poisson_lambda ({self.poisson_lambda}) must be > 0")
        if isinstance(self.max_word_pieces, bool) or not (
            isinstance(self.max_word_pieces, int) and self.max_word_pieces >= 1
        ):
            raise ValueError(
                f"denoising.max_word_pieces ({self.max_word_pieces!r}) must be an integer >= 1"
            )


BART_DENOISING = DenoisingConfig()
"""BART's setting: 30% of words in Poisson(3) spans, all sentences permuted, no rotation."""
MBART_DENOISING = DenoisingConfig(mask_ratio=0.35)
"""mBART's setting: 35% of words, otherwise as BART."""


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Encoder-decoder rows (the loader's ``seq2seq`` batches): T5 span corruption or BART /
    mBART denoising of monolingual rows, translation of parallel pairs.

    Attributes:
        noise_density, mean_span: T5 span corruption (:func:`span_corrupt`).
        denoising: BART / mBART noising (:func:`denoise`).
        language_token: mBART: the row's ``<lang:xx>`` token ends the denoised source and the
            target, and starts the decoder input (BART without it: eos starts it).
        decoder_len: decoder positions per row ``T``; 0 derives it (:meth:`lengths`).
    """

    noise_density: float = 0.15
    mean_span: float = 3.0
    denoising: DenoisingConfig = BART_DENOISING
    language_token: bool = False
    decoder_len: int = 0

    def check(self) -> None:
        """Raises: ValueError naming the value and the rule."""
        _check_t5_args(self.noise_density, self.mean_span)
        self.denoising.check()
        if isinstance(self.decoder_len, bool) or not (
            isinstance(self.decoder_len, int) and self.decoder_len >= 0
        ):
            raise ValueError(f"seq2seq.decoder_len ({self.decoder_len!r}) must be an int >= 0")

    def lengths(
        self, seq_len: int, *, denoise: bool, mono: bool, pairs: bool, prefix: bool = False
    ) -> tuple[int, int]:
        """``(raw tokens per monolingual row, decoder length T)`` for source rows of
        ``seq_len`` (``S``) tokens.

        Span corruption cuts :func:`t5_span_lengths`' raw length, so that its inputs fill
        ``S`` and its targets are ``targets_length`` long; denoising cuts ``min(S, T) - 1``
        raw tokens (less the language token), the target adding eos (and the token); a
        prefix-LM row (``prefix``) cuts ``min(S, T) - 1`` raw tokens, each side adding eos;
        translation rows take up to ``S`` source and ``T`` target tokens. Derived ``T``: the
        longest the rows need (T5 targets; ``S`` for denoising, prefix-LM and translation
        rows).

        Raises:
            ValueError: ``decoder_len`` shorter than T5's targets, or too short to denoise.
        """
        span_raw, span_targets = t5_span_lengths(
            seq_len, noise_density=self.noise_density, mean_span=self.mean_span
        )
        need = []
        if mono:
            need.append(seq_len if denoise or prefix else span_targets)
        if pairs:
            need.append(seq_len)
        decoder_len = self.decoder_len or max(need, default=span_targets)
        if prefix:
            if mono and min(seq_len, decoder_len) < 3:
                raise ValueError(
                    f"objective.decoder_len ({decoder_len}) and data.seq_len ({seq_len}) must be "
                    ">= 3 for prefix-LM rows"
                )
            return min(seq_len, decoder_len) - 1, decoder_len
        extra = 1 + int(self.language_token)
        if mono and not denoise and decoder_len < span_targets:
            raise ValueError(
                f"objective.decoder_len ({decoder_len}) must be >= the span corruption targets "
                f"({span_targets} for data.seq_len {seq_len})"
            )
        if mono and denoise and min(seq_len, decoder_len) <= extra:
            raise ValueError(
                f"objective.decoder_len ({decoder_len}) and data.seq_len ({seq_len}) must be > "
                f"{extra} to denoise"
            )
        raw = min(seq_len, decoder_len) - extra if denoise else span_raw
        return raw, decoder_len


@dataclass(frozen=True)
class InfillSpans:
    """What :func:`text_infill` did, in the coordinates of its input.

    Attributes:
        lengths_K: span lengths in words in draw order, trimmed to the budget (sum ==
            ``ceil(words * mask_ratio)``); zeros are insertions.
        start_S, end_S: token range ``[start, end)`` of each span of >= 1 word (spans in the
            order of the non-zero lengths); the first token becomes one mask, the rest go.
        insert_I: positions in the output of the inserted masks.
    """

    lengths_K: np.ndarray
    start_S: np.ndarray
    end_S: np.ndarray
    insert_I: np.ndarray


def sentence_end_table(pieces: list[str], *, eos_id: int) -> np.ndarray:
    """Bool ``[V]``: True for eos and for pieces made only of sentence-final punctuation
    (:data:`SENTENCE_FINAL`, after dropping the word-start mark), e.g. ``.``, ``▁?``, ``。``,
    ``!!``; ``Mr.`` or ``3.5`` are not sentence ends."""
    out = np.array(
        [
            bool(p.lstrip(WORD_START)) and set(p.lstrip(WORD_START)) <= SENTENCE_FINAL
            for p in pieces
        ],
        dtype=bool,
    )
    out[eos_id] = True
    return out


def sentence_end_table_from_tokenizer(directory: str) -> np.ndarray:
    """:func:`sentence_end_table` of a Rosetta tokenizer directory.

    Raises:
        FileNotFoundError, ValueError: as ``tokenizer.load_tokenizer``.
    """
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(directory)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    return sentence_end_table(pieces, eos_id=tok.special_ids["eos"])


def _body_length(tokens_N: np.ndarray, eos_id: int | None) -> int:
    """Tokens before a final eos (which stays last), or all of them."""
    ends_in_eos = eos_id is not None and len(tokens_N) > 0 and tokens_N[-1] == eos_id
    return len(tokens_N) - int(ends_in_eos)


def permute_sentences(
    tokens_N: np.ndarray,
    *,
    rng: np.random.Generator,
    sentence_end_N: np.ndarray,
    ratio: float = 1.0,
    eos_id: int | None = None,
) -> np.ndarray:
    """``[N]``: the document with ``ceil(sentences * ratio)`` of its sentences shuffled among
    their places (fairseq's ``permute_sentences``).

    A sentence ends after a token marked in ``sentence_end_N`` that is not followed by another
    marked one (``?!`` or ``. </s>`` stay with their sentence), and at the end of the body; the
    body is everything but a final ``eos_id``, which stays last.
    """
    body = _body_length(tokens_N, eos_id)
    ends = sentence_end_N[:body].copy()
    if body == 0:
        return tokens_N.copy()
    ends[:-1] &= ~ends[1:]
    ends[-1] = True
    end_P = np.flatnonzero(ends) + 1
    start_P = np.concatenate([[0], end_P[:-1]])
    num_sentences = len(end_P)
    num_permuted = int(np.ceil(num_sentences * ratio))
    chosen = rng.permutation(num_sentences)[:num_permuted]
    order_P = np.arange(num_sentences)
    order_P[chosen] = chosen[rng.permutation(num_permuted)]
    length_P = (end_P - start_P)[order_P]
    # gather index: the start of each placed sentence plus a count restarting at every sentence
    offsets = np.concatenate([[0], np.cumsum(length_P)[:-1]])
    index_N = np.arange(body) - np.repeat(offsets - start_P[order_P], length_P)
    out = tokens_N.copy()
    out[:body] = tokens_N[index_N]
    return out


def rotate_document(
    tokens_N: np.ndarray, *, rng: np.random.Generator, eos_id: int | None = None
) -> np.ndarray:
    """``[N]``: the body (all but a final ``eos_id``) rotated to start at a uniform random token
    other than its first (fairseq's ``add_rolling_noise``); bodies under 2 tokens stay."""
    body = _body_length(tokens_N, eos_id)
    out = tokens_N.copy()
    if body >= 2:
        offset = int(rng.integers(1, body))
        out[:body] = np.roll(tokens_N[:body], -offset)
    return out


def text_infill(
    tokens_N: np.ndarray,
    *,
    rng: np.random.Generator,
    word_start_N: np.ndarray,
    maskable_N: np.ndarray,
    mask_id: int,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    random_ratio: float = 0.0,
    normal_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, InfillSpans]:
    """BART text infilling (fairseq's ``add_whole_word_mask`` + ``add_insertion_noise``).

    ``ceil(words * mask_ratio)`` words are masked, ``words`` counting the words that start at a
    maskable token: span lengths ~ Poisson(``poisson_lambda``) are drawn until they reach that
    budget and the last is cut to it; each span of ``n >= 1`` words starts at a distinct random
    word and covers ``n`` words, stopping before a non-maskable token (eos, language tag) or at
    the end; its first token becomes one mask and the rest are deleted (overlapping spans merge
    into the mask of the first); each span of 0 words inserts one mask at a random place
    (never after a final non-maskable token).

    Args:
        tokens_N: ``[N]`` ids of one document (not modified).
        word_start_N: bool ``[N]``, True where a word starts (:func:`word_starts`).
        maskable_N: bool ``[N]``, False on specials.
        normal_ids: the random replacements (needed when ``random_ratio > 0``).

    Returns:
        ``(source [M], spans)``: the noised ids (dtype of ``tokens_N``) and the spans drawn.

    Raises:
        ValueError: ``random_ratio > 0`` without ``normal_ids``.
    """
    if random_ratio > 0.0 and normal_ids is None:
        raise ValueError("denoising.random_ratio > 0 needs normal_ids (the random replacements)")
    n = len(tokens_N)
    empty = np.zeros(0, dtype=np.int64)
    start_W = np.flatnonzero(word_start_N & maskable_N)
    budget = int(np.ceil(len(start_W) * mask_ratio))
    if budget == 0:
        return tokens_N.copy(), InfillSpans(empty, empty, empty, empty)
    lengths_K = rng.poisson(poisson_lambda, size=budget)
    while lengths_K.sum() < budget:
        lengths_K = np.concatenate([lengths_K, rng.poisson(poisson_lambda, size=budget)])
    cum_K = np.cumsum(lengths_K)
    last = int(np.searchsorted(cum_K, budget))
    lengths_K = lengths_K[: last + 1].astype(np.int64)
    lengths_K[last] = budget - (cum_K[last - 1] if last > 0 else 0)
    span_len_S = lengths_K[lengths_K > 0]
    num_inserts = len(lengths_K) - len(span_len_S)
    start_S = start_W[rng.permutation(len(start_W))[: len(span_len_S)]]
    mask_random_S = rng.random(len(span_len_S)) < random_ratio
    # a span covers whole words: it ends where word (its first + n) starts, or at a stop
    word_start_N = word_start_N.copy()
    word_start_N[0] = True
    all_starts = np.append(np.flatnonzero(word_start_N), n)
    word_of_N = np.cumsum(word_start_N) - 1
    stop_N = np.append(np.flatnonzero(~maskable_N), n)
    next_stop_S = stop_N[np.searchsorted(stop_N, start_S)]
    end_word_S = np.minimum(word_of_N[start_S] + span_len_S, len(all_starts) - 1)
    end_S = np.minimum(all_starts[end_word_S], next_stop_S)
    # a token inside a span after its first is deleted, even where another span starts there
    depth = np.zeros(n + 1, dtype=np.int64)
    np.add.at(depth, start_S + 1, 1)
    np.add.at(depth, end_S, -1)
    interior_N = np.cumsum(depth[:n]) > 0
    out = tokens_N.copy()
    out[start_S] = mask_id
    to_random = start_S[mask_random_S]
    if len(to_random):
        out[to_random] = normal_ids[rng.integers(0, len(normal_ids), len(to_random))]
    out = out[~interior_N]
    insert_I = empty
    if num_inserts:
        total = len(out) + num_inserts
        ends_fixed = len(out) > 0 and not maskable_N[-1]
        insert_I = rng.permutation(total - int(ends_fixed))[:num_inserts]
        inserted = np.ones(total, dtype=bool)
        inserted[insert_I] = False
        result = np.empty(total, dtype=out.dtype)
        result[inserted] = out
        result[insert_I] = mask_id
        num_random = int(np.ceil(num_inserts * random_ratio))
        if num_random:
            result[insert_I[:num_random]] = normal_ids[rng.integers(0, len(normal_ids), num_random)]
        out = result
    return out, InfillSpans(lengths_K, start_S.astype(np.int64), end_S.astype(np.int64), insert_I)


def denoise(
    tokens_N: np.ndarray,
    *,
    vocab: Vocab,
    cfg: DenoisingConfig,
    rng: np.random.Generator,
    sentence_end_V: np.ndarray | None = None,
    lang_id: int | None = None,
    special_V: np.ndarray | None = None,
    normal_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BART / mBART noising of one document, fairseq's order: sentence permutation, text
    infilling (whole words, :func:`word_starts`), then rotation.

    Args:
        tokens_N: ``[N]`` ids of one document, normally ending in eos (which stays last).
        sentence_end_V: bool ``[V]`` (:func:`sentence_end_table`); needed when
            ``cfg.permute_ratio > 0``.
        lang_id: mBART: the language tag appended to the source and to the target.
        special_V, normal_ids: cached ``vocab.special_mask_V()`` and its non-special ids.

    Returns:
        ``(source [M], target [N (+1)])``: target is the document (+ ``lang_id``): mBART's
        labels ``Y </s> <lang>``; the decoder reads :func:`decoder_inputs` of it (start: the
        language tag for mBART, eos for BART).

    Raises:
        ValueError: a bad ``cfg``; permutation without ``sentence_end_V``; no word-start table.
    """
    cfg.check()
    if special_V is None:
        special_V = vocab.special_mask_V()
    source = np.asarray(tokens_N).copy()
    if cfg.permute_ratio > 0.0:
        if sentence_end_V is None:
            raise ValueError("denoising.permute_ratio > 0 needs the sentence-end table")
        source = permute_sentences(
            source,
            rng=rng,
            sentence_end_N=sentence_end_V[source],
            ratio=cfg.permute_ratio,
            eos_id=vocab.eos_id,
        )
    if cfg.mask_ratio > 0.0 and len(source):
        special_N = special_V[source]
        start_N = word_starts(
            source[None],
            vocab=vocab,
            max_word_pieces=cfg.max_word_pieces,
            special_BT=special_N[None],
        )[0]
        if normal_ids is None and cfg.random_ratio > 0.0:
            normal_ids = np.flatnonzero(~special_V)
        source, _ = text_infill(
            source,
            rng=rng,
            word_start_N=start_N,
            maskable_N=~special_N,
            mask_id=vocab.mask_id,
            mask_ratio=cfg.mask_ratio,
            poisson_lambda=cfg.poisson_lambda,
            random_ratio=cfg.random_ratio,
            normal_ids=normal_ids,
        )
    if cfg.rotate_prob > 0.0 and rng.random() < cfg.rotate_prob:
        source = rotate_document(source, rng=rng, eos_id=vocab.eos_id)
    target = np.asarray(tokens_N)
    if lang_id is not None:
        source = np.append(source, lang_id).astype(source.dtype)
        target = np.append(target, lang_id).astype(target.dtype)
    return source, target.copy()


def decoder_inputs(target_N: np.ndarray, *, start_id: int) -> np.ndarray:
    """``[N]``: the target shifted right by one behind ``start_id`` (teacher forcing)."""
    out = np.empty_like(target_N)
    if len(out):
        out[0] = start_id
        out[1:] = target_N[:-1]
    return out


# --- SpanBERT span masking -------------------------------------------------------------------
# Shape legend here: ``S`` spans selected in a batch.


@dataclass(frozen=True)
class SpanMaskingConfig:
    """SpanBERT span masking (plain values).

    Attributes:
        mask_prob: share of each row's maskable tokens selected (``ceil`` of it, exactly).
        geometric_p: span lengths in words ~ Geometric(p) on ``1..max_span``, truncated and
            renormalised as SpanBERT's code does (mean 3.8 words for p = 0.2, max 10).
        max_span: longest span in words.
        replace_prob, random_prob: per span, the share whose tokens all become the mask id /
            all random ids; the rest keep theirs.
        max_word_pieces: longest word in pieces (as :class:`MaskingConfig`).
    """

    mask_prob: float = 0.15
    geometric_p: float = 0.2
    max_span: int = 10
    replace_prob: float = 0.8
    random_prob: float = 0.1
    max_word_pieces: int = 8

    def check(self) -> None:
        """Raises: ValueError naming the value and the rule."""
        for name in ("mask_prob", "replace_prob", "random_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"span_masking.{name} ({value}) must be in [0, 1]")
        if not 0.0 < self.geometric_p <= 1.0:
            raise ValueError(f"span_masking.geometric_p ({self.geometric_p}) must be in (0, 1]")
        for name in ("max_span", "max_word_pieces"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"span_masking.{name} ({value!r}) must be an integer >= 1")
        if self.replace_prob + self.random_prob > 1.0:
            raise ValueError(
                f"span_masking.replace_prob + random_prob ({self.replace_prob} + "
                f"{self.random_prob}) must be <= 1"
            )

    def span_length_pmf(self) -> np.ndarray:
        """``[max_span]``: probability of a span of ``1 .. max_span`` words."""
        pmf = self.geometric_p * (1.0 - self.geometric_p) ** np.arange(self.max_span)
        return pmf / pmf.sum()


@dataclass(frozen=True)
class MaskSpans:
    """The spans :func:`select_spans` chose, in choice order.

    Attributes:
        row_S: batch row of each span.
        start_S, end_S: its token range ``[start, end)`` (it may run over tokens an earlier span
            selected; the budget counts each token once).
        words_S: the length drawn, in words (the range is shorter where it met a special token,
            the row end or the row's budget).
    """

    row_S: np.ndarray
    start_S: np.ndarray
    end_S: np.ndarray
    words_S: np.ndarray


def select_spans(
    ids_BT: np.ndarray,
    *,
    vocab: Vocab,
    cfg: SpanMaskingConfig,
    rng: np.random.Generator,
    valid_BT: np.ndarray | None = None,
    special_V: np.ndarray | None = None,
) -> tuple[np.ndarray, MaskSpans]:
    """SpanBERT's span selection (its ``SpanMasking.mask``), row by row.

    Until ``ceil(maskable * mask_prob)`` tokens of the row are selected: draw a length ``n``
    from :meth:`SpanMaskingConfig.span_length_pmf` and an anchor among the maskable tokens;
    an anchor already selected is skipped; otherwise the span starts at the anchor's word
    start and takes ``n`` whole words, stopping before a non-maskable token, at the row end, or
    at the token that meets the budget.

    Returns:
        ``(selected [B, T] bool, spans)``.

    Raises:
        ValueError: a bad ``cfg``; no word-start table.
    """
    cfg.check()
    if special_V is None:
        special_V = vocab.special_mask_V()
    maskable_BT = ~special_V[ids_BT]
    if valid_BT is not None:
        maskable_BT &= valid_BT
    start_BT = word_starts(
        ids_BT, vocab=vocab, max_word_pieces=cfg.max_word_pieces, special_BT=~maskable_BT
    )
    pmf = cfg.span_length_pmf()
    selected_BT = np.zeros(ids_BT.shape, dtype=bool)
    num_cols = ids_BT.shape[1]
    rows, starts, ends, words = [], [], [], []
    for row in range(ids_BT.shape[0]):
        maskable_T = maskable_BT[row]
        anchors_A = np.flatnonzero(maskable_T)
        budget = int(np.ceil(len(anchors_A) * cfg.mask_prob))
        if budget == 0:
            continue
        word_start_T = np.append(np.flatnonzero(start_BT[row]), num_cols)
        word_of_T = np.cumsum(start_BT[row]) - 1
        stop_T = np.append(np.flatnonzero(~maskable_T), num_cols)
        chosen_T = selected_BT[row]
        count = 0
        draws = max(8, budget)
        while count < budget:
            length_D = rng.choice(len(pmf), size=draws, p=pmf) + 1
            anchor_D = anchors_A[rng.integers(0, len(anchors_A), size=draws)]
            for length, anchor in zip(length_D.tolist(), anchor_D.tolist()):
                if chosen_T[anchor]:
                    continue
                word = word_of_T[anchor]
                start = int(word_start_T[word])
                end = int(word_start_T[min(word + length, len(word_start_T) - 1)])
                end = min(end, int(stop_T[np.searchsorted(stop_T, start)]))
                new_cum = np.cumsum(~chosen_T[start:end])
                if new_cum[-1] >= budget - count:
                    end = start + int(np.searchsorted(new_cum, budget - count)) + 1
                    count = budget
                else:
                    count += int(new_cum[-1])
                chosen_T[start:end] = True
                rows.append(row)
                starts.append(start)
                ends.append(end)
                words.append(length)
                if count >= budget:
                    break
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    spans = MaskSpans(as_array(rows), as_array(starts), as_array(ends), as_array(words))
    return selected_BT, spans


def span_mask(
    ids_BT: np.ndarray,
    *,
    vocab: Vocab,
    cfg: SpanMaskingConfig,
    rng: np.random.Generator,
    valid_BT: np.ndarray | None = None,
    special_V: np.ndarray | None = None,
    normal_ids: np.ndarray | None = None,
    with_boundaries: bool = False,
) -> tuple[np.ndarray, ...]:
    """SpanBERT masking: :func:`select_spans`, then one 80/10/10 draw per span for all its
    tokens (mask id / random ids / kept; where spans overlap the later span decides).
    With ``with_boundaries`` also the span-boundary objective's inputs: for each selected
    token, the positions of the tokens just outside its span (``start - 1`` and ``end``,
    clamped to the row) and its offset in the span (``i - start``), as ``[B, T]`` int32
    ``left_BT``, ``right_BT``, ``offset_BT`` in a dict (-1 at unselected positions).

    Args:
        ids_BT: ``[B, T]`` token ids of a signed integer dtype (not modified).
        valid_BT: bool ``[B, T]``, False on padding; None means all valid.
        special_V, normal_ids: cached ``vocab.special_mask_V()`` and its non-special ids.

    Returns:
        ``(input_ids [B, T], labels [B, T])`` of the dtype of ``ids_BT``; ``labels`` is
        ``IGNORE_INDEX`` except at selected positions, where it holds the original id.

    Raises:
        ValueError: a bad ``cfg``; no word-start table.
    """
    if special_V is None:
        special_V = vocab.special_mask_V()
    selected_BT, spans = select_spans(
        ids_BT, vocab=vocab, cfg=cfg, rng=rng, valid_BT=valid_BT, special_V=special_V
    )
    action_S = rng.random(len(spans.row_S))
    # the span each selected token belongs to (the latest one covering it)
    owner_BT = np.full(ids_BT.shape, -1, dtype=np.int64)
    for index, (row, start, end) in enumerate(
        zip(spans.row_S.tolist(), spans.start_S.tolist(), spans.end_S.tolist())
    ):
        owner_BT[row, start:end] = index
    selected_N = np.flatnonzero(selected_BT)
    action_N = action_S[owner_BT.reshape(-1)[selected_N]]
    labels_BT = np.full(ids_BT.shape, IGNORE_INDEX, dtype=ids_BT.dtype)
    labels_BT.reshape(-1)[selected_N] = ids_BT.reshape(-1)[selected_N]
    inputs_BT = ids_BT.copy()
    inputs_N = inputs_BT.reshape(-1)
    inputs_N[selected_N[action_N < cfg.replace_prob]] = vocab.mask_id
    to_random_R = selected_N[
        (action_N >= cfg.replace_prob) & (action_N < cfg.replace_prob + cfg.random_prob)
    ]
    if len(to_random_R):
        if normal_ids is None:
            normal_ids = np.flatnonzero(~special_V)
        inputs_N[to_random_R] = normal_ids[rng.integers(0, len(normal_ids), len(to_random_R))]
    if not with_boundaries:
        return inputs_BT, labels_BT
    width = ids_BT.shape[1]
    owner_N = owner_BT.reshape(-1)[selected_N]
    start_N, end_N = spans.start_S[owner_N], spans.end_S[owner_N]
    column_N = selected_N % width
    bounds = {}
    for key, value_N in (
        ("left_BT", np.maximum(start_N - 1, 0)),
        ("right_BT", np.minimum(end_N, width - 1)),
        ("offset_BT", column_N - start_N),
    ):
        table = np.full(ids_BT.shape, -1, dtype=ID_DTYPE)
        table.reshape(-1)[selected_N] = value_N
        bounds[key] = table
    return inputs_BT, labels_BT, bounds


# --- ERNIE-M back-translation masked LM ---------------------------------------------------------


def btmlm_source_len(seq_len: int) -> int:
    """Raw tokens ``n`` of a BTMLM row of ``seq_len`` positions: ``n + 3 + n <= seq_len``
    (:func:`btmlm_rows`)."""
    return (seq_len - 3) // 2


def btmlm_rows(
    raw_MR: np.ndarray,
    lang_M: np.ndarray,
    *,
    seq_len: int,
    vocab: Vocab,
    lang_tag_L: np.ndarray,
    targets: np.ndarray,
    cfg: MaskingConfig,
    rng: np.random.Generator,
    special_V: np.ndarray | None = None,
    normal_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """ERNIE-M BTMLM rows (Ouyang et al. 2021): each raw monolingual cut ``R`` of ``n`` tokens
    is laid out as ``R </s> <lang:t> <mask> * n </s>`` (then padding), ``t`` a target
    language other than the row's own, drawn uniformly from ``targets`` per row. The model
    fills the ``n`` placeholders in one no-grad pass over the unmasked row (the objective's
    first step, ``pretrain.objectives``); the loss is BERT-masked LM over ``R`` alone, with
    the filled pseudo translation as context.

    Args:
        raw_MR: ``[M, n]`` raw ids (``n = btmlm_source_len(seq_len)``).
        lang_M: ``[M]`` language index of each row.
        lang_tag_L: the ``<lang:xx>`` id of every language index (-1: none).
        targets: sorted language indices a row may be translated into (each with a tag); every
            row's language needs another one among them.
        cfg: BERT masking of ``R`` (``mask_prob``, 80/10/10, whole-word).
        rng: the only randomness: first one target draw per row, then :func:`mask_tokens`.

    Returns:
        ``[M, T]`` arrays: ``source_ids`` (the unmasked row, placeholders as mask ids),
        ``input_ids`` (``R`` masked, the rest as in ``source_ids``), ``labels`` (the original
        id at masked positions of ``R``, ``IGNORE_INDEX`` elsewhere), ``position_ids``
        (``0 .. n`` over ``R </s>``, restarting at ``<lang:t>`` as a TLM target), ``lang_ids``
        (the row's language over ``R </s>``, ``t`` from ``<lang:t>`` on, the row's on
        padding), ``doc_ids`` (0 on the row's tokens, -1 on padding), ``attention_mask``,
        ``placeholder_mask`` (True on the ``n`` placeholders); and ``target_M``.

    Raises:
        ValueError: a row too long for ``seq_len``; a row without a target language.
    """
    M, n = raw_MR.shape
    T = seq_len
    if 2 * n + 3 > T:
        raise ValueError(f"btmlm rows of {n} raw tokens need seq_len >= {2 * n + 3} (got {T})")
    targets = np.asarray(targets, dtype=np.int64)
    lang_M = np.asarray(lang_M, dtype=np.int64)
    own_M = np.isin(lang_M, targets)
    choices_M = len(targets) - own_M
    if M and choices_M.min() < 1:
        bad = int(lang_M[np.argmin(choices_M)])
        raise ValueError(f"btmlm: language index {bad} has no other target language")
    draw_M = rng.integers(0, np.maximum(choices_M, 1))
    # skip the row's own language: draws at or past its place move up by one
    place_M = np.searchsorted(targets, lang_M)
    target_M = targets[draw_M + (own_M & (draw_M >= place_M))]
    source_MT = np.full((M, T), vocab.pad_id, dtype=raw_MR.dtype)
    source_MT[:, :n] = raw_MR
    source_MT[:, n] = vocab.eos_id
    source_MT[:, n + 1] = lang_tag_L[target_M]
    source_MT[:, n + 2 : 2 * n + 2] = vocab.mask_id
    source_MT[:, 2 * n + 2] = vocab.eos_id
    real_T = np.arange(T) < 2 * n + 3
    position_T = np.zeros(T, dtype=ID_DTYPE)
    position_T[: n + 1] = np.arange(n + 1)
    position_T[n + 1 : 2 * n + 3] = np.arange(n + 2)
    lang_MT = np.repeat(lang_M[:, None], T, axis=1).astype(ID_DTYPE)
    lang_MT[:, n + 1 : 2 * n + 3] = target_M[:, None]
    doc_T = np.where(real_T, 0, -1).astype(ID_DTYPE)
    placeholder_T = np.zeros(T, dtype=bool)
    placeholder_T[n + 2 : 2 * n + 2] = True
    masked_T = np.arange(T) < n
    input_MT, labels_MT = mask_tokens(
        source_MT,
        vocab=vocab,
        cfg=cfg,
        rng=rng,
        valid_BT=np.broadcast_to(masked_T, (M, T)),
        special_V=special_V,
        normal_ids=normal_ids,
    )
    return {
        "source_ids": source_MT,
        "input_ids": input_MT,
        "labels": labels_MT,
        "position_ids": np.broadcast_to(position_T, (M, T)).copy(),
        "lang_ids": lang_MT,
        "doc_ids": np.broadcast_to(doc_T, (M, T)).copy(),
        "attention_mask": np.broadcast_to(real_T, (M, T)).copy(),
        "placeholder_mask": np.broadcast_to(placeholder_T, (M, T)).copy(),
        "target_M": target_M,
    }


# --- NSP / SOP segment pairs ------------------------------------------------------------------

SEGMENT_TASKS = ("nsp", "sop")
"""Sentence-pair tasks of :func:`segment_pairs`: BERT's next sentence prediction, ALBERT's
sentence order prediction."""


def segment_pairs(
    raw_MR: np.ndarray,
    lang_M: np.ndarray,
    *,
    task: str,
    seq_len: int,
    vocab: Vocab,
    cfg: MaskingConfig,
    rng: np.random.Generator,
    special_V: np.ndarray | None = None,
    normal_ids: np.ndarray | None = None,
    previous: dict[int, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """BERT / ALBERT segment-pair rows ``<cls> A <sep> B <sep>`` (then padding) from raw
    monolingual cuts ``R`` of ``n = seq_len - 3`` tokens (``doc </s> doc ...``, consecutive
    text of the row's language), with BERT masking over A and B.

    The rule, per row (the generator draws in this order: split points, then labels, then
    :func:`mask_tokens`):

    - A = ``R[:s]``, B = ``R[s:]``: ``s`` drawn uniformly among the boundaries of ``R`` in
      ``[1, n - 1]`` (after an eos or a sentence end of ``vocab.sentence_end_V``), ``n // 2``
      when it has none; A and B are consecutive text.
    - label 1 with probability 1/2, else 0. ``nsp``: a label-1 row's B is replaced by the B of
      another row of its language in the same batch (the one half the language's rows further
      on, cyclically: another document, never the row's own continuation), cut to the room
      left; a row whose language has no other row in the batch takes ``previous[language]``
      (the B of that language's last row in an earlier batch: a rare language still gets its
      negatives), and without one keeps its own B and label 0 (BERT's IsNext = 0,
      NotNext = 1: ``BertForPreTraining``'s ``next_sentence_label``). ``sop``: a
      label-1 row is ``<cls> B <sep> A <sep>`` (ALBERT: 0 the original order, 1 swapped:
      ``AlbertForPreTraining``'s ``sentence_order_label``).

    Returns:
        ``[M, T]`` ``input_ids``, ``labels`` (original id at masked positions, else
        ``IGNORE_INDEX``), ``position_ids`` (0 .. T-1), ``token_type_ids`` (0 on ``<cls>``, the
        first segment and its ``<sep>``; 1 on the second and the last ``<sep>``; 0 on padding),
        ``doc_ids`` (0 on the row, -1 on padding), ``attention_mask``; ``[M]`` ``pair_label``
        and ``split_M`` (``s``); ``last_B``: language index -> the B (``R[s:]``) of its last
        row here, the ``previous`` of the next batch.

    Raises:
        ValueError: an unknown task, no ``<cls>`` / ``<sep>`` in ``vocab``, rows of another
            length than ``seq_len - 3``.
    """
    if task not in SEGMENT_TASKS:
        raise ValueError(f"segment task ({task!r}) must be one of {', '.join(SEGMENT_TASKS)}")
    if vocab.cls_id is None or vocab.sep_id is None:
        raise ValueError("segment pairs need the tokenizer's <cls> and <sep> ids")
    M, n = raw_MR.shape
    T = seq_len
    if n != T - 3 or n < 2:
        raise ValueError(f"segment pairs of seq_len {T} need rows of {T - 3} >= 2 tokens (got {n})")
    ends_V = np.zeros(vocab.size, dtype=bool)
    ends_V[vocab.eos_id] = True
    if vocab.sentence_end_V is not None:
        ends_V |= vocab.sentence_end_V
    boundary_MR = np.zeros((M, n), dtype=bool)
    boundary_MR[:, 1:] = ends_V[raw_MR[:, :-1]]  # a boundary before position p
    count_M = boundary_MR.sum(axis=1)
    pick_M = rng.integers(0, np.maximum(count_M, 1))
    split_M = np.full(M, n // 2, dtype=np.int64)
    for m in np.flatnonzero(count_M).tolist():
        split_M[m] = np.flatnonzero(boundary_MR[m])[pick_M[m]]
    label_M = (rng.random(M) < 0.5).astype(np.int64)
    lang_M = np.asarray(lang_M)
    ids_MT = np.full((M, T), vocab.pad_id, dtype=raw_MR.dtype)
    type_MT = np.zeros((M, T), dtype=ID_DTYPE)
    length_M = np.zeros(M, dtype=np.int64)
    partner_M = np.full(M, -1, dtype=np.int64)
    previous = previous or {}
    if task == "nsp":
        for lang in np.unique(lang_M).tolist():
            rows = np.flatnonzero(lang_M == lang)
            if len(rows) > 1:
                partner_M[rows] = np.roll(rows, -(len(rows) // 2))
        label_M[(partner_M < 0) & ~np.isin(lang_M, list(previous))] = 0
    for m in range(M):
        s = int(split_M[m])
        first, second = raw_MR[m, :s], raw_MR[m, s:]
        if label_M[m] and task == "nsp":
            p = int(partner_M[m])
            other = raw_MR[p, int(split_M[p]) :] if p >= 0 else previous[int(lang_M[m])]
            second = np.asarray(other, dtype=raw_MR.dtype)[: n - s]
        elif label_M[m]:
            first, second = second, first
        a, b = len(first), len(second)
        ids_MT[m, 0] = vocab.cls_id
        ids_MT[m, 1 : 1 + a] = first
        ids_MT[m, 1 + a] = vocab.sep_id
        ids_MT[m, 2 + a : 2 + a + b] = second
        ids_MT[m, 2 + a + b] = vocab.sep_id
        type_MT[m, 2 + a : 3 + a + b] = 1
        length_M[m] = a + b + 3
    real_MT = np.arange(T)[None, :] < length_M[:, None]
    input_MT, labels_MT = mask_tokens(
        ids_MT,
        vocab=vocab,
        cfg=cfg,
        rng=rng,
        valid_BT=real_MT,
        special_V=special_V,
        normal_ids=normal_ids,
    )
    return {
        "input_ids": input_MT,
        "labels": labels_MT,
        "position_ids": np.broadcast_to(np.arange(T, dtype=ID_DTYPE), (M, T)).copy(),
        "token_type_ids": type_MT,
        "doc_ids": np.where(real_MT, 0, -1).astype(ID_DTYPE),
        "attention_mask": real_MT,
        "pair_label": label_M,
        "split_M": split_M,
        "last_B": {int(lang): raw_MR[m, int(split_M[m]) :] for m, lang in enumerate(lang_M)},
    }
