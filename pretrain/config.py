"""The run configuration: a tree of typed dataclasses loaded from YAML with dot-path overrides.

What to call::

    cfg = load_config("configs/tiny_decoder.yaml", ["model.num_layers=2", "train.steps=10"])
    degrees = validate_config(cfg, world_size=4)   # the resolved parallel degrees
    check_run_inputs(cfg)                          # manifests, tokenizer, resume, run directory
    save_config(cfg, path)                         # or config_to_yaml(cfg) / config_to_dict(cfg)

Guarantees: ``load_config`` only parses (types and keys); ``validate_config`` checks every rule
before anything is built; ``check_run_inputs`` checks what the run reads and where it writes
before anything is built or written. Every user mistake is one ``ValueError`` line naming the
key, its value and the rule. ``config_to_yaml`` gives text that ``load_config`` reads back to an
equal config; ``save_config`` writes it atomically (a temporary name, then a rename).
``starts_afresh(cfg.train)`` says whether the run starts a new run in ``train.run_dir``.

Sections: ``model`` (``pretrain.models.config``), ``parallel`` (``parallel.config``), ``data``
(``data_pipeline.config``), and ``objective``, ``optim``, ``train``, ``checkpoint``, ``logging``
(here). Loading, merging and type conversion are OmegaConf structured configs; this module adds
only the rules: unknown keys (with a "did you mean"), and range and cross-section checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import DataConfig, check_choices, choices_of, validate_data
from parallel.config import ParallelConfig, validate_parallel
from pretrain.models.config import ModelConfig, validate_model

# train.resume also takes a checkpoint directory, so it is a str and not a Literal.
RESUME_MODES = ("none", "auto")

# YAML keys that are Python keywords live under another attribute name.
KEY_ALIASES = {"checkpoint.async": "checkpoint.async_save"}


@dataclass
class SpanCorruptionOptions:
    """T5 span corruption (``objective.t5.*``; objective t5)."""

    noise_density: float = 0.15
    """Share of each row's tokens in noise spans (T5: 0.15)."""
    mean_span: float = 3.0
    """Mean noise span length in tokens (T5: 3)."""


@dataclass
class DenoisingOptions:
    """BART / mBART denoising (``objective.bart.*``; objective bart)."""

    mask_ratio: float = 0.3
    """Share of words masked by text infilling (BART 0.3, mBART 0.35)."""
    poisson_lambda: float = 3.0
    """Mean span length in words (Poisson); a span of 0 words inserts a mask."""
    random_ratio: float = 0.0
    """Share of the span masks written as a random token instead of the mask token."""
    permute_ratio: float = 1.0
    """Share of each row's sentences permuted (BART and mBART: 1; 0: off)."""
    rotate_prob: float = 0.0
    """Probability of rotating a row to start at a random token (BART's document rotation)."""
    language_token: bool = False
    """mBART: the row's <lang:xx> token ends the source and the target and starts the decoder
    (false: BART, eos starts the decoder)."""


@dataclass
class ElectraOptions:
    """ELECTRA replaced token detection (``objective.electra.*``; objective electra)."""

    disc_weight: float = 50.0
    """Weight of the discriminator's loss (mean over the real tokens) added to the generator's
    masked-LM loss (mean over the masked tokens); ELECTRA: 50."""
    temperature: float = 1.0
    """Temperature of the generator's softmax the replacements are sampled from (ELECTRA: 1)."""


@dataclass
class ContrastiveOptions:
    """Contrastive sentence objectives (``objective.contrastive.*``; simcse, xlco)."""

    temperature: float = 0.05
    """Temperature of the cosine similarities (SimCSE: 0.05)."""


