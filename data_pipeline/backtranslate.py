"""Back-translation: monolingual text -> a translator -> synthetic parallel shards with provenance.

What to call: ``python -m data_pipeline backtranslate --translator BACKEND --tokenizer DIR
--input LANG=PATH|SHARDS --to LANG --out DIR`` (``data_pipeline.cli``), or the tested pieces:
``make_translator(spec, options)`` (a :class:`Translator` from ``apertium:PAIR``, ``hf:DIR`` or
``reverse:``; ``ValueError`` naming the backend when it is unknown or unusable),
``register_backend(prefix, factory)`` (more backends), ``parse_inputs(specs)``,
``parse_decode(spec)``, and ``run_backtranslate(inputs, translator=..., tokenizer=..., to=...,
out=..., settings=BTSettings(...))`` (returns the manifest written).

Guarantees: ``out`` ends as a shard directory whose ``manifest.json`` lists one pair set
``<to>-<lang>`` per input language, marked ``"synthetic": true`` with its ``"provenance"``
(backend and its settings: model sha256 or apertium package versions; decoding, seed, length
filters, inputs), and ``documents + sum(rejected) == input documents`` for each; the bytes
written depend only on the inputs, the translator and the settings, not on how many processes,
array tasks or threads did the work, nor on how often the job was killed and resumed.

Direction (fairseq's recipe): the input is target-side monolingual text of language ``lang``;
the translator translates it into ``--to``. The synthetic pair's **source is the translation**
(``--to``) and its **target the original text** (``lang``): pair set ``<to>-<lang>``, fit to
train a ``<to> -> <lang>`` model, whose target side is always real text. ``--tag`` puts the
tokenizer's reserved ``<bt>`` control token (``special_ids["bt"]``) in front of every synthetic
source (Caswell et al. 2019); every tokenizer ``train_tokenizer`` makes reserves it, and an older
directory without it is refused.

Backends and the registry. ``data_pipeline`` imports none of Rosetta's other packages (a data
engineer installs and runs it alone), so a backend that needs our model code is not built in:
``register_backend(prefix, factory)`` adds one from outside (``factory(arg, options) ->
Translator``), and a backend prefix not registered is looked up among the ``rosetta.translators``
entry points (``ckpt = some.module:factory``) before it is refused. Our own checkpoints
(``ckpt:DIR``) come in this way, or through their Hugging Face export as ``hf:DIR``. Built in:

- ``apertium:PAIR`` (``apertium:spa-eng``): Debian's rule-based translator, one ``apertium -u
  PAIR`` process per batch. Every non-blank line of a document is sent as a paragraph of its own
  (a blank line after it: apertium otherwise carries sentence context over line ends, e.g. it
  lowercases a line after one ending in ":"), so a line's translation is the one it gets alone,
  whatever its neighbours in the batch; blank lines are kept as they are and the document is
  joined again with its newlines. Deterministic: only ``--decode greedy``.
  Provenance: the installed apertium packages' versions (``dpkg-query``).
- ``hf:DIR``: a transformers directory with safetensors weights, loaded with
  ``AutoModelForSeq2SeqLM`` (``config.is_encoder_decoder``) or ``AutoModelForCausalLM`` (the
  prompt is the document; the continuation is its translation), never ``trust_remote_code``
  and never pickled weights; ``generate()`` per batch with the ``--decode`` settings, seeded per
  batch. A seq2seq model whose tokenizer has the ``<lang:xx>`` token of ``--to`` (our own
  encoder-decoder exports) starts its decoder with it, as our translation objective trains it.
  Provenance: sha256 of every weight file and of the config.
- ``reverse:`` (``reverse:sleep=S``): a fake for tests: each text reversed, character by
  character; ``sleep`` waits S seconds per batch (and is no part of the provenance).

How: each input language's documents are read in order (text files as ``shard`` reads them, or
the mono documents of a shard directory decoded with that directory's own tokenizer) and cut into
chunks of ``shard_docs`` documents; chunk ``k`` (numbered over all languages) becomes shard
``pair_<to>-<lang>_<k>.tar``. Within a chunk the documents are sorted by length and translated
in batches of at most ``batch_tokens`` padded tokens (counted with the run's tokenizer), each
batch with its own seed drawn from ``seed``, the pair and the chunk and batch numbers. The
translations are filtered as fairseq's recipe filters them, lengths counted in tokens of the
run's tokenizer: ``empty_translation``; ``over_max_len`` (a side longer than ``max_len_a *
len(original) + max_len_b``); ``length_ratio`` (longer side over shorter side above 1.5).
These counts join the reader's own (``invalid_utf8``, ``empty``, ...) under ``rejected``.

Work is dealt chunk by chunk: chunk ``k`` belongs to slot ``k mod (parts * world_size)``, where
the slot of rank ``r`` of array task ``i`` is ``i * world_size + r`` (under torchrun every rank
takes its share; ``launch.preprocess backtranslate --array N`` runs N tasks into the same
``--out``, then one ``--finalize``). A chunk's shard is written under a temporary name and
renamed when complete, then a record of it (``.backtranslate/<stem>.json``: fingerprint of the
chunk's texts, translator and settings; counts; sha256) is written the same way. A rerun keeps
every chunk whose record matches and redoes the others, so a killed job loses no finished chunk
and duplicates none. The manifest (and ``text/<to>-<lang>.tsv`` with ``--keep-text``: original
TAB translation per kept pair, in input order, tabs and newlines inside a text shown as spaces)
is written last, from the records of every chunk, once all of them exist; a failure (bad input,
a translator that crashes or returns another number of texts) writes none and names the reason
in one line. ``--out`` is a directory of its own: one holding monolingual or real parallel
shards is refused (finalizing removes pair shards it did not make); join it to others with
``merge``. Each record also keeps the chunk's ``seconds`` and ``translated_tokens`` (original
tokens, run tokenizer), for throughput.

Processes: under torchrun, :func:`torchrun_share` joins a gloo group (torch reads the launcher's
environment itself) used only for one barrier before rank 0 finalizes; ``workers`` threads
translate chunks at once for a backend that allows it (``concurrent``: apertium, reverse); the
``hf`` backend takes them as torch threads instead.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from data_pipeline.manifest import MANIFEST_FILE, MANIFEST_FORMAT, load_manifest, write_manifest
from data_pipeline.shard import SHARD_NAME_RE, _check_out_dir, _copy_tokenizer, _sample_bounds
from data_pipeline.shard_format import (
    DEFAULT_SAMPLE_TOKENS,
    PAIR_EXT,
    ShardWriter,
    dtype_name,
    encode_pair_payload,
    iter_documents_of_sample,
    iter_shard_samples,
    token_dtype,
)
from data_pipeline.text_inputs import (
    DEFAULT_MAX_DOC_BYTES,
    LANG_RE,
    Rejects,
    iter_documents,
    parse_mono_specs,
)
from data_pipeline.tokenizer import TAG_PIECE, Tokenizer, lang_token, load_tokenizer, sha256_file

DEFAULT_SHARD_DOCS = 10_000
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_MAX_LEN_A = 0.0
DEFAULT_MAX_LEN_B = 250
MAX_LENGTH_RATIO = 1.5
"""fairseq's back-translation filter (``clean-corpus-n``'s ratio): longer side / shorter side."""
DEFAULT_TIMEOUT_S = 600.0
BT_REJECTS = ("empty_translation", "over_max_len", "length_ratio")
RECORD_DIR = ".backtranslate"
_FINGERPRINT_VERSION = 1
_TMP_RE = re.compile(r"^\..*\.tmp-\d+$")


# --- decoding settings and the translator protocol ---------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """How a learned translator picks its output (``--decode``)."""

    mode: str = "greedy"
    """greedy | beam | sample."""
    num_beams: int = 1
    top_k: int = 0
    """sample: keep the k most likely tokens (0: all, fairseq's unrestricted sampling)."""
    top_p: float = 1.0
    temperature: float = 1.0

    def as_dict(self) -> dict:
        if self.mode == "greedy":
            return {"mode": "greedy"}
        if self.mode == "beam":
            return {"mode": "beam", "num_beams": self.num_beams}
        return {"mode": "sample", "top_k": self.top_k, "top_p": self.top_p,
                "temperature": self.temperature}  # fmt: skip

    def generate_kwargs(self) -> dict:
        """The matching ``transformers`` ``generate()`` keyword arguments."""
        if self.mode == "sample":
            return {"do_sample": True, "num_beams": 1, "top_k": self.top_k, "top_p": self.top_p,
                    "temperature": self.temperature}  # fmt: skip
        return {"do_sample": False, "num_beams": self.num_beams}


def parse_decode(spec: str) -> DecodeSettings:
    """``greedy``, ``beam:N`` or ``sample[:top_k=K,top_p=P,temperature=T]``.

    Raises:
        ValueError: ``--decode`` and the rule it breaks.
    """
    mode, _, rest = spec.partition(":")
    if mode == "greedy" and not rest:
        return DecodeSettings()
    if mode == "beam":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"--decode {spec!r}: beam:N needs a beam size N >= 1")
        return DecodeSettings(mode="beam", num_beams=int(rest))
    if mode == "sample":
        values: dict = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("top_k", "top_p", "temperature"):
                raise ValueError(
                    f"--decode {spec!r}: {item!r} must be top_k=K, top_p=P or temperature=T"
                )
            try:
                values[key] = int(value) if key == "top_k" else float(value)
            except ValueError:
                raise ValueError(f"--decode {spec!r}: {key} ({value!r}) must be a number") from None
        settings = DecodeSettings(mode="sample", **values)
        if settings.top_k < 0 or not 0 < settings.top_p <= 1 or not settings.temperature > 0:
            raise ValueError(
                f"--decode {spec!r}: top_k must be >= 0, top_p in (0, 1], temperature > 0"
            )
        return settings
    raise ValueError(
        f"--decode {spec!r} must be greedy, beam:N or sample[:top_k=K,top_p=P,temperature=T]"
    )


