"""Sentencepiece tokenizer training on an alpha-smoothed language sample, and its loading.

What to call: ``train_tokenizer(...)`` (or ``python -m data_pipeline train-tokenizer``) to make a
directory, ``load_tokenizer(dir) -> Tokenizer`` to use one (ids of specials, ``lang_ids``,
``sentinel_ids``, encode/decode); ``lang_token(lang)`` / ``sentinel_token(i)`` / ``TAG_PIECE`` name
the reserved pieces. Guarantee: the same inputs and seed give the same ``spm.model`` bytes.

A tokenizer directory holds::

    spm.model   the sentencepiece model (unigram or BPE, byte fallback, identity normalisation)
    spm.json    the sidecar: vocab size, special token ids, languages, alpha, sample sizes

Ids fixed by every Rosetta tokenizer: pad 0, unk 1, bos 2, eos 3. Then control symbols, in this
order: ``<mask>``, ``<cls>``, ``<sep>``, one ``<lang:xx>`` per language (sorted), the span
corruption sentinels ``<extra_id_0>`` ... ``<extra_id_{N-1}>``, and ``<bt>`` (``special_ids["bt"]``:
the tag of back-translated sources, Caswell et al. 2019; last, so that the ids before it are those
of tokenizers made before it; such older directories have no ``"bt"``); the sidecar states every
id.
Control symbols never come out of encoding text (a literal "<mask>" in a document is spelled out in
ordinary pieces) and decode to the empty string; objectives insert them as ids.

Normalisation is the identity and whitespace is kept as is, so ``decode(encode(text)) == text``
for every valid text (byte fallback covers characters outside the vocabulary).

Languages are mixed for training as the loader mixes them (``sampling.language_probabilities``),
with ``n_l`` counted in characters: language ``l`` contributes ``p_l * B`` characters to a sample
of ``B = min(total characters, sample_chars)``; a language with less text than its share is
repeated (whole passes, then a random part), one with more is subsampled, document by document,
with a seeded generator so the same inputs and seed give the same sample.

Parallel text counts like monolingual text: each side of a pair is a document of its language,
so a language seen only in pairs (en-ko pairs, no Korean mono text) is a language of the
tokenizer, with its own ``<lang:xx>`` token and its share of the sample. A language's documents
are taken in a fixed order: its monolingual files, then its side of each pair (pairs sorted by
name).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipeline.sampling import check_alpha, language_probabilities
from data_pipeline.text_inputs import (
    DEFAULT_MAX_DOC_BYTES,
    MonoInput,
    PairInput,
    Rejects,
    iter_documents,
    iter_pairs,
)

MODEL_FILE = "spm.model"
SIDECAR_FILE = "spm.json"
SIDECAR_FORMAT = "rosetta-tokenizer/1"
BASE_SPECIALS = {"pad": ("<pad>", 0), "unk": ("<unk>", 1), "bos": ("<s>", 2), "eos": ("</s>", 3)}
EXTRA_SPECIALS = ("mask", "cls", "sep")
TAG_PIECE = "<bt>"
"""The back-translation tag (``special_ids["bt"]``), the last control symbol."""
BYTE_PIECES = 256
DEFAULT_SENTINELS = 100
DEFAULT_SAMPLE_CHARS = 50_000_000
MODEL_TYPES = ("unigram", "bpe")
# sentencepiece drops training sentences longer than this (bytes); long documents are cut into
# pieces of at most this size for training only
_MAX_SENTENCE_BYTES = 16384


def lang_token(lang: str) -> str:
    """The piece naming language ``lang``: ``<lang:xx>``."""
    return f"<lang:{lang}>"


def sentinel_token(index: int) -> str:
    """The ``index``-th span-corruption sentinel piece (T5 naming)."""
    return f"<extra_id_{index}>"


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: the sentencepiece processor plus its sidecar.

    Attributes:
        directory: where it was loaded from.
        sp: the sentencepiece processor.
        meta: the parsed sidecar (``spm.json``).
    """

    directory: Path
    sp: spm.SentencePieceProcessor
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def special_ids(self) -> dict[str, int]:
        """``pad``, ``unk``, ``bos``, ``eos``, ``mask``, ``cls``, ``sep``, ``bt`` -> id (``bt``:
        absent in directories made before it was reserved)."""
        return dict(self.meta["special_ids"])

    @property
    def lang_ids(self) -> dict[str, int]:
        """Language code -> id of its ``<lang:xx>`` token."""
        return dict(self.meta["lang_ids"])

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... in that order."""
        return list(self.meta["sentinel_ids"])

    @property
    def model_sha256(self) -> str:
        return str(self.meta["model_sha256"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos added)."""
        return self.sp.encode(texts)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of one id sequence; control symbols decode to ''."""
        return self.sp.decode([int(i) for i in ids])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory written by :func:`train_tokenizer`.

    Raises:
        FileNotFoundError: the directory, its model or its sidecar is missing.
        ValueError: the sidecar is not a Rosetta tokenizer sidecar, or the model's sha256 or
            vocab size disagree with it.
    """
    directory = Path(directory)
    sidecar = directory / SIDECAR_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"--tokenizer {str(directory)!r}: no such directory")
    if not sidecar.is_file():
        raise FileNotFoundError(f"tokenizer {str(directory)!r}: missing {SIDECAR_FILE}")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"tokenizer sidecar {str(sidecar)!r} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"tokenizer sidecar {str(sidecar)!r} must have format {SIDECAR_FORMAT}")
    model = directory / meta.get("model_file", MODEL_FILE)
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer {str(directory)!r}: missing {model.name}")
    digest = sha256_file(model)
    if digest != meta.get("model_sha256"):
        raise ValueError(
            f"tokenizer model {str(model)!r} sha256 {digest[:12]} != sidecar's "
            f"{str(meta.get('model_sha256'))[:12]}: the model was replaced after training"
        )
    sp = spm.SentencePieceProcessor(model_file=str(model))
    if sp.get_piece_size() != meta.get("vocab_size"):
        raise ValueError(
            f"tokenizer model {str(model)!r} has {sp.get_piece_size()} pieces but the sidecar "
            f"says vocab_size {meta.get('vocab_size')}"
        )
    return Tokenizer(directory=directory, sp=sp, meta=meta)