@dataclass
class ObjectiveConfig:
    """Pre-training objective(s) (``objective.*``)."""

    weights: dict[str, float] = field(default_factory=dict)
    """The objectives and their mix, e.g. {mlm: 3, tlm: 1} (objectives sharing a batch: each
    weight is its share of the rows): clm (decoder), mlm (encoder, BERT 80/10/10), tlm (encoder,
    XLM pairs), span (encoder, SpanBERT), electra (encoder, replaced token detection), simcse
    and xlco (encoder, contrastive sentence embeddings), t5
    (encoder_decoder, T5 span corruption), prefix_lm (encoder_decoder, T5's prefix LM), bart
    (encoder_decoder, BART/mBART denoising), translation (encoder_decoder, parallel pairs);
    ``pretrain.objectives.OBJECTIVES`` lists them. Empty: the family's default (decoder clm,
    encoder mlm, encoder_decoder t5)."""
    name: str | None = None
    """Deprecated: ``name: x`` is ``weights: {x: 1}`` (a FutureWarning says so)."""
    mask_prob: float = 0.15
    """Share of tokens selected for MLM prediction."""
    mask_replace_prob: float = 0.8
    """Of the selected tokens, the share replaced by the mask token."""
    mask_random_prob: float = 0.1
    """Of the selected tokens, the share replaced by a random token (the rest are kept)."""
    whole_word: bool = False
    """Mask whole words (sentencepiece pieces starting with the word-boundary mark; each CJK
    ideograph, kana or Hangul piece is a word of its own, as in BERT's Chinese rule)."""
    max_word_pieces: int = 8
    """Whole-word masking: a longer run of pieces without a word start counts as several words
    of at most this many pieces (so a run of text in a script without spaces is never masked
    at once)."""
    tlm_share: float | None = None
    """Deprecated: ``tlm_share: s`` is ``weights: {mlm: 1 - s, tlm: s}`` (a FutureWarning says
    so)."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk of the output projection + cross-entropy (bounds logit memory)."""
    t5: SpanCorruptionOptions = field(default_factory=SpanCorruptionOptions)
    """T5 span corruption settings (objective t5)."""
    bart: DenoisingOptions = field(default_factory=DenoisingOptions)
    """BART / mBART denoising settings (objective bart)."""
    electra: ElectraOptions = field(default_factory=ElectraOptions)
    """ELECTRA replaced token detection settings (objective electra)."""
    contrastive: ContrastiveOptions = field(default_factory=ContrastiveOptions)
    """Contrastive sentence objectives' settings (simcse, xlco)."""
    decoder_len: int = 0
    """encoder_decoder: decoder positions per row; 0 derives it: T5's targets length for span
    corruption alone (data.seq_len 128 -> 29, 512 -> 114), else data.seq_len (denoised rows and
    translation targets are as long as their sources)."""


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (``optim.*``)."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (never on norms, biases and embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """cosine | wsd (warmup-stable-decay) | linear | constant, after linear warmup."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    decay_fraction: float = 0.2
    """wsd: the share of steps spent decaying at the end."""
    fused: bool | None = None
    """Fused AdamW; None uses it where the device supports it."""