@dataclass(frozen=True)
class TranslatorOptions:
    """What a backend factory is given besides its argument."""

    decode: DecodeSettings = field(default_factory=DecodeSettings)
    max_len_a: float = DEFAULT_MAX_LEN_A
    """Generation stops after ``max_len_a * source length + max_len_b`` tokens (fairseq)."""
    max_len_b: int = DEFAULT_MAX_LEN_B
    timeout_s: float = DEFAULT_TIMEOUT_S
    """A subprocess backend gives up on a batch after this long."""
    threads: int | None = None
    """Intra-op threads of an in-process model (None: the library's default)."""
    target: str | None = None
    """The language translated into (``--to``), for a multilingual model that is told it (our
    own checkpoints start the decoder with ``<lang:xx>``)."""


class Translator(Protocol):
    """A batch of texts in, as many translations out, in the same order.

    ``name`` (``apertium:spa-eng``) and ``settings`` (JSON data: model checksum, package versions,
    decoding) are stored as the pair set's provenance and decide whether a finished chunk may be
    kept on a rerun. ``concurrent``: whether several threads may call ``translate`` at once.
    ``translate`` gets a seed per batch (a deterministic translator ignores it); it raises
    ``ValueError`` for a failure it can name.
    """

    name: str
    settings: dict
    concurrent: bool

    def translate(self, texts: list[str], *, seed: int) -> list[str]: ...