def _special_pieces(languages: list[str], num_sentinels: int) -> list[str]:
    pieces = [f"<{name}>" for name in EXTRA_SPECIALS]
    pieces += [lang_token(lang) for lang in languages]
    pieces += [sentinel_token(i) for i in range(num_sentinels)]
    return pieces + [TAG_PIECE]


def _lang_rng(seed: int, lang: str) -> np.random.Generator:
    # keyed by the language's name, not its position, so adding a language changes no other's
    return np.random.default_rng([seed, zlib.crc32(lang.encode("utf-8"))])


def _write_training_lines(out, text: str) -> int:
    """Write one document as training sentences; return characters written."""
    written = 0
    for line in text.split("\n"):
        while line:
            piece = line[: _MAX_SENTENCE_BYTES // 4]  # <= 4 UTF-8 bytes per character
            line = line[len(piece) :]
            if piece.strip():
                out.write(piece + "\n")
                written += len(piece)
    return written


def _why_unusable(rejects: Rejects, *, max_doc_bytes: int, text_field: str) -> str:
    """Why nothing of an input was usable, from its reject counts."""
    reasons = {
        "too_long": f"longer than --max-doc-bytes ({max_doc_bytes:,})",
        "empty": "empty",
        "invalid_utf8": "not valid UTF-8",
        "bad_json": f"not JSON with a string {text_field!r} field",
        "malformed": "not source<TAB>target",
    }
    counts = [f"{n:,} {reasons[r]}" for r, n in rejects.as_dict().items() if n]
    return ", ".join(counts) if counts else "the files hold no text"


def _documents_of(
    lang: str,
    mono: MonoInput | None,
    pairs: list[PairInput],
    *,
    fmt: str,
    text_field: str,
    max_doc_bytes: int,
) -> Iterator[str]:
    """Every document of ``lang``: its monolingual files, then its side of each pair."""
    if mono is not None:
        for path in mono.paths:
            for _, text in iter_documents(
                path, fmt=fmt, text_field=text_field, max_doc_bytes=max_doc_bytes, rejects=Rejects()
            ):
                yield text
    for pair in pairs:
        if lang in (pair.src, pair.tgt):
            side = 2 if lang == pair.src else 3
            for record in iter_pairs(pair, max_doc_bytes=max_doc_bytes, rejects=Rejects()):
                yield record[side]


def _make_out_dir(out: Path) -> Path | None:
    """Create ``out``; return the topmost directory this created (to remove on failure).

    Raises:
        ValueError: ``out`` (or a parent) is a file, or cannot be created.
    """
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file, not a directory")
        return None
    top = out
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        out.mkdir(parents=True)
    except OSError as err:
        raise ValueError(f"--out {str(out)!r}: cannot create it ({err.strerror})") from None
    return top


def train_tokenizer(
    inputs: list[MonoInput],
    *,
    pairs: list[PairInput] | None = None,
    vocab_size: int,
    out: str | os.PathLike,
    alpha: float = 0.3,
    model_type: str = "unigram",
    num_sentinels: int = DEFAULT_SENTINELS,
    sample_chars: int = DEFAULT_SAMPLE_CHARS,
    character_coverage: float = 0.9995,
    seed: int = 0,
    fmt: str = "auto",
    text_field: str = "text",
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    num_threads: int | None = None,
) -> dict:
    """Train a sentencepiece model on an alpha-smoothed sample of ``inputs`` and both sides of
    ``pairs``; write ``out``.

    The tokenizer's languages are those of ``inputs`` and of ``pairs``, sorted. Nothing is left
    behind on failure: a directory ``out`` that this call created is removed again.

    Returns:
        The sidecar written to ``out/spm.json``.

    Raises:
        ValueError: a bad argument (vocab size too small for the special and byte pieces, alpha
            outside (0, 1], unknown model type, ``out`` a file), an input or pair with no usable
            document (the message says why), or a vocab size sentencepiece cannot reach on this
            input.
        InputError: a truncated or corrupt compressed input, a TSV without tabs, line-aligned
            pair files of different lengths (``text_inputs.InputError``, a ValueError).
        FileNotFoundError: an input file is missing.
    """
    alpha = check_alpha(alpha, name="--alpha")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"--model-type {model_type!r} must be one of {', '.join(MODEL_TYPES)}")
    pairs = sorted(pairs or [], key=lambda pair: pair.name)
    if not inputs and not pairs:
        raise ValueError("--input or --parallel: give at least one LANG=PATH or SRC-TGT=PATH")
    seen: set[str] = set()
    for item in inputs:
        if item.lang in seen:
            raise ValueError(
                f"--input {item.lang}: the language is given twice; give it once with all its "
                "files (parse_mono_specs merges repeated specs)"
            )
        seen.add(item.lang)
    if num_sentinels < 0:
        raise ValueError(f"--sentinels ({num_sentinels}) must be >= 0")
    if sample_chars < 1:
        raise ValueError(f"--sample-chars ({sample_chars}) must be >= 1")
    languages = sorted({i.lang for i in inputs} | {x for p in pairs for x in (p.src, p.tgt)})
    specials = _special_pieces(languages, num_sentinels)
    minimum = len(BASE_SPECIALS) + len(specials) + BYTE_PIECES + 1
    if vocab_size < minimum:
        raise ValueError(
            f"--vocab-size ({vocab_size}) must be >= {minimum}: 4 base specials, "
            f"{len(specials)} control symbols, {BYTE_PIECES} byte pieces and at least one more"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    reader = dict(fmt=fmt, text_field=text_field, max_doc_bytes=max_doc_bytes)
    why = dict(max_doc_bytes=max_doc_bytes, text_field=text_field)

    # pass 1: how much text each language has (every input read once, before anything is
    # written, so that a bad file stops the job with nothing left behind)
    chars = dict.fromkeys(languages, 0)
    docs = dict.fromkeys(languages, 0)
    pair_docs = dict.fromkeys(languages, 0)
    rejects = Rejects()
    for item in inputs:
        mine = Rejects()
        for path in item.paths:
            for _, text in iter_documents(path, rejects=mine, **reader):
                chars[item.lang] += len(text)
                docs[item.lang] += 1
        rejects.merge(mine)
        if docs[item.lang] == 0:
            raise ValueError(
                f"--input {item.lang}: no usable document in {len(item.paths)} file(s) "
                f"({_why_unusable(mine, **why)})"
            )
    for pair in pairs:
        mine = Rejects()
        count = 0
        for _, _, src, tgt in iter_pairs(pair, max_doc_bytes=max_doc_bytes, rejects=mine):
            chars[pair.src] += len(src)
            chars[pair.tgt] += len(tgt)
            count += 1
        rejects.merge(mine)
        if count == 0:
            raise ValueError(
                f"--parallel {pair.name}: no usable pair in {len(pair.paths)} file(s) "
                f"({_why_unusable(mine, **why)})"
            )
        for lang in (pair.src, pair.tgt):
            docs[lang] += count
            pair_docs[lang] += count
    probs = language_probabilities(chars, alpha=alpha)
    budget = min(sum(chars.values()), sample_chars)
    mono = {i.lang: i for i in inputs}
    created = _make_out_dir(out)
    try:
        # pass 2: the smoothed sample, written as sentencepiece's one-sentence-per-line input
        sampled: dict[str, int] = {}
        with tempfile.TemporaryDirectory(prefix=".spm-train-", dir=out) as tmp:
            sample_path = Path(tmp) / "sample.txt"
            with open(sample_path, "w", encoding="utf-8") as sample:
                for lang in languages:
                    rate = probs[lang] * budget / chars[lang]
                    whole, frac = int(rate), rate - int(rate)
                    rng = _lang_rng(seed, lang)
                    written = 0
                    for text in _documents_of(lang, mono.get(lang), pairs, **reader):
                        copies = whole + int(rng.random() < frac)
                        for _ in range(copies):
                            written += _write_training_lines(sample, text)
                    sampled[lang] = written
            model = io.BytesIO()
            try:
                with open(sample_path, encoding="utf-8") as lines:
                    # an iterator and an in-memory writer keep temporary paths out of the model's
                    # trainer_spec, so the same inputs and seed give a byte-identical model
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=(line.rstrip("\n") for line in lines),
                        model_writer=model,
                        model_type=model_type,
                        vocab_size=vocab_size,
                        character_coverage=character_coverage,
                        byte_fallback=True,
                        normalization_rule_name="identity",
                        remove_extra_whitespaces=False,
                        split_digits=True,
                        allow_whitespace_only_pieces=True,
                        pad_id=BASE_SPECIALS["pad"][1],
                        unk_id=BASE_SPECIALS["unk"][1],
                        bos_id=BASE_SPECIALS["bos"][1],
                        eos_id=BASE_SPECIALS["eos"][1],
                        pad_piece=BASE_SPECIALS["pad"][0],
                        unk_piece=BASE_SPECIALS["unk"][0],
                        bos_piece=BASE_SPECIALS["bos"][0],
                        eos_piece=BASE_SPECIALS["eos"][0],
                        control_symbols=specials,
                        input_sentence_size=0,
                        max_sentence_length=_MAX_SENTENCE_BYTES,
                        num_threads=num_threads or os.cpu_count() or 1,
                        minloglevel=2,
                    )
            except RuntimeError as err:
                # sentencepiece reports e.g. "Vocabulary size is smaller than required_chars"
                reason = (
                    str(err).strip().splitlines()[-1] if str(err).strip() else "training failed"
                )
                reason = reason.split("] ", 1)[-1]  # drop "INTERNAL: file.cc(638) [condition]"
                raise ValueError(
                    f"--vocab-size ({vocab_size}) does not fit this input: sentencepiece: {reason}"
                ) from None
        model_tmp = out / f".{MODEL_FILE}.tmp"
        model_tmp.write_bytes(model.getvalue())

        sp = spm.SentencePieceProcessor(model_file=str(model_tmp))
        piece_ids = {piece: sp.piece_to_id(piece) for piece in specials}
        special_ids = {name: idx for name, (_, idx) in BASE_SPECIALS.items()}
        special_ids.update({name: piece_ids[f"<{name}>"] for name in EXTRA_SPECIALS})
        special_ids["bt"] = piece_ids[TAG_PIECE]
        meta = {
            "format": SIDECAR_FORMAT,
            "model_file": MODEL_FILE,
            "model_sha256": sha256_file(model_tmp),
            "model_type": model_type,
            "vocab_size": sp.get_piece_size(),
            "special_ids": special_ids,
            "special_pieces": {name: sp.id_to_piece(idx) for name, idx in special_ids.items()},
            "lang_ids": {lang: piece_ids[lang_token(lang)] for lang in languages},
            "sentinel_ids": [piece_ids[sentinel_token(i)] for i in range(num_sentinels)],
            "byte_fallback": True,
            "normalization": "identity",
            "character_coverage": character_coverage,
            "languages": languages,
            "parallel": [pair.name for pair in pairs],
            "alpha": alpha,
            "seed": seed,
            "sample": {
                "unit": "characters",
                "budget": budget,
                "languages": {
                    lang: {
                        "documents": docs[lang],
                        "pair_documents": pair_docs[lang],
                        "n": chars[lang],
                        "q": chars[lang] / sum(chars.values()),
                        "p": probs[lang],
                        "sampled": sampled[lang],
                    }
                    for lang in languages
                },
            },
            "rejected": rejects.as_dict(),
        }
        # the model first, the sidecar last: a directory with a sidecar is complete
        os.replace(model_tmp, out / MODEL_FILE)
        sidecar_tmp = out / f".{SIDECAR_FILE}.tmp"
        sidecar_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(sidecar_tmp, out / SIDECAR_FILE)
        return meta
    except BaseException:
        if created is not None:  # a failed run leaves no (empty) directory behind
            shutil.rmtree(created, ignore_errors=True)
        else:
            (out / f".{MODEL_FILE}.tmp").unlink(missing_ok=True)
        raise