@dataclass
class TrainConfig:
    """The training loop (``train.*``)."""

    run_dir: str = "runs/default"
    """Directory for config.yaml, metrics.jsonl, logs/ and checkpoints/."""
    steps: int = 1000
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for weights, data order and dropout."""
    stop_at: int = 0
    """Checkpoint and exit 0 after this step (a job's time slice); 0 runs to train.steps. The
    LR schedule still spans train.steps."""
    resume: str = "none"
    """none | auto (latest complete checkpoint in run_dir; a corrupt latest one is named and
    the previous complete one taken) | a checkpoint directory. DCP checkpoints are trusted
    input: their metadata is a pickle, so resume only from checkpoints you or your team wrote."""
    overwrite: bool = False
    """With train.resume=none, start afresh in a run_dir that holds checkpoints or metrics by
    first moving its contents aside to ``<run_dir>.old-<UTC time>`` (never deleted); without it
    such a start is refused."""
    deterministic: bool = False
    """Deterministic algorithms (bit-for-bit reproducible on CPU)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (autocast, fp32 master) | fp16 (+ scaling)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto | cpu | cuda."""
    eval_every: int = 0
    """Validation loss per language every N steps; 0 disables."""
    eval_batches: int = 4
    """Batches per validation run."""
    max_nonfinite_steps: int = 5
    """Skip the update of a step whose loss is NaN/Inf; stop after this many in a row."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (``checkpoint.*``)."""

    every: int = 0
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    async_save: bool = False
    """Save in the background (YAML key ``checkpoint.async``)."""


@dataclass
class LoggingConfig:
    """Console, JSONL and TensorBoard logging (``logging.*``)."""

    every: int = 10
    """Log every N steps."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    progress: bool = True
    """A rich progress bar on rank 0 when the console is a terminal."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s per device for MFU; None looks the device up in a table."""


@dataclass
class RunConfig:
    """One run: every section of the config tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _alias(key: str) -> str:
    return KEY_ALIASES.get(key, key)


def _unalias_tree(tree: dict) -> dict:
    """Rename aliased YAML keys (``checkpoint.async``) to their attribute names."""
    for yaml_key, attr_key in KEY_ALIASES.items():
        section, yaml_name = yaml_key.split(".")
        attr_name = attr_key.split(".")[1]
        node = tree.get(section)
        if isinstance(node, dict) and yaml_name in node:
            node[attr_name] = node.pop(yaml_name)
    return tree


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _yaml_name(path: str) -> str:
    for yaml_key, attr_key in KEY_ALIASES.items():
        if path == attr_key:
            return yaml_key
    return path


def _check_keys(tree: Any, cls: type, prefix: str) -> None:
    """Raise on the first key of ``tree`` that ``cls`` does not have, suggesting a near one."""
    if not isinstance(tree, dict):
        return
    names = _field_names(cls)
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in names:
            shown = [_yaml_name(f"{prefix}{n}").split(".")[-1] for n in names]
            close = difflib.get_close_matches(str(key), shown, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            section = prefix.rstrip(".") or "the config"
            raise ValueError(f"{path}: unknown key in {section}{hint}")
        sub = _section_type(cls, key)
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{path} ({value!r}) must be a mapping of {sub.__name__} keys")
            _check_keys(value, sub, f"{path}.")
        elif _is_mapping_field(cls, key) and not isinstance(value, dict):
            raise ValueError(
                f"{_yaml_name(path)} ({value!r}) must be a mapping, e.g. {{en: 2, de: 1}}"
            )


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls`` when it is a nested section."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    if spec.default_factory is not dataclasses.MISSING:
        made = spec.default_factory()
        if dataclasses.is_dataclass(made):
            return type(made)
    return None


def _is_mapping_field(cls: type, name: str) -> bool:
    """Whether field ``name`` of ``cls`` holds a plain dict (weights by name)."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    return spec.default_factory is dict


def _dotlist_to_tree(overrides: Sequence[str]) -> dict:
    """``["model.num_layers=2", ...]`` -> nested dict with YAML-parsed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must have the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must have the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} sets a key below a value")
        node[parts[-1]] = value
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config, apply ``section.key=value`` overrides and check types and keys.

    Values are only parsed here; call :func:`validate_config` for the rules.

    Raises:
        ValueError: missing or unreadable file, unknown key (with a suggestion), wrong type.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"config file {str(path)!r} is a directory; --config takes a YAML file"
            )
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = loaded
    tree = _unalias_tree(tree)
    override_tree = _unalias_tree(_dotlist_to_tree(overrides))
    _check_keys(tree, RunConfig, "")
    _check_keys(override_tree, RunConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), tree, override_tree)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_omegaconf_message(err)) from None
    assert isinstance(cfg, RunConfig)
    _check_objective_name(cfg.objective)
    return cfg


def _check_objective_name(obj: ObjectiveConfig) -> None:
    # The deprecated objective.name is a registry name (checked where the choice fields are).
    from pretrain.objectives import OBJECTIVES

    if obj.name is not None and obj.name not in OBJECTIVES:
        raise ValueError(f"objective.name ({obj.name!r}) must be one of {', '.join(OBJECTIVES)}")


_TYPE_NAMES = {"Integer": "an int", "Float": "a float", "Boolean": "a bool", "String": "a string"}


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = _yaml_name(str(getattr(err, "full_key", None) or "config"))
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    match = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if match:
        expected = _TYPE_NAMES.get(match.group(2), match.group(2))
        return f"{key} ({match.group(1)!r}) must be {expected}"
    match = re.match(r"Invalid value '(.*)', expected one of \[", msg)
    choices = _choices_at(str(getattr(err, "full_key", None) or ""))
    if match and choices:
        # OmegaConf checks Literal fields while merging; say it as check_choices does.
        return f"{key} ({match.group(1)!r}) must be one of {', '.join(map(str, choices))}"
    match = re.match(r"Value '(.*)' is not a valid (\w+)", msg)
    if match:
        return f"{key} ({match.group(1)!r}) must be a {match.group(2)}"
    return f"{key}: {msg}"


def _choices_at(path: str) -> tuple[Any, ...] | None:
    """The allowed values of the ``Literal`` field at dotted attribute ``path`` of the tree."""
    cls: type | None = RunConfig
    *sections, name = path.split(".")
    for section in sections:
        if cls is None or section not in _field_names(cls):
            return None
        cls = _section_type(cls, section)
    if cls is None:
        return None
    return choices_of(cls).get(name)


# ---------------------------------------------------------------------------------------------
# Validation


def validate_config(cfg: RunConfig, *, world_size: int | None = None) -> dict[str, int]:
    """Check every section and the rules that join them, before anything is built.

    Args:
        cfg: the loaded config.
        world_size: number of ranks; when given, the parallel degrees are resolved against it.

    Returns:
        The resolved parallel degrees (see :func:`parallel.config.validate_parallel`).

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    validate_model(cfg.model)
    degrees = validate_parallel(cfg.parallel, world_size=world_size)
    validate_data(cfg.data)
    for section in ("objective", "optim", "train", "checkpoint", "logging"):
        check_choices(getattr(cfg, section), section)
    _validate_objective(cfg)
    _validate_optim(cfg.optim)
    _validate_train(cfg)

    model, par = cfg.model, cfg.parallel
    kv_heads = model.kv_heads
    if model.num_heads % par.tp != 0:
        raise ValueError(
            f"model.num_heads ({model.num_heads}) must be divisible by parallel.tp ({par.tp})"
        )
    if kv_heads % par.tp != 0:
        raise ValueError(
            f"model.num_kv_heads ({kv_heads}) must be divisible by parallel.tp ({par.tp})"
        )
    if model.ffn_hidden_size % par.tp != 0:
        raise ValueError(
            f"model.ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by "
            f"parallel.tp ({par.tp})"
        )
    if par.ep > 1:
        if model.moe.num_experts == 0:
            raise ValueError(
                f"parallel.ep ({par.ep}) must be 1 for a dense model (model.moe.num_experts is 0)"
            )
        if model.moe.num_experts % par.ep != 0:
            raise ValueError(
                f"model.moe.num_experts ({model.moe.num_experts}) must be divisible by "
                f"parallel.ep ({par.ep})"
            )
    if par.engine == "deepspeed":
        _validate_deepspeed_run(cfg)
    num_stages = par.pp * par.stages_per_rank
    if num_stages > model.num_layers:
        raise ValueError(
            f"parallel.pp x parallel.stages_per_rank ({num_stages}) must be <= "
            f"model.num_layers ({model.num_layers})"
        )
    if par.stage_layers is not None and sum(par.stage_layers) != model.num_layers:
        raise ValueError(
            f"parallel.stage_layers ({list(par.stage_layers)}) must sum to model.num_layers "
            f"({model.num_layers})"
        )
    if cfg.data.seq_len > model.max_seq_len:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) must be <= model.max_seq_len ({model.max_seq_len})"
        )
    if par.sequence_parallel and par.tp > 1 and cfg.data.seq_len % par.tp != 0:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) must be divisible by parallel.tp ({par.tp}) "
            "with parallel.sequence_parallel"
        )
    if par.ep_over_tp and cfg.data.seq_len % par.tp != 0:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) must be divisible by parallel.tp ({par.tp}) "
            "with parallel.ep_over_tp (each tp rank routes its chunk of the sequence)"
        )
    if par.pp > 1 and model.tie_embeddings:
        raise ValueError(
            f"model.tie_embeddings (True) must be false with parallel.pp ({par.pp}) > 1: the "
            "embedding table and the output projection are on different pipeline stages"
        )
    # Document masks, position resets and TLM rows work under pipeline parallel: document,
    # position and language ids go to every stage beside the hidden states
    # (parallel.pipeline.pipeline_step's stage_kwargs).
    if par.pp > 1 and cfg.train.grad_accum != 1:
        raise ValueError(
            f"train.grad_accum ({cfg.train.grad_accum}) must be 1 with parallel.pp ({par.pp}) "
            "> 1; the pipeline's parallel.microbatches accumulate instead"
        )
    microbatches = par.microbatches if par.microbatches is not None else par.pp
    if par.pp > 1 and cfg.data.batch_size % microbatches != 0:
        raise ValueError(
            f"data.batch_size ({cfg.data.batch_size}) must be divisible by "
            f"parallel.microbatches ({microbatches})"
        )
    return degrees