TranslatorFactory = Callable[[str, TranslatorOptions], Translator]
_BACKENDS: dict[str, TranslatorFactory] = {}
ENTRY_POINT_GROUP = "rosetta.translators"


def register_backend(prefix: str, factory: TranslatorFactory) -> None:
    """Make ``--translator PREFIX:ARG`` call ``factory(ARG, options)``.

    Raises:
        ValueError: ``prefix`` is not a lowercase word.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix):
        raise ValueError(f"backend prefix {prefix!r} must be a lowercase word")
    _BACKENDS[prefix] = factory


def _entry_point(prefix: str) -> TranslatorFactory | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == prefix:
            return ep.load()
    return None


def make_translator(spec: str, options: TranslatorOptions | None = None) -> Translator:
    """The translator ``spec`` (``PREFIX:ARG``) names.

    Raises:
        ValueError: a spec without ``:``, an unknown backend, or what the backend refuses (a
            missing program, pair, directory or weights).
    """
    prefix, sep, arg = spec.partition(":")
    if not sep:
        raise ValueError(f"--translator {spec!r} must be BACKEND:ARG (e.g. apertium:spa-eng)")
    factory = _BACKENDS.get(prefix) or _entry_point(prefix)
    if factory is None:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"--translator {spec!r}: unknown backend {prefix!r} (known: {known})")
    return factory(arg, options or TranslatorOptions())


# --- built-in backends -------------------------------------------------------------------------


def _run_quiet(argv: list[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


class ApertiumTranslator:
    """``apertium -u PAIR`` in a subprocess per batch (see the module docstring)."""

    concurrent = True

    def __init__(self, pair: str, options: TranslatorOptions) -> None:
        spec = f"apertium:{pair}"
        if not re.fullmatch(r"[a-z]{2,3}(_[A-Za-z]+)?-[a-z]{2,3}(_[A-Za-z]+)?", pair):
            raise ValueError(f"--translator {spec!r}: PAIR must be a mode like spa-eng")
        if options.decode.mode != "greedy":
            raise ValueError(
                f"--decode {options.decode.mode}: apertium:{pair} is rule-based and takes only "
                "greedy"
            )
        program = shutil.which("apertium")
        if program is None:
            raise ValueError(
                f"--translator {spec!r}: the apertium program is not installed (Debian: apt-get "
                "install apertium apertium-eng-spa)"
            )
        listed = _run_quiet([program, "-l"])
        modes = listed.stdout.split() if listed is not None else []
        if pair not in modes:
            raise ValueError(
                f"--translator {spec!r}: pair {pair!r} is not installed (installed: "
                f"{', '.join(modes) or 'none'}; Debian packages are named apertium-X-Y)"
            )
        self.program = program
        self.pair = pair
        self.timeout_s = options.timeout_s
        self.name = spec
        self.settings = {"packages": _apertium_packages(), "mode": pair, "unknown_marks": False}

    def translate(self, texts: list[str], *, seed: int = 0) -> list[str]:
        lines = [text.split("\n") for text in texts]
        todo = [line for text in lines for line in text if line.strip()]
        if not todo:
            return list(texts)
        try:
            proc = subprocess.run(
                [self.program, "-u", self.pair],
                input="\n\n".join(todo) + "\n",
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ValueError(
                f"translator {self.name}: no answer within {self.timeout_s:g} s for a batch of "
                f"{len(texts)} texts"
            ) from None
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no message"])[0]
            raise ValueError(f"translator {self.name}: exit code {proc.returncode}: {why}")
        out = proc.stdout.split("\n")
        if out and out[-1] == "":
            out.pop()
        if len(out) != 2 * len(todo) - 1 or any(out[1::2]):
            raise ValueError(
                f"translator {self.name} returned {(len(out) + 1) // 2} lines for {len(todo)}: a "
                "line of the batch changed the line count"
            )
        done = iter(out[0::2])
        return ["\n".join(next(done) if line.strip() else line for line in text) for text in lines]


def _apertium_packages() -> dict[str, str]:
    """Installed apertium packages -> Debian version (``{}`` without dpkg)."""
    proc = _run_quiet(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Package}|${Version}\\n",
                       "apertium*", "lttoolbox*"])  # fmt: skip
    if proc is None:
        return {}
    found = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition("|")
        package, _, version = rest.partition("|")
        if status.startswith("ii") and version:
            found[package] = version
    return dict(sorted(found.items()))


def _weights_checksums(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


class HFTranslator:
    """A transformers seq2seq or causal-LM directory, loaded on first use (see the module
    docstring)."""

    concurrent = False

    def __init__(self, directory: str, options: TranslatorOptions) -> None:
        spec = f"hf:{directory}"
        path = Path(directory)
        if not path.is_dir():
            raise ValueError(f"--translator {spec!r}: no such directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"--translator {spec!r}: no config.json (not a transformers model)")
        weights = _weights_checksums(path)
        if not weights:
            raise ValueError(
                f"--translator {spec!r}: no *.safetensors weights (pickled weights are not loaded)"
            )
        combined = hashlib.sha256(
            "".join(f"{name} {digest}\n" for name, digest in weights.items()).encode()
        ).hexdigest()
        import transformers

        self.directory = path
        self.options = options
        self.name = f"hf:{path.name}"
        self.settings = {
            "model_sha256": combined,
            "weights_sha256": weights,
            "config_sha256": sha256_file(path / "config.json"),
            "transformers": transformers.__version__,
            "generate": options.decode.generate_kwargs(),
            "max_len_a": options.max_len_a,
            "max_len_b": options.max_len_b,
            "target": options.target,
        }
        self._model = None
        self._tokenizer = None
        self._causal = False
        self._start: dict = {}  # decoder_start_token_id=<lang:target> where the tokenizer has it

    def _load(self) -> None:
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        where = str(self.directory)
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
        self._causal = not getattr(config, "is_encoder_decoder", False)
        cls = AutoModelForCausalLM if self._causal else AutoModelForSeq2SeqLM
        try:
            model = cls.from_pretrained(
                where, trust_remote_code=False, use_safetensors=True, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"translator {self.name}: cannot load {where!r}: {first}") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self._causal:
            tokenizer.padding_side = "left"  # generation continues every row at the right edge
        elif self.options.target is not None:
            tag = tokenizer.get_added_vocab().get(lang_token(self.options.target))
            if tag is not None:
                self._start = {"decoder_start_token_id": tag}
        self._model, self._tokenizer = model.eval(), tokenizer

    def translate(self, texts: list[str], *, seed: int = 0) -> list[str]:
        import torch

        if self._model is None:
            self._load()
        tok, model = self._tokenizer, self._model
        batch = tok(texts, return_tensors="pt", padding=True)
        width = int(batch["input_ids"].shape[1])
        limit = max(1, math.ceil(self.options.max_len_a * width + self.options.max_len_b))
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                **batch,
                **self.options.decode.generate_kwargs(),
                max_new_tokens=limit,
                num_return_sequences=1,
                pad_token_id=tok.pad_token_id,
                **self._start,
            )
        if self._causal:
            out = out[:, width:]
        return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


class ReverseTranslator:
    """The test backend ``reverse:``: every text reversed (``sleep=S``: S seconds per batch)."""

    concurrent = True

    def __init__(self, arg: str, options: TranslatorOptions) -> None:
        self.sleep_s = 0.0
        for item in filter(None, arg.split(",")):
            key, _, value = item.partition("=")
            try:
                if key != "sleep":
                    raise ValueError
                self.sleep_s = float(value)
            except ValueError:
                raise ValueError(
                    f"--translator 'reverse:{arg}': {item!r} must be sleep=S"
                ) from None
        self.name = "reverse"
        self.settings = {}

    def translate(self, texts: list[str], *, seed: int = 0) -> list[str]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [text[::-1] for text in texts]


register_backend("apertium", ApertiumTranslator)
register_backend("hf", HFTranslator)
register_backend("reverse", ReverseTranslator)


# --- inputs, settings, chunks ----------------------------------------------------------------


@dataclass(frozen=True)
class BTInput:
    """One language's documents: text files, or the mono documents of a shard directory."""

    lang: str
    paths: tuple[Path, ...] = ()
    shards: Path | None = None
    """A shard directory (its ``manifest.json``'s directory) instead of ``paths``."""


