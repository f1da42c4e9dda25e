"""The loader's encoder-decoder (``seq2seq``) batches: T5 span corruption rows, BART / mBART
denoising rows and translation pair rows, mixed by share, resumable.

References written here: T5's rules (``random_spans_helper`` lengths, one sentinel per span in
order, inputs + targets put back together give the raw row), the documents and pairs the
synthetic corpus holds, and Hugging Face's own decoder-input shifts (``MT5``'s ``_shift_right``,
mBART's ``shift_tokens_right``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import StreamingDataset
from data_pipeline.synthetic import SYNTHETIC_EOS, synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import (
    IGNORE_INDEX,
    DenoisingConfig,
    MaskingConfig,
    Seq2SeqConfig,
)

EOS = SYNTHETIC_EOS
DATA_VOCAB = 480  # corpus ids below this; sentinels and language tags above it
SENTINELS = tuple(range(480, 500))
TAGS = {"de": 500, "en": 501, "fr": 502}
VOCAB = dataclasses.replace(
    synthetic_vocab(512),
    special_ids=tuple(range(10)) + SENTINELS + tuple(TAGS.values()),
    sentinel_ids=SENTINELS,
    lang_token_ids=TAGS,
)
S = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("seq2seq")
    written = write_synthetic_shards(
        root,
        docs={"en": 120, "fr": 80},
        pairs={"en-de": 300},
        sample_tokens=200,
        max_doc_len=30,
        vocab_size=DATA_VOCAB,
    )
    return root, written


def _ds(root: Path, *, tlm_share=0.0, denoise_share=0.0, seq2seq=None, **kw) -> StreamingDataset:
    masking = MaskingConfig(
        tlm_share=tlm_share, denoise_share=denoise_share, seq2seq=seq2seq or Seq2SeqConfig()
    )
    args = dict(dp_rank=0, dp_world_size=1, seq_len=S, batch_size=4, vocab=VOCAB, seed=3)
    return StreamingDataset(root, objective="seq2seq", masking=masking, **{**args, **kw})


def _t5_lengths(inputs_length: int) -> tuple[int, int]:
    """T5's ``random_spans_helper`` (noise 0.15, mean span 3), written out again."""

    def lengths(n: int) -> tuple[int, int]:
        noise = int(round(n * 0.15))
        spans = int(round(noise / 3.0))
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    return n, lengths(n)[1]


