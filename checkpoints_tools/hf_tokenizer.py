"""Our sentencepiece tokenizer as a transformers fast tokenizer (``tokenizer.json``), offline.

What to call: ``save_tokenizer(tok, out, family="decoder" | "encoder" | "encoder_decoder")`` writes
``tokenizer.json`` and ``tokenizer_config.json`` (and a copy of the sentencepiece model and
sidecar, for reference) into ``out``; ``build_fast_tokenizer(tok, family=...)`` returns the
``PreTrainedTokenizerFast`` itself (``tok`` from ``data_pipeline.tokenizer.load_tokenizer``;
``family`` sets ``padding_side`` and which specials are named). Both raise ``ValueError`` for a
sentencepiece model type or normaliser that cannot be converted exactly. Guarantee: ``encode``
of text without typed special tokens gives exactly sentencepiece's ids (the exact mode for any
text, and its limits, below). Nothing is downloaded.

The sentencepiece ``ModelProto`` is converted piece by piece into a ``tokenizers`` model of the
same kind (Unigram with its log-probabilities, or BPE with merges rebuilt from piece ranks), with
byte fallback, sentencepiece's dummy prefix and whitespace-as-``▁`` (a normaliser; no
pre-tokenizer splits the text, as sentencepiece does not) and no normalisation (our models use
the identity rule). Control symbols (``<pad>``, ``<mask>``, ``<lang:xx>``, ``<extra_id_N>``, ...)
keep their ids and are special added tokens (``special: true``, not normalised); their scores are
set far below any real piece, so the model never produces them from ordinary text.

Special tokens typed in text stay special, as in XLM-R's and Llama's transformers tokenizers
(``split_special_tokens=False``, transformers' default): ``"Paris is the <mask> of France."``
gives the ``<mask>`` id, so ``pipeline("fill-mask")`` works on typed text. This is where the
export differs from our sentencepiece model, which spells a literal ``"<mask>"`` out (a document
may contain that string): ``tok(text, split_special_tokens=True)`` (or
``tok.encode(text, split_special_tokens=True)``) gives exactly sentencepiece's ids for any text.
Known limits of that exact mode (text that spells our special pieces out): tokenizers penalises
an unknown character from the lowest score in the vocabulary, so a literal "<mask>" next to a
character the model does not cover still matches the control piece; and a literal byte-piece
name ("<0x41>") matches that piece (byte fallback finds byte pieces by name).
Decoders and encoders have no post-processor: ``encode(text)`` of text without typed special tokens
gives exactly sentencepiece's ids; a caller adds ``<s>``/``</s>`` (or ``<cls>``/``<sep>``) itself.
An encoder with BERT's pair head (``family="bert"``) frames texts as its training rows were: ``<cls>
A <sep>``, pairs ``<cls> A <sep> B <sep>`` with ``token_type_ids`` 0 then 1
(``transforms.segment_pairs``). Encoder-decoders end every text with ``</s>`` (``$A </s>``, pairs
``$A </s> $B </s>``), as T5's and mBART's tokenizers do and as our seq2seq sources are (translation
sources are ``text </s>``, span-corrupted inputs end in eos), so ``model.generate(**tok(texts))``
sees what training saw; ``add_special_tokens=False`` gives sentencepiece's ids alone. Their
sentinels ``<extra_id_N>`` and language tokens ``<lang:xx>`` are ``extra_special_tokens`` with our
ids (a translation-trained model starts its decoder with ``<lang:xx>`` of the target language: pass
``decoder_start_token_id=tok.convert_tokens_to_ids("<lang:es>")`` to ``generate``; the exported
``generation_config.json`` keeps the pre-training start, pad for T5 shapes, eos for mBART).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data_pipeline.tokenizer import Tokenizer

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Below every real log-probability, so Viterbi never picks a control symbol.
_NEVER = -1e9
# family -> padding side (a decoder generates at the right edge of every row)
FAMILIES = {"decoder": "left", "encoder": "right", "encoder_decoder": "right", "bert": "right"}
"""Tokenizer kinds: the model families, and ``bert`` (an encoder with BERT's segments and pair
head, ``model.pair_head``: trained on ``<cls> A <sep> B <sep>`` rows)."""


def _model_proto(tok: Tokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.sp.serialized_model_proto())
    return proto


def build_fast_tokenizer(tok: Tokenizer, *, family: str) -> Any:
    """A ``PreTrainedTokenizerFast`` that encodes text exactly as ``tok``'s sentencepiece model.

    Args:
        tok: our loaded tokenizer (``data_pipeline.tokenizer.load_tokenizer``).
        family: ``decoder``, ``encoder`` or ``encoder_decoder`` (sets ``padding_side``, which
            specials are named and, for encoder-decoders, the ``$A </s>`` post-processor).

    Raises:
        ValueError: a sentencepiece model type or normaliser we cannot convert exactly, or an
            unknown family.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"tokenizer export family ({family!r}) must be one of {list(FAMILIES)}")
    proto = _model_proto(tok)
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ValueError(
            f"tokenizer {str(tok.directory)!r} normaliser ({norm.name!r}) must be 'identity' to "
            "convert exactly"
        )
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("tokenizer treat_whitespace_as_suffix (True) must be False to convert")
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    unk_id = tok.special_ids["unk"]
    model_type = proto.trainer_spec.model_type  # 1 unigram, 2 bpe
    if model_type == 1:
        vocab = [
            (p.piece, _NEVER if p.type in (_CONTROL, _UNUSED) else float(p.score))
            for p in proto.pieces
        ]
        model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    elif model_type == 2:
        model = _bpe_model(proto, unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        raise ValueError(f"tokenizer model_type ({model_type}) must be unigram or bpe to convert")
    raw = RawTokenizer(model)
    # Not a Metaspace pre-tokenizer: it skips the dummy prefix when the text already starts with
    # a space, which sentencepiece does not.
    steps_in = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    raw.normalizer = normalizers.Sequence([*steps_in, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " ")]
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    raw.decoder = decoders.Sequence(steps)

    specials = tok.special_ids
    pieces = [p.piece for p in proto.pieces]

    def special(piece: str) -> AddedToken:
        # Typed in text, a special token takes the spaces around it: the text on either side is
        # then encoded as sentencepiece encodes a text of its own (one dummy prefix), so
        # "Hello <mask> world" gives ▁Hello <mask> ▁world, not stray ▁ pieces beside the mask.
        return AddedToken(piece, lstrip=True, rstrip=True, normalized=False, special=True)

    named = {
        "pad_token": pieces[specials["pad"]],
        "unk_token": pieces[specials["unk"]],
        "bos_token": pieces[specials["bos"]],
        "eos_token": pieces[specials["eos"]],
    }
    if family == "encoder_decoder":
        named["mask_token"] = pieces[specials["mask"]]  # BART's infilling mask
    if family in ("encoder", "bert"):
        named.update(
            mask_token=pieces[specials["mask"]],
            cls_token=pieces[specials["cls"]],
            sep_token=pieces[specials["sep"]],
        )
    extra = [p.piece for p in proto.pieces if p.type == _CONTROL and p.piece not in named.values()]
    raw.add_special_tokens([special(piece) for piece in [*named.values(), *extra]])
    if family == "encoder_decoder":
        eos = (named["eos_token"], specials["eos"])
        raw.post_processor = processors.TemplateProcessing(
            single=f"$A {eos[0]}", pair=f"$A {eos[0]} $B {eos[0]}", special_tokens=[eos]
        )
    if family == "bert":
        cls, sep = (named["cls_token"], specials["cls"]), (named["sep_token"], specials["sep"])
        raw.post_processor = processors.TemplateProcessing(
            single=f"{cls[0]} $A {sep[0]}",
            pair=f"{cls[0]} $A {sep[0]} $B:1 {sep[0]}:1",
            special_tokens=[cls, sep],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        **named,
        extra_special_tokens=extra,
        # typed "<mask>", "<lang:xx>", ... stay special, as transformers users expect
        split_special_tokens=False,
        padding_side=FAMILIES[family],
        **(
            {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
            if family == "bert"
            else {}
        ),  # fmt: skip
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    return fast


def _bpe_model(proto: Any, *, unk_id: int, byte_fallback: bool) -> Any:
    """BPE merges from sentencepiece piece ranks (the rule transformers' converters use)."""
    from tokenizers import models

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[left], vocab[right], rank, left, right))
    merges.sort(key=lambda m: (m[2], m[0], m[1]))
    return models.BPE(
        vocab,
        [(m[3], m[4]) for m in merges],
        unk_token=proto.pieces[unk_id].piece,
        byte_fallback=byte_fallback,
        fuse_unk=True,
        dropout=None,
    )


def save_tokenizer(tok: Tokenizer, out: str | os.PathLike, *, family: str) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (and a copy of the sentencepiece
    model and sidecar, for reference) into ``out``.

    Raises:
        ValueError: see :func:`build_fast_tokenizer`.
    """
    fast = build_fast_tokenizer(tok, family=family)
    fast.save_pretrained(str(out))
    out = Path(out)
    (out / "rosetta_spm.model").write_bytes((tok.directory / tok.meta["model_file"]).read_bytes())
    (out / "rosetta_spm.json").write_bytes((tok.directory / "spm.json").read_bytes())