def parse_inputs(specs: list[str]) -> list[BTInput]:
    """``--input LANG=PATH`` values: a file or glob (as ``shard`` takes them) or a shard
    directory (or its ``manifest.json``). Sorted by language.

    Raises:
        ValueError: a malformed spec, or a language given twice as shards.
        FileNotFoundError: no file or directory there.
    """
    texts: list[str] = []
    shards: dict[str, Path] = {}
    for spec in specs:
        lang, sep, path = spec.partition("=")
        target = Path(path)
        if sep and LANG_RE.match(lang) and (target.is_dir() or target.name == MANIFEST_FILE):
            root = target if target.is_dir() else target.parent
            if not (root / MANIFEST_FILE).is_file():
                raise FileNotFoundError(f"--input {spec!r}: no {MANIFEST_FILE} in that directory")
            if lang in shards:
                raise ValueError(f"--input {lang}: give one shard directory per language")
            shards[lang] = root
        else:
            texts.append(spec)
    found = [BTInput(m.lang, paths=m.paths) for m in parse_mono_specs(texts)]
    for item in found:
        if item.lang in shards:
            raise ValueError(f"--input {item.lang}: give text files or a shard directory, not both")
    found += [BTInput(lang, shards=root) for lang, root in shards.items()]
    return sorted(found, key=lambda item: item.lang)


@dataclass(frozen=True)
class BTSettings:
    """What, besides inputs, translator and tokenizer, decides the shards' bytes."""

    shard_docs: int = DEFAULT_SHARD_DOCS
    """Input documents per chunk (one output shard each)."""
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    """Padded tokens (run tokenizer) per translator call, at least one document."""
    max_len_a: float = DEFAULT_MAX_LEN_A
    max_len_b: int = DEFAULT_MAX_LEN_B
    tag: bool = False
    keep_text: bool = False
    seed: int = 0
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    fmt: str = "auto"
    text_field: str = "text"
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
    decode: DecodeSettings = field(default_factory=DecodeSettings)

    def check(self) -> None:
        """Raises: ValueError naming the first setting out of range."""
        for name, value, low in (
            ("--shard-docs", self.shard_docs, 1),
            ("--batch-tokens", self.batch_tokens, 1),
            ("--sample-tokens", self.sample_tokens, 1),
            ("--max-doc-bytes", self.max_doc_bytes, 1),
            ("--max-len-b", self.max_len_b, 0),
        ):
            if value < low:
                raise ValueError(f"{name} ({value}) must be >= {low}")
        if not self.max_len_a >= 0:
            raise ValueError(f"--max-len-a ({self.max_len_a}) must be >= 0")
        if self.max_len_a == 0 and self.max_len_b < 1:
            raise ValueError("--max-len-a 0 with --max-len-b 0 would reject every pair")


@dataclass
class _Doc:
    source: str
    ordinal: int
    text: str


@dataclass
class _Chunk:
    lang: str
    pair: str
    index: int
    """Numbered over all languages: the shard is ``pair_<pair>_<index>.tar``."""
    docs: list[_Doc]
    rejected: dict[str, int]
    """The reader's rejects met while reading this chunk (the last one takes the rest)."""

    @property
    def stem(self) -> str:
        return f"pair_{self.pair}_{self.index:05d}"