def _validate_objective(cfg: RunConfig) -> None:
    """Check the objectives (asking each registered objective for its families) and put the
    resolved mix in ``objective.weights`` (deprecated keys cleared: one way to say it)."""
    from pretrain.objectives import OBJECTIVES, ObjectiveMix, objective_weights

    obj = cfg.objective
    _check_objective_name(obj)
    if obj.tlm_share is not None and not 0.0 <= obj.tlm_share <= 1.0:
        raise ValueError(f"objective.tlm_share ({obj.tlm_share}) must be in [0, 1]")
    names, source = objective_weights(obj, family=cfg.model.family)
    for name, weight in names.items():
        if name not in OBJECTIVES:
            raise ValueError(
                f"objective.weights.{name}: unknown objective; must be one of "
                f"{', '.join(OBJECTIVES)}"
            )
        if weight < 0:
            raise ValueError(f"objective.weights.{name} ({weight}) must be >= 0")
        families = OBJECTIVES[name].families
        if cfg.model.family not in families:
            key = "objective.name" if source == "objective.name" else f"objective.weights.{name}"
            raise ValueError(
                f"{key} ({name!r}) needs model.family in {', '.join(families)} "
                f"(got {cfg.model.family!r})"
            )
    if sum(names.values()) <= 0:
        raise ValueError(f"objective.weights ({names}) must have a positive sum")
    mix = ObjectiveMix(names)  # the objectives must share one batch transform
    apply_model_settings(cfg, mix)
    if mix.scorer is not None and mix.scorer.row_scorer == "contrastive":
        name = mix.scorer.name
        if name == "simcse" and not cfg.model.dropout > 0:
            raise ValueError(
                f"objective.weights.simcse needs model.dropout > 0 (got {cfg.model.dropout}): "
                "its two views of a row are two dropout masks"
            )
    if cfg.model.generator_fraction and getattr(mix.scorer, "row_scorer", None) != "rtd":
        raise ValueError(
            f"model.generator_fraction ({cfg.model.generator_fraction}) builds ELECTRA's "
            "generator, which only objective.weights.electra trains: set it or drop the fraction"
        )
    if cfg.parallel.pp > 1 and not mix.pipeline:
        blocked = [o.name for o in mix.objectives if not o.pipeline]
        raise ValueError(
            f"objective.weights.{blocked[0]} needs parallel.pp 1 (got {cfg.parallel.pp}): its "
            "model pass before the loss runs the whole model on one rank"
        )
    obj.weights, obj.name, obj.tlm_share = names, None, None
    for key in ("mask_prob", "mask_replace_prob", "mask_random_prob"):
        value = getattr(obj, key)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.{key} ({value}) must be in [0, 1]")
    if obj.mask_replace_prob + obj.mask_random_prob > 1.0:
        raise ValueError(
            f"objective.mask_replace_prob + objective.mask_random_prob "
            f"({obj.mask_replace_prob + obj.mask_random_prob:g}) must be <= 1"
        )
    if obj.loss_chunk_tokens < 1:
        raise ValueError(f"objective.loss_chunk_tokens ({obj.loss_chunk_tokens}) must be >= 1")
    if obj.max_word_pieces < 1:
        raise ValueError(f"objective.max_word_pieces ({obj.max_word_pieces}) must be >= 1")
    _validate_seq2seq_options(cfg)
    electra = obj.electra
    if not (math.isfinite(electra.disc_weight) and electra.disc_weight >= 0):
        raise ValueError(f"objective.electra.disc_weight ({electra.disc_weight}) must be >= 0")
    if not (math.isfinite(electra.temperature) and electra.temperature > 0):
        raise ValueError(f"objective.electra.temperature ({electra.temperature}) must be > 0")
    tau = obj.contrastive.temperature
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"objective.contrastive.temperature ({tau}) must be > 0")