def _uncorrupt(inputs: list[int], targets: list[int]) -> tuple[list[int], int, int]:
    """The raw row from T5 inputs and targets (each ending in eos), the number of spans and of
    noise tokens; asserts sentinels come in order 0, 1, ... on both sides."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, span = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            span = SENTINELS.index(token)
            assert span == len(spans), "target sentinels out of order"
            spans[span] = []
        else:
            spans[span].append(token)
    out, seen = [], 0
    for token in inputs[:-1]:
        if token in SENTINELS:
            assert SENTINELS.index(token) == seen, "input sentinels out of order"
            out += spans[seen]
            seen += 1
        else:
            out.append(token)
    assert seen == len(spans)
    return out, len(spans), sum(len(v) for v in spans.values())


def _pieces_are_documents(row: list[int], docs: list[tuple]) -> None:
    """A raw row cut from the stream ``doc </s> doc </s> ...``: the parts between two eos are
    whole documents; the first part ends one, the last starts one."""
    whole = {tuple(d) for d in docs}
    parts = np.split(np.array(row), np.flatnonzero(np.array(row) == EOS) + 1)
    parts = [tuple(int(t) for t in p if t != EOS) for p in parts]
    for index, part in enumerate(parts):
        if not part:
            continue
        if 0 < index < len(parts) - 1:
            assert part in whole
        elif index == 0:
            assert any(d[len(d) - len(part) :] == part for d in whole)
        else:
            assert any(d[: len(part)] == part for d in whole)


def test_span_corruption_rows_follow_t5(corpus):
    root, written = corpus
    ds = _ds(root)
    raw_len, targets_len = _t5_lengths(S)
    assert (ds.mono_raw_len, ds.decoder_len) == (raw_len, targets_len)
    docs = [tuple(d.tolist()) for lang in written["mono"].values() for d in lang]
    it = iter(ds)
    for _ in range(6):
        batch = next(it)
        assert batch["input_ids"].shape == (4, S)
        assert batch["labels"].shape == (4, targets_len)
        assert not batch["pair_rows"].any()
        for b in range(4):
            inputs = batch["input_ids"][b].tolist()
            targets = batch["labels"][b].tolist()
            # Full rows: T5's lengths fill the source and the targets exactly.
            assert batch["attention_mask"][b].all() and IGNORE_INDEX not in targets
            raw, spans, noise = _uncorrupt(inputs, targets)
            assert len(raw) == raw_len
            assert noise == round(raw_len * 0.15) and spans == round(noise / 3.0)
            _pieces_are_documents(raw, docs)
            # Decoder: pad then the targets (T5 / MT5: decoder_start_token_id = pad = 0).
            assert batch["decoder_input_ids"][b].tolist() == [0] + targets[:-1]
            lang = batch["lang_ids"][b, 0]
            assert (batch["lang_ids"][b] == lang).all()
            assert (batch["decoder_lang_ids"][b] == lang).all()
        assert int(batch["tokens_per_lang"].sum()) == 4 * raw_len


def test_decoder_inputs_are_mt5s_shift_of_the_labels(corpus):
    from transformers import MT5Config, MT5ForConditionalGeneration

    hf = MT5ForConditionalGeneration(
        MT5Config(vocab_size=512, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)
    )
    batch = next(iter(_ds(corpus[0], tlm_share=0.5)))  # padded T5 rows beside pair rows
    shifted = hf._shift_right(batch["labels"].long())
    real = batch["labels"] != IGNORE_INDEX
    t5 = ~batch["pair_rows"]
    assert torch.equal(batch["decoder_input_ids"].long()[t5][real[t5]], shifted[t5][real[t5]])


def _pairs(batch: dict, b: int) -> list[tuple[list[int], list[int], list[int], int, int]]:
    """``(source, labels, decoder inputs, source lang, target lang)`` per pair of row ``b``."""
    out = []
    src_doc, dec_doc = batch["doc_ids"][b], batch["decoder_doc_ids"][b]
    for d in range(int(src_doc.max()) + 1):
        s, t = src_doc == d, dec_doc == d
        langs = (batch["lang_ids"][b][s].unique(), batch["decoder_lang_ids"][b][t].unique())
        assert len(langs[0]) == len(langs[1]) == 1
        out.append(
            (
                batch["input_ids"][b][s].tolist(),
                batch["labels"][b][t].tolist(),
                batch["decoder_input_ids"][b][t].tolist(),
                int(langs[0]),
                int(langs[1]),
            )
        )
    return out


def test_translation_rows_pack_pairs_both_ways_behind_the_target_tag(corpus):
    root, written = corpus
    ds = _ds(root, tlm_share=1.0, tlm_swap_prob=0.5)
    assert ds.decoder_len == S
    langs = ds.languages
    pairs = {(tuple(s.tolist()), tuple(t.tolist())) for s, t in written["pairs"]["en-de"]}
    forward = backward = 0
    it = iter(ds)
    for _ in range(5):
        batch = next(it)
        assert batch["pair_rows"].all()
        for b in range(4):
            row = _pairs(batch, b)
            assert len(row) >= 1
            for source, labels, dec, src_lang, tgt_lang in row:
                assert source[-1] == EOS and labels[-1] == EOS
                # The target language's tag starts the decoder; it is never a label.
                assert dec == [TAGS[langs[tgt_lang]]] + labels[:-1]
                assert {langs[src_lang], langs[tgt_lang]} == {"en", "de"}
                pair = (tuple(source[:-1]), tuple(labels[:-1]))
                if langs[src_lang] == "en":
                    assert pair in pairs
                    forward += 1
                else:
                    assert pair[::-1] in pairs
                    backward += 1
            # Padding: document id -1 on both sides, no label.
            pad = batch["decoder_doc_ids"][b] < 0
            assert (batch["labels"][b][pad] == IGNORE_INDEX).all()
            assert not batch["attention_mask"][b][batch["doc_ids"][b] < 0].any()
    assert forward > 10 and backward > 10, (forward, backward)


def test_a_pair_longer_than_the_row_is_cut_keeping_eos(corpus):
    ds = _ds(corpus[0], tlm_share=1.0, seq_len=12, seq2seq=Seq2SeqConfig(decoder_len=10))
    it = iter(ds)
    for _ in range(10):
        batch = next(it)
        for b in range(4):
            for source, labels, *_ in _pairs(batch, b):
                assert len(source) <= 12 and len(labels) <= 10
                assert source[-1] == EOS and labels[-1] == EOS
    assert ds.counters["truncated_tokens"] > 0


def test_mbart_denoising_rows(corpus):
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    root, written = corpus
    cfg = Seq2SeqConfig(denoising=DenoisingConfig(mask_ratio=0.35, permute_ratio=0.0))
    ds = _ds(root, denoise_share=1.0, seq2seq=dataclasses.replace(cfg, language_token=True))
    assert (ds.mono_raw_len, ds.decoder_len) == (S - 2, S)
    langs = ds.languages
    it = iter(ds)
    for _ in range(4):
        batch = next(it)
        labels = batch["labels"].long()
        # mBART: the decoder input is the labels with their last token (the language tag)
        # moved to the front (transformers' shift_tokens_right).
        shifted = shift_tokens_right(torch.where(labels < 0, 1, labels), 1)
        real = labels != IGNORE_INDEX
        assert torch.equal(batch["decoder_input_ids"].long()[real], shifted[real])
        for b in range(4):
            tag = TAGS[langs[int(batch["lang_ids"][b, 0])]]
            source = batch["input_ids"][b][batch["attention_mask"][b]].tolist()
            target = labels[b][real[b]].tolist()
            assert source[-2:] == [EOS, tag] and target[-2:] == [EOS, tag]
            assert len(target) in (S - 1, S)  # the row, eos unless it ended in one, the tag
            # Text infilling only: the source is the target with spans turned into one mask
            # each, so the unmasked source tokens are the target's in order.
            kept = [t for t in source if t != VOCAB.mask_id]
            it_target = iter(target)
            assert all(any(t == u for u in it_target) for t in kept)
            masks = source.count(VOCAB.mask_id)
            assert 1 <= masks and len(kept) < len(target) - 3


def test_bart_denoising_starts_the_decoder_with_eos(corpus):
    cfg = Seq2SeqConfig(denoising=DenoisingConfig(permute_ratio=0.0))
    batch = next(iter(_ds(corpus[0], denoise_share=1.0, seq2seq=cfg)))
    assert (batch["decoder_input_ids"][:, 0] == EOS).all()
    assert batch["labels"].shape == (4, S)


def test_mixed_batches_hold_their_share_of_pair_rows_first(corpus):
    ds = _ds(corpus[0], tlm_share=0.25, batch_size=8)
    assert ds.decoder_len == S  # translation targets are as long as their sources
    it = iter(ds)
    for _ in range(3):
        batch = next(it)
        rows = batch["pair_rows"].tolist()
        assert rows == [True] * 2 + [False] * 6
        # T5 rows beside them keep their own length, padded after it.
        t5_targets = (batch["labels"][2:] != IGNORE_INDEX).sum(1)
        assert (t5_targets == _t5_lengths(S)[1]).all()


@pytest.mark.parametrize(
    ("kw", "num_workers"),
    [({"tlm_share": 0.25}, 0), ({"denoise_share": 0.5, "tlm_share": 0.5}, 2)],
    ids=["t5+translation", "denoising+translation-workers"],
)
def test_resume_gives_the_same_batches(corpus, kw, num_workers):
    from data_pipeline.loader import StreamingLoader

    root = corpus[0]
    cfg = Seq2SeqConfig(denoising=DenoisingConfig(permute_ratio=0.0))
    full = StreamingLoader(_ds(root, seq2seq=cfg, num_workers=num_workers, **kw))
    it = iter(full)
    want = [next(it) for _ in range(6)]
    first = StreamingLoader(_ds(root, seq2seq=cfg, num_workers=num_workers, **kw))
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    resumed = StreamingLoader(_ds(root, seq2seq=cfg, num_workers=num_workers, **kw))
    resumed.load_state_dict(state)
    it = iter(resumed)
    for expected in want[3:]:
        got = next(it)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_missing_tokens_are_named(corpus):
    root = corpus[0]
    no_sentinels = dataclasses.replace(VOCAB, sentinel_ids=())
    message = "span corruption of 52-token rows needs 3 sentinel tokens; the tokenizer has 0"
    with pytest.raises(ValueError, match=message):
        _ds(root, vocab=no_sentinels)
    no_tags = dataclasses.replace(VOCAB, lang_token_ids={"en": 501})
    with pytest.raises(ValueError, match=r"language 'de' has no <lang:de> token"):
        _ds(root, tlm_share=0.5, vocab=no_tags)
    with pytest.raises(ValueError, match=r"objective.decoder_len \(4\) must be >= the span"):
        _ds(root, seq2seq=Seq2SeqConfig(decoder_len=4))