def _iter_input_docs(item: BTInput, settings: BTSettings, rejects: Rejects) -> Iterator[_Doc]:
    if item.shards is None:
        for path in item.paths:
            for ordinal, text in iter_documents(
                path,
                fmt=settings.fmt,
                text_field=settings.text_field,
                max_doc_bytes=settings.max_doc_bytes,
                rejects=rejects,
            ):
                yield _Doc(path.name, ordinal, text)
        return
    manifest = load_manifest(item.shards)
    tok = load_tokenizer(item.shards / manifest["tokenizer"].get("dir", "tokenizer"))
    for entry in manifest["shards"]:
        if entry["kind"] != "mono" or entry.get("lang") != item.lang:
            continue
        ordinal = 0
        for sample in iter_shard_samples(item.shards / entry["path"]):
            for ids in iter_documents_of_sample(sample):
                yield _Doc(Path(entry["path"]).name, ordinal, tok.decode(ids))
                ordinal += 1


def _iter_chunks(inputs: list[BTInput], *, to: str, settings: BTSettings) -> Iterator[_Chunk]:
    """Every chunk of every input, in order (languages sorted).

    Raises:
        ValueError: an input with no usable document.
    """
    index = 0
    for item in inputs:
        rejects = Rejects()
        taken = dict.fromkeys(rejects.as_dict(), 0)

        def new_rejects() -> dict[str, int]:
            now = rejects.as_dict()
            delta = {k: now[k] - taken[k] for k in now}
            taken.update(now)
            return delta

        docs: list[_Doc] = []
        held: _Chunk | None = None  # a full chunk, handed on once the next document exists
        count = 0
        for doc in _iter_input_docs(item, settings, rejects):
            if held is not None:
                yield held
                held, index = None, index + 1
            docs.append(doc)
            count += 1
            if len(docs) == settings.shard_docs:
                held = _Chunk(item.lang, f"{to}-{item.lang}", index, docs, new_rejects())
                docs = []
        if docs:
            held = _Chunk(item.lang, f"{to}-{item.lang}", index, docs, new_rejects())
        if held is None:
            where = str(item.shards) if item.shards else ", ".join(p.name for p in item.paths)
            raise ValueError(
                f"--input {item.lang}: no usable document in {where} "
                f"({sum(rejects.as_dict().values())} rejected)"
            )
        # the last chunk of an input also takes the rejects read after its last document
        for reason, n in new_rejects().items():
            held.rejected[reason] += n
        yield held
        index += 1


# --- one chunk: translate, filter, write ---------------------------------------------------------


def filter_reason(
    num_original: int, num_translation: int, translation: str, *, max_len_a: float, max_len_b: int
) -> str | None:
    """Why fairseq's back-translation filters drop a pair (lengths in tokens), or None.

    ``empty_translation``; ``over_max_len``: a side longer than ``max_len_a * num_original +
    max_len_b``; ``length_ratio``: the longer side more than 1.5 times the shorter.
    """
    if num_translation == 0 or not translation.strip():
        return "empty_translation"
    limit = max_len_a * num_original + max_len_b
    if num_original > limit or num_translation > limit:
        return "over_max_len"
    if max(num_original, num_translation) > MAX_LENGTH_RATIO * min(num_original, num_translation):
        return "length_ratio"
    return None