def apply_model_settings(cfg: RunConfig, mix) -> None:
    """Set the ``model.*`` values the objectives need (``Objective.model_settings``: NSP's
    segment embeddings and pair head) where the config leaves them at their defaults; a value
    set otherwise must meet the need (an int at least it, a bool equal; a float is a size
    any set value serves)."""
    from pretrain.models.config import ModelConfig

    defaults = ModelConfig()
    for objective in mix.objectives:
        for key, need in objective.model_settings.items():
            value = getattr(cfg.model, key)
            if value == getattr(defaults, key):
                setattr(cfg.model, key, need)
                continue
            if isinstance(need, float):  # a size (ELECTRA's generator): any set value serves
                continue
            flag = isinstance(need, bool)
            if (value != need) if flag else (value < need):
                rule = f"{need}" if flag else f"at least {need}"
                raise ValueError(f"model.{key} ({value}) must be {rule} for objective.weights."
                                 f"{objective.name}")  # fmt: skip


def _validate_seq2seq_options(cfg: RunConfig) -> None:
    """``objective.t5.*``, ``objective.bart.*`` and ``objective.decoder_len``
    (their rules are the loader's ``Seq2SeqConfig.check`` and ``lengths``, here named by key)."""
    from data_pipeline.loader import seq2seq_from_objective

    obj = cfg.objective
    if obj.decoder_len < 0:
        raise ValueError(f"objective.decoder_len ({obj.decoder_len}) must be >= 0")
    if obj.decoder_len > cfg.model.max_seq_len:
        raise ValueError(
            f"objective.decoder_len ({obj.decoder_len}) must be <= model.max_seq_len "
            f"({cfg.model.max_seq_len})"
        )
    span, noising = obj.t5, obj.bart
    if not 0.0 < span.noise_density < 1.0:
        raise ValueError(f"objective.t5.noise_density ({span.noise_density}) must be in (0, 1)")
    if not span.mean_span >= 1.0:
        raise ValueError(f"objective.t5.mean_span ({span.mean_span}) must be >= 1")
    for key in ("mask_ratio", "random_ratio", "permute_ratio", "rotate_prob"):
        value = getattr(noising, key)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.bart.{key} ({value}) must be in [0, 1]")
    if not noising.poisson_lambda > 0.0:
        raise ValueError(f"objective.bart.poisson_lambda ({noising.poisson_lambda}) must be > 0")
    if cfg.model.family == "encoder_decoder":
        weights = obj.weights
        pairs = weights.get("translation", 0) > 0
        mono = any(weights.get(k, 0) > 0 for k in ("t5", "bart", "prefix_lm"))
        seq2seq_from_objective(obj).lengths(
            cfg.data.seq_len, denoise=weights.get("bart", 0) > 0, mono=mono, pairs=pairs,
            prefix=weights.get("prefix_lm", 0) > 0,
        )  # fmt: skip