def token_batches(lengths: list[int], *, batch_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (stable) and cut into batches whose padded size
    (longest x count) stays within ``batch_tokens``; a longer text is a batch alone."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        size = max(1, lengths[i])
        if current and max(longest, size) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def _batch_seed(seed: int, pair: str, index: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{pair}:{index}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _tag_id(tok: Tokenizer) -> int:
    """The id of the tokenizer's reserved ``<bt>`` control token (``special_ids["bt"]``).

    Raises:
        ValueError: the tokenizer reserves none (a directory made before ``<bt>`` was reserved).
    """
    found = tok.special_ids.get("bt")
    if found is None:
        piece = tok.sp.piece_to_id(TAG_PIECE)
        if piece != tok.sp.unk_id() and tok.sp.is_control(piece):
            found = piece
    if found is None:
        raise ValueError(
            f"--tag: tokenizer {str(tok.directory)!r} reserves no {TAG_PIECE} control token "
            "(made before it was reserved: retrain it with train-tokenizer)"
        )
    return int(found)


@dataclass
class _Job:
    translator: Translator
    tok: Tokenizer
    to: str
    out: Path
    settings: BTSettings
    tag_id: int | None
    base: str
    """Everything but the texts that decides a chunk's output, as JSON (fingerprints)."""
    log: Callable[[str], None]

    @property
    def records(self) -> Path:
        return self.out / RECORD_DIR


def _fingerprint(chunk: _Chunk, job: _Job) -> str:
    digest = hashlib.sha256(job.base.encode())
    digest.update(json.dumps([chunk.pair, chunk.index, chunk.rejected], sort_keys=True).encode())
    for doc in chunk.docs:
        digest.update(f"{doc.source}\0{doc.ordinal}\0".encode())
        digest.update(doc.text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _kept(chunk: _Chunk, fingerprint: str, job: _Job) -> dict | None:
    """The record of a finished chunk made from the same input and settings, or None."""
    try:
        record = json.loads((job.records / f"{chunk.stem}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if record.get("path"):
        shard = job.out / record["path"]
        if not shard.is_file() or shard.stat().st_size != record["bytes"]:
            return None
        if sha256_file(shard) != record["sha256"]:
            return None
    if job.settings.keep_text and not (job.records / f"{chunk.stem}.tsv").is_file():
        return None
    return {**record, "kept": True}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _drop_tmp(directory: Path, stem: str) -> None:
    """Temporary files of ``stem`` left by a killed run (their pid is gone or not ours)."""
    for path in directory.glob(f".{stem}.*.tmp-*"):
        path.unlink(missing_ok=True)


def _translate(texts: list[str], lengths: list[int], chunk: _Chunk, job: _Job) -> list[str]:
    out: list[str | None] = [None] * len(texts)
    name = job.translator.name
    for number, batch in enumerate(token_batches(lengths, batch_tokens=job.settings.batch_tokens)):
        seed = _batch_seed(job.settings.seed, chunk.pair, chunk.index, number)
        try:
            got = job.translator.translate([texts[i] for i in batch], seed=seed)
        except ValueError:
            raise
        except Exception as err:  # a backend's own failure, named in one line
            raise ValueError(
                f"translator {name} failed in {chunk.stem}: {_first_line(err)}"
            ) from None
        if not isinstance(got, list) or len(got) != len(batch):
            count = len(got) if isinstance(got, list) else type(got).__name__
            raise ValueError(
                f"translator {name} returned {count} translations for {len(batch)} texts in "
                f"{chunk.stem}: it must return one per text"
            )
        for i, text in zip(batch, got):
            if not isinstance(text, str):
                raise ValueError(f"translator {name} returned a {type(text).__name__}, not text")
            out[i] = text
    return out  # type: ignore[return-value]


def _tsv_field(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def _process(chunk: _Chunk, job: _Job) -> dict:
    fingerprint = _fingerprint(chunk, job)
    kept = _kept(chunk, fingerprint, job)
    if kept is not None:
        return kept
    _drop_tmp(job.out, chunk.stem)
    _drop_tmp(job.records, chunk.stem)
    start = time.perf_counter()
    settings = job.settings
    texts = [doc.text for doc in chunk.docs]
    original_ids = job.tok.encode(texts)
    translations = _translate(texts, [len(ids) for ids in original_ids], chunk, job)
    translated_ids = job.tok.encode(translations)
    rejected = {**chunk.rejected, **dict.fromkeys(BT_REJECTS, 0)}
    keep = []
    for i, (orig, trans) in enumerate(zip(original_ids, translated_ids)):
        reason = filter_reason(
            len(orig),
            len(trans),
            translations[i],
            max_len_a=settings.max_len_a,
            max_len_b=settings.max_len_b,
        )
        if reason:
            rejected[reason] += 1
        else:
            keep.append(i)
    record = {
        "fingerprint": fingerprint,
        "pair": chunk.pair,
        "index": chunk.index,
        "path": "",
        "sha256": "",
        "bytes": 0,
        "samples": 0,
        "documents": len(keep),
        "src_tokens": 0,
        "tgt_tokens": 0,
        "rejected": rejected,
        "translated_tokens": sum(len(ids) for ids in original_ids),
    }
    path = job.out / f"{chunk.stem}.tar"
    if keep:
        prefix = [] if job.tag_id is None else [job.tag_id]
        record.update(
            _write_pairs(
                path,
                chunk,
                keep,
                src=[prefix + translated_ids[i] for i in keep],
                tgt=[original_ids[i] for i in keep],
                rejected=rejected,
                fingerprint=fingerprint,
                job=job,
            )
        )
    else:
        path.unlink(missing_ok=True)
    if settings.keep_text:
        lines = [f"{_tsv_field(texts[i])}\t{_tsv_field(translations[i])}\n" for i in keep]
        _write_atomic(job.records / f"{chunk.stem}.tsv", "".join(lines))
    record["seconds"] = round(time.perf_counter() - start, 3)
    _write_atomic(job.records / f"{chunk.stem}.json", json.dumps(record, sort_keys=True) + "\n")
    return {**record, "kept": False}


def _flat(ids: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    cum = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=cum[1:])
    flat = np.fromiter((i for x in ids for i in x), dtype=dtype, count=int(cum[-1]))
    return flat, cum


def _write_pairs(
    path: Path,
    chunk: _Chunk,
    keep: list[int],
    *,
    src: list[list[int]],
    tgt: list[list[int]],
    rejected: dict[str, int],
    fingerprint: str,
    job: _Job,
) -> dict:
    """One shard of the kept pairs of ``chunk`` (samples packed as ``shard`` packs pairs)."""
    dtype = token_dtype(job.tok.vocab_size)
    src_flat, src_cum = _flat(src, dtype)
    tgt_flat, tgt_cum = _flat(tgt, dtype)
    runs: list[tuple[str, int]] = []
    for i in keep:
        source = chunk.docs[i].source
        if runs and runs[-1][0] == source:
            runs[-1] = (source, runs[-1][1] + 1)
        else:
            runs.append((source, 1))
    with ShardWriter(path, dtype=dtype) as writer:
        for a, b, source in _sample_bounds(runs, src_cum + tgt_cum, job.settings.sample_tokens):
            meta = {
                "kind": "pair",
                "src": job.to,
                "tgt": chunk.lang,
                "source": source,
                "first_doc": chunk.docs[keep[a]].ordinal,
                "num_docs": b - a,
                "src_tokens": int(src_cum[b] - src_cum[a]),
                "tgt_tokens": int(tgt_cum[b] - tgt_cum[a]),
                "dtype": dtype_name(dtype),
                "chunk": fingerprint,
                "synthetic": True,
            }
            if a == 0:
                meta["rejected"] = rejected
            payload = encode_pair_payload(
                src_flat[src_cum[a] : src_cum[b]],
                src_offsets=src_cum[a : b + 1] - src_cum[a],
                tgt=tgt_flat[tgt_cum[a] : tgt_cum[b]],
                tgt_offsets=tgt_cum[a : b + 1] - tgt_cum[a],
            )
            writer.add_sample(meta, payload=payload, ext=PAIR_EXT)
        samples = writer.num_samples
    return {
        "path": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "samples": samples,
        "src_tokens": int(src_cum[-1]),
        "tgt_tokens": int(tgt_cum[-1]),
    }


def _run_chunks(chunks: Iterator[_Chunk], job: _Job, workers: int) -> Iterator[dict]:
    """Records in chunk order, at most ``2 * workers`` chunks in flight."""
    if workers == 1 or not getattr(job.translator, "concurrent", False):
        for chunk in chunks:
            yield _process(chunk, job)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: list[concurrent.futures.Future] = []
        try:
            for chunk in chunks:
                pending.append(pool.submit(_process, chunk, job))
                if len(pending) >= 2 * workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


# --- the job ------------------------------------------------------------------------------------

_ISO639_3 = {"afr": "af", "cat": "ca", "deu": "de", "eng": "en", "epo": "eo", "eus": "eu",
             "fra": "fr", "glg": "gl", "ita": "it", "nld": "nl", "oci": "oc", "por": "pt",
             "ron": "ro", "spa": "es", "swe": "sv", "dan": "da", "nob": "nb",
             "nno": "nn"}  # fmt: skip


def _check_direction(translator: Translator, inputs: list[BTInput], to: str) -> None:
    """An apertium mode whose languages we can name must translate the inputs into ``to``."""
    mode = getattr(translator, "pair", None)
    if not isinstance(translator, ApertiumTranslator) or mode is None:
        return
    src3, _, tgt3 = mode.partition("-")
    src, tgt = _ISO639_3.get(src3.split("_")[0]), _ISO639_3.get(tgt3.split("_")[0])
    if tgt is not None and tgt != to:
        raise ValueError(f"--to {to}: apertium:{mode} translates into {tgt}, not {to}")
    for item in inputs:
        if src is not None and item.lang != src:
            raise ValueError(f"--input {item.lang}: apertium:{mode} translates from {src}")


def _provenance(job: _Job, item: BTInput) -> dict:
    settings = job.settings
    if item.shards is not None:
        manifest = item.shards / MANIFEST_FILE
        source = {"shards_manifest_sha256": sha256_file(manifest), "shards": item.shards.name}
    else:
        source = {"files": sorted({p.name for p in item.paths})}
    return {
        "backend": job.translator.name,
        "backend_settings": job.translator.settings,
        "decode": settings.decode.as_dict(),
        "seed": settings.seed,
        "batch_tokens": settings.batch_tokens,
        "max_len_a": settings.max_len_a,
        "max_len_b": settings.max_len_b,
        "max_length_ratio": MAX_LENGTH_RATIO,
        "tag": job.tag_id,
        "direction": f"source = translation into {job.to}, target = original {item.lang} text",
        "input": source,
    }


def _finalize(inputs: list[BTInput], job: _Job) -> dict:
    """Check that every chunk is finished, then write the text files and the manifest."""
    records: list[tuple[_Chunk, dict]] = []
    missing: list[str] = []
    for chunk in _iter_chunks(inputs, to=job.to, settings=job.settings):
        record = _kept(chunk, _fingerprint(chunk, job), job)
        if record is None:
            missing.append(chunk.stem)
        else:
            chunk.docs = []  # the texts are no longer needed
            records.append((chunk, record))
    if missing:
        raise ValueError(
            f"backtranslate: {len(missing)} chunk(s) not translated yet ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); run the translating tasks first; no "
            "manifest written"
        )
    stems = {chunk.stem for chunk, _ in records}
    for old in sorted(job.out.iterdir()):
        # shards of an earlier run over more input would be picked up by a directory glob
        stale = SHARD_NAME_RE.match(old.name) and old.name.startswith("pair_")
        if stale and old.name.removesuffix(".tar") not in stems:
            job.log(f"{old.name}: removed (not produced from the current inputs)")
            old.unlink()
    for old in sorted(job.records.iterdir()):
        if old.name.split(".")[0] not in stems or _TMP_RE.match(old.name):
            old.unlink()
    if job.settings.keep_text:
        (job.out / "text").mkdir(exist_ok=True)
        for item in inputs:
            pair = f"{job.to}-{item.lang}"
            parts = [
                (job.records / f"{c.stem}.tsv").read_text(encoding="utf-8")
                for c, _ in records
                if c.pair == pair
            ]
            _write_atomic(job.out / "text" / f"{pair}.tsv", "".join(parts))
    _copy_tokenizer(job.tok, job.out)
    pairs = {}
    for item in inputs:
        pair = f"{job.to}-{item.lang}"
        mine = [r for c, r in records if c.pair == pair]
        rejected: dict[str, int] = {}
        for r in mine:
            for reason, n in r["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + n
        pairs[pair] = {
            "src": job.to,
            "tgt": item.lang,
            "documents": sum(r["documents"] for r in mine),
            "tokens": sum(r["src_tokens"] + r["tgt_tokens"] for r in mine),
            "src_tokens": sum(r["src_tokens"] for r in mine),
            "tgt_tokens": sum(r["tgt_tokens"] for r in mine),
            "samples": sum(r["samples"] for r in mine),
            "shards": sum(1 for r in mine if r["path"]),
            "rejected": rejected,
            "sources": sorted({doc_source for doc_source in _sources(item)}),
            "synthetic": True,
            "provenance": _provenance(job, item),
        }
    shards = [
        {
            "path": r["path"],
            "kind": "pair",
            "pair": r["pair"],
            "sha256": r["sha256"],
            "bytes": r["bytes"],
            "samples": r["samples"],
            "documents": r["documents"],
            "tokens": r["src_tokens"] + r["tgt_tokens"],
            "src_tokens": r["src_tokens"],
            "tgt_tokens": r["tgt_tokens"],
            "synthetic": True,
        }
        for _, r in records
        if r["path"]
    ]
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {
            "dir": "tokenizer",
            "model_sha256": job.tok.model_sha256,
            "vocab_size": job.tok.vocab_size,
        },
        "dtype": dtype_name(token_dtype(job.tok.vocab_size)),
        "sample_tokens": job.settings.sample_tokens,
        "shard_docs": job.settings.shard_docs,
        "languages": {},
        "pairs": pairs,
        "shards": shards,
    }
    write_manifest(job.out, manifest)
    return manifest


def _sources(item: BTInput) -> list[str]:
    if item.shards is not None:
        manifest = load_manifest(item.shards)
        return [
            Path(e["path"]).name
            for e in manifest["shards"]
            if e["kind"] == "mono" and e.get("lang") == item.lang
        ]
    return [p.name for p in item.paths]


def _check_foreign_manifest(out: Path) -> None:
    """Refuse an ``--out`` holding other data: finalizing removes shards it did not make."""
    try:
        manifest = load_manifest(out)
    except (FileNotFoundError, ValueError):
        return
    if manifest["languages"] or any(not s.get("synthetic") for s in manifest["pairs"].values()):
        raise ValueError(
            f"--out {str(out)!r} holds shards of other data (monolingual or real pairs): write "
            "synthetic pairs to a directory of their own (join them with merge)"
        )


def translator_options(settings: BTSettings, **extra) -> TranslatorOptions:
    """The options a backend factory gets for ``settings`` (``extra``: ``timeout_s``,
    ``threads``)."""
    return TranslatorOptions(
        decode=settings.decode, max_len_a=settings.max_len_a, max_len_b=settings.max_len_b, **extra
    )


def run_backtranslate(
    inputs: list[BTInput],
    *,
    translator: Translator,
    tokenizer: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    settings: BTSettings | None = None,
    part: tuple[int, int] = (0, 1),
    rank: int = 0,
    world_size: int = 1,
    translate: bool = True,
    finalize: bool = True,
    barrier: Callable[[], None] | None = None,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict | None:
    """Translate this process's share of the chunks of ``inputs`` into ``to`` and, with
    ``finalize`` (on one process, after every share is done: ``barrier``), write the manifest.

    ``part`` is ``(task, tasks)`` of an array job, ``rank``/``world_size`` the processes of one
    task; ``translate=False`` only finalizes (the merge step of an array job).

    Returns:
        The manifest written, or None when this call does not finalize.

    Raises:
        ValueError: a setting out of range, a language the tokenizer lacks, ``--to`` among the
            inputs, ``--tag`` without a ``<bt>`` token, an input without usable documents, a
            translator that fails or returns another number of texts, or (finalize) chunks not
            translated yet. Nothing incomplete is left: no manifest, no partial shard; finished
            chunks stay for a rerun.
        FileNotFoundError: the tokenizer or an input is missing.
    """
    settings = settings or BTSettings()
    settings.check()
    task, tasks = part
    if not (tasks >= 1 and 0 <= task < tasks):
        raise ValueError(f"--part {task}/{tasks}: must be I/N with 0 <= I < N")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank {rank} of world size {world_size}: must be in [0, world size)")
    if workers < 1:
        raise ValueError(f"--workers ({workers}) must be >= 1")
    if not inputs:
        raise ValueError("backtranslate: give at least one --input LANG=PATH")
    tok = load_tokenizer(tokenizer)
    known = set(tok.lang_ids)
    for lang, what in [(to, "--to")] + [(item.lang, "--input") for item in inputs]:
        if lang not in known:
            raise ValueError(
                f"{what} {lang!r} is not one of the tokenizer's languages "
                f"({', '.join(sorted(known))}); train the tokenizer with it"
            )
    if to in {item.lang for item in inputs}:
        raise ValueError(f"--to {to}: the inputs must be text of other languages")
    _check_direction(translator, inputs, to)
    tag_id = _tag_id(tok) if settings.tag else None
    out = Path(out)
    _check_foreign_manifest(out)
    _check_out_dir(out)
    (out / RECORD_DIR).mkdir(exist_ok=True)
    base = {
        "v": _FINGERPRINT_VERSION,
        "translator": translator.name,
        "translator_settings": translator.settings,
        "tokenizer": tok.model_sha256,
        "to": to,
        "tag": tag_id,
        **{k: v for k, v in asdict(settings).items() if k != "keep_text"},
    }
    job = _Job(
        translator=translator,
        tok=tok,
        to=to,
        out=out,
        settings=settings,
        tag_id=tag_id,
        base=json.dumps(base, sort_keys=True, default=str),
        log=log or (lambda line: print(line, file=sys.stderr)),
    )
    if translate:
        slots, slot = tasks * world_size, task * world_size + rank
        mine = (
            c for c in _iter_chunks(inputs, to=to, settings=settings) if c.index % slots == slot
        )
        for record in _run_chunks(mine, job, workers):
            name = record["path"] or f"pair_{record['pair']}_{record['index']:05d} (no shard)"
            done = (
                "kept (finished earlier)" if record["kept"] else f"written in {record['seconds']} s"
            )
            rejected = sum(record["rejected"].values())
            job.log(f"{name}: {done}, {record['documents']} pairs, {rejected} rejected")
    if barrier is not None:
        barrier()
    if not finalize:
        return None
    return _finalize(inputs, job)


def torchrun_share() -> tuple[int, int, Callable[[], None] | None, Callable[[], None]]:
    """``(rank, world_size, barrier, close)`` of this process under torchrun (a gloo group; the
    environment is read by torch itself), else ``(0, 1, None, no-op)``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0, 1, None, lambda: None
    if not dist.is_torchelastic_launched():
        return 0, 1, None, lambda: None
    import datetime

    if not dist.is_initialized():
        # a rank may translate for hours before the others reach the barrier
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), dist.barrier, dist.destroy_process_group