def _validate_optim(optim: OptimConfig) -> None:
    for key in ("lr", "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):
        value = getattr(optim, key)
        if not math.isfinite(value):
            raise ValueError(f"optim.{key} ({value}) must be a finite number")
    if optim.lr <= 0:
        raise ValueError(f"optim.lr ({optim.lr}) must be > 0")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio ({optim.min_lr_ratio}) must be in [0, 1]")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(optim, key) < 1.0:
            raise ValueError(f"optim.{key} ({getattr(optim, key)}) must be in [0, 1)")
    if optim.eps <= 0:
        raise ValueError(f"optim.eps ({optim.eps}) must be > 0")
    if optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay ({optim.weight_decay}) must be >= 0")
    if optim.grad_clip < 0:
        raise ValueError(f"optim.grad_clip ({optim.grad_clip}) must be >= 0 (0 disables)")
    if optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps ({optim.warmup_steps}) must be >= 0")
    if not 0.0 <= optim.decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction ({optim.decay_fraction}) must be in [0, 1]")


def _validate_deepspeed_run(cfg: RunConfig) -> None:
    # What our features cannot do under DeepSpeed's engine (the degree rules are
    # parallel.config's).
    if cfg.model.moe.num_experts and cfg.parallel.zero_stage == 3:
        raise ValueError(
            f"parallel.zero_stage (3) must be 1 or 2 for an MoE model (model.moe.num_experts "
            f"{cfg.model.moe.num_experts}) with parallel.engine=deepspeed"
        )
    if cfg.checkpoint.async_save:
        raise ValueError(
            "checkpoint.async (True) must be false with parallel.engine=deepspeed "
            "(DeepSpeed saves synchronously)"
        )
    if cfg.train.precision == "fp16":
        raise ValueError(
            "train.precision (fp16) must be fp32 or bf16 with parallel.engine=deepspeed"
        )


def _validate_train(cfg: RunConfig) -> None:
    train = cfg.train
    if not train.run_dir:
        raise ValueError("train.run_dir ('') must name a directory")
    if train.steps < 1:
        raise ValueError(f"train.steps ({train.steps}) must be >= 1")
    if not 0 <= train.stop_at <= train.steps:
        raise ValueError(
            f"train.stop_at ({train.stop_at}) must be in [0, train.steps ({train.steps})]"
        )
    if train.seed < 0:
        raise ValueError(f"train.seed ({train.seed}) must be >= 0")
    if train.grad_accum < 1:
        raise ValueError(f"train.grad_accum ({train.grad_accum}) must be >= 1")
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every ({train.eval_every}) must be >= 0 (0 disables)")
    if train.max_nonfinite_steps < 1:
        raise ValueError(f"train.max_nonfinite_steps ({train.max_nonfinite_steps}) must be >= 1")
    if train.eval_batches < 1:
        raise ValueError(f"train.eval_batches ({train.eval_batches}) must be >= 1")
    if cfg.optim.warmup_steps > train.steps:
        raise ValueError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be <= train.steps ({train.steps})"
        )
    ckpt = cfg.checkpoint
    if ckpt.every < 0:
        raise ValueError(f"checkpoint.every ({ckpt.every}) must be >= 0 (0 saves at the end)")
    if ckpt.keep < 1:
        raise ValueError(f"checkpoint.keep ({ckpt.keep}) must be >= 1")
    if cfg.logging.every < 1:
        raise ValueError(f"logging.every ({cfg.logging.every}) must be >= 1")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        raise ValueError(f"logging.peak_tflops ({cfg.logging.peak_tflops}) must be > 0")


def starts_afresh(train: TrainConfig) -> bool:
    """Whether a run with ``train`` starts a new run in ``train.run_dir`` rather than continuing
    the one there: ``train.resume=none``, or a checkpoint from outside the run directory (an
    imported model)."""
    if train.resume == "auto":
        return False
    if train.resume == "none":
        return True
    own = Path(train.run_dir).resolve() / "checkpoints"
    return own not in Path(train.resume).resolve().parents


def _read_manifest(key: str, value: str) -> dict:
    from data_pipeline.manifest import load_manifest

    if not value:
        raise ValueError(f"{key} ('') must name a shard directory or its manifest.json")
    try:
        return load_manifest(value)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{key} ({value!r}): {err}") from None


def check_run_inputs(cfg: RunConfig, *, read_checkpoints: bool = True) -> None:
    """Check what a run reads and where it writes, before anything is built or written.

    ``read_checkpoints=False`` skips reading the checkpoints' rank files and metadata (the
    ``train.resume`` checks below except the ``.metadata`` file's presence): with many ranks,
    one rank reads them and the others wait for its verdict (``pretrain.train``), instead of
    every rank reading every rank's file.

    - ``train.run_dir`` is not a file; a fresh start (:func:`starts_afresh`) into a run
      directory that holds checkpoints or metrics needs ``train.overwrite=true``;
    - ``data.manifest`` and ``data.valid_manifest`` are readable shard manifests made with one
      tokenizer, and ``model.vocab_size`` covers its vocabulary;
    - ``data.tokenizer``, when set, is that tokenizer (same model sha256): one tokenizer per
      run, the one the shards were made with (``""`` takes the manifest's);
    - ``train.resume`` names a complete, readable checkpoint of this model, or is none, or
      auto (with at least one readable checkpoint when there are any).

    Raises:
        ValueError: one line naming the key, its value and the rule broken.
    """
    from pretrain.checkpoint import (
        check_compatible,
        checkpoint_problem,
        holds_earlier_run,
        latest_loadable,
    )

    train = cfg.train
    run_dir = Path(train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir ({train.run_dir!r}) is a file; it must name a directory")
    if train.resume not in RESUME_MODES:
        checkpoint = Path(train.resume)
        if not (checkpoint / ".metadata").is_file():
            raise ValueError(
                f"train.resume ({train.resume!r}) must be none, auto or a complete checkpoint "
                "directory (one holding .metadata)"
            )
        problem = checkpoint_problem(checkpoint) if read_checkpoints else None
        if problem is not None:
            raise ValueError(f"train.resume ({train.resume!r}) is corrupt: {problem}")
        if read_checkpoints:
            check_compatible(checkpoint, config_to_dict(cfg)["model"])
    if train.resume == "auto" and read_checkpoints:
        latest_loadable(run_dir / "checkpoints")  # raises when every checkpoint is corrupt
    if starts_afresh(train) and not train.overwrite and holds_earlier_run(run_dir):
        raise ValueError(
            f"train.run_dir ({train.run_dir!r}) holds checkpoints or metrics of an earlier run: "
            "continue it with train.resume=auto, choose a new train.run_dir, or set "
            "train.overwrite=true to move its contents aside"
        )
    data = cfg.data
    manifest = _read_manifest("data.manifest", data.manifest)
    tokenizer = manifest.get("tokenizer") or {}
    sha = tokenizer.get("model_sha256")
    if data.valid_manifest:
        valid = _read_manifest("data.valid_manifest", data.valid_manifest)
        valid_sha = (valid.get("tokenizer") or {}).get("model_sha256")
        if sha and valid_sha and valid_sha != sha:
            raise ValueError(
                f"data.valid_manifest ({data.valid_manifest!r}) was made with another tokenizer "
                f"than data.manifest ({data.manifest!r}) (model sha256 {valid_sha[:12]} != "
                f"{sha[:12]})"
            )
    vocab = tokenizer.get("vocab_size")
    if isinstance(vocab, int) and cfg.model.vocab_size < vocab:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) must be >= the vocabulary of the "
            f"tokenizer of data.manifest ({vocab})"
        )
    if data.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer

        try:
            ours = load_tokenizer(data.tokenizer).model_sha256
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"data.tokenizer ({data.tokenizer!r}): {err}") from None
        if sha and ours != sha:
            raise ValueError(
                f"data.tokenizer ({data.tokenizer!r}) is not the tokenizer data.manifest "
                f"({data.manifest!r}) was made with (model sha256 {ours[:12]} != {sha[:12]}); "
                "leave data.tokenizer empty to use the manifest's"
            )


# ---------------------------------------------------------------------------------------------
# Output


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain nested dicts, with YAML key names (``checkpoint.async``)."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(tree, dict)
    for yaml_key, attr_key in KEY_ALIASES.items():
        section, yaml_name = yaml_key.split(".")
        attr_name = attr_key.split(".")[1]
        node = tree[section]
        node = {(yaml_name if k == attr_name else k): v for k, v in node.items()}
        tree[section] = node
    return tree


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(config_to_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path)
