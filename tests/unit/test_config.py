"""The config tree: presets, overrides, and the one-line errors users see (pinned)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    RunConfig,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny_decoder.yaml"
TINY_MOE = REPO / "configs" / "tiny_moe.yaml"


def test_required_presets_exist():
    names = {p.name for p in PRESETS}
    for name in (
        "tiny_decoder.yaml",
        "tiny_moe.yaml",
        "tiny_encoder.yaml",
        "decoder_125m.yaml",
        "decoder_1b.yaml",
        "moe_8x_top2.yaml",
        "switch_top1.yaml",
        "encoder_base.yaml",
    ):
        assert name in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_validate(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    degrees = validate_config(cfg, world_size=8)
    assert degrees["dp_shard"] * degrees["tp"] * degrees["pp"] * degrees["dp_replicate"] == 8


def test_preset_values_reach_the_dataclasses():
    cfg = load_config(REPO / "configs" / "decoder_1b.yaml")
    model = cfg.model
    assert (model.hidden_size, model.num_layers, model.num_heads, model.num_kv_heads) == (
        2048,
        22,
        32,
        4,
    )
    assert (model.ffn_hidden_size, model.vocab_size) == (5632, 32000)
    moe = load_config(REPO / "configs" / "moe_8x_top2.yaml").model.moe
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size) == (8, 2, 2816)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        TINY,
        [
            "model.num_layers=3",
            "optim.lr=1e-4",
            "model.moe.num_experts=4",
            "train.deterministic=true",
            "data.language_weights={en: 2, de: 1}",
            "checkpoint.async=true",
            "parallel.stage_layers=[1,2]",
        ],
    )
    assert cfg.model.num_layers == 3
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.moe.num_experts == 4
    assert cfg.train.deterministic is True
    assert cfg.data.language_weights == {"en": 2.0, "de": 1.0}
    assert cfg.checkpoint.async_save is True
    assert cfg.parallel.stage_layers == [1, 2]


def test_resolved_yaml_round_trips(tmp_path: Path):
    cfg = load_config(TINY_MOE, ["checkpoint.async=true", "train.seed=7"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert "async: true" in text and "async_save" not in text
    assert load_config(path) == cfg
    assert yaml.safe_load(config_to_yaml(cfg))["train"]["seed"] == 7
    assert not list(path.parent.glob(".*tmp*")), "temporary file left behind"


# (overrides, world size, the exact one-line message)
BAD_CONFIGS = [
    (
        ["objective.max_word_pieces=0"],
        None,
        "objective.max_word_pieces (0) must be >= 1",
    ),
    (
        ["model.num_head=3"],
        None,
        "model.num_head: unknown key in model; did you mean model.num_heads?",
    ),
    (
        ["model.moe.top_kk=2"],
        None,
        "model.moe.top_kk: unknown key in model.moe; did you mean model.moe.top_k?",
    ),
    (["optimm.lr=1"], None, "optimm: unknown key in the config; did you mean optim?"),
    (
        ["checkpoint.asynk=true"],
        None,
        "checkpoint.asynk: unknown key in checkpoint; did you mean checkpoint.async?",
    ),
    (["model.num_heads=four"], None, "model.num_heads ('four') must be an int"),
    (["optim.lr=fast"], None, "optim.lr ('fast') must be a float"),
    (["train.steps=0"], None, "train.steps (0) must be >= 1"),
    (["optim.lr=-1"], None, "optim.lr (-1.0) must be > 0"),
    (["data.alpha=1.5"], None, "data.alpha (1.5) must be in (0, 1]"),
    (
        ["model.family=seq2seq"],
        None,
        "model.family ('seq2seq') must be one of decoder, encoder, encoder_decoder",
    ),
    (
        ["model.num_heads=6", "model.num_kv_heads=4", "model.hidden_size=96"],
        None,
        "model.num_heads (6) must be divisible by model.num_kv_heads (4)",
    ),
    (
        ["parallel.tp=8"],
        8,
        "model.num_heads (4) must be divisible by parallel.tp (8)",
    ),
    (
        ["model.moe.num_experts=6", "parallel.ep=4"],
        8,
        "model.moe.num_experts (6) must be divisible by parallel.ep (4)",
    ),
    (
        ["model.moe.num_experts=4", "model.moe.top_k=5", "model.moe.router=topk"],
        None,
        "model.moe.top_k (5) must be <= model.moe.num_experts (4)",
    ),
    (
        ["parallel.dp_shard=2", "parallel.tp=2"],
        8,
        "parallel.dp_replicate (1) x parallel.dp_shard (2) x parallel.tp (2) x parallel.pp (1)"
        " = 4 must equal the world size (8)",
    ),
    (
        ["parallel.tp=3"],
        8,
        "parallel.dp_replicate (1) x parallel.tp (3) x parallel.pp (1) = 3 must divide the "
        "world size (8)",
    ),
    (
        ["parallel.ep=2"],
        2,
        "parallel.ep (2) must be 1 for a dense model (model.moe.num_experts is 0)",
    ),
    (["parallel.ep_over_tp=true"], None, "parallel.ep_over_tp (True) needs parallel.tp (1) > 1"),
    (
        ["parallel.tp=2", "parallel.ep=3", "parallel.ep_over_tp=true"],
        None,
        "parallel.ep (3) must be a multiple of parallel.tp (2) with parallel.ep_over_tp",
    ),
    (
        ["model.moe.num_experts=8", "parallel.tp=2", "parallel.ep=8", "parallel.ep_over_tp=true"],
        4,
        "parallel.ep (8) / parallel.tp (2) = 4 must divide parallel.dp_shard (2) with "
        "parallel.ep_over_tp",
    ),
    (
        [
            "model.moe.num_experts=4",
            "parallel.tp=2",
            "parallel.ep=2",
            "parallel.ep_over_tp=true",
            "parallel.sequence_parallel=false",
            "data.seq_len=127",
        ],
        2,
        "data.seq_len (127) must be divisible by parallel.tp (2) with parallel.ep_over_tp (each "
        "tp rank routes its chunk of the sequence)",
    ),
    (
        ["parallel.pp=2", "model.tie_embeddings=true"],
        2,
        "model.tie_embeddings (True) must be false with parallel.pp (2) > 1: the embedding "
        "table and the output projection are on different pipeline stages",
    ),
    (
        ["parallel.pp=2", "train.grad_accum=2"],
        2,
        "train.grad_accum (2) must be 1 with parallel.pp (2) > 1; the pipeline's "
        "parallel.microbatches accumulate instead",
    ),
    (
        ["objective.name=mlm"],
        None,
        "objective.name ('mlm') needs model.family in encoder (got 'decoder')",
    ),
    # NaN passes every `<` / `<=` range check: a NaN clip silently disabled clipping.
    (["optim.lr=nan"], None, "optim.lr (nan) must be a finite number"),
    (["optim.weight_decay=nan"], None, "optim.weight_decay (nan) must be a finite number"),
    (["optim.grad_clip=.nan"], None, "optim.grad_clip (nan) must be a finite number"),
    (["optim.lr=inf"], None, "optim.lr (inf) must be a finite number"),
    (
        ["data.language_weights=en"],
        None,
        "data.language_weights ('en') must be a mapping, e.g. {en: 2, de: 1}",
    ),
    (
        ["data.language_weights=[1, 2]"],
        None,
        "data.language_weights ([1, 2]) must be a mapping, e.g. {en: 2, de: 1}",
    ),
]


def test_pipeline_parallel_takes_document_masks_position_resets_and_tlm():
    # Document, position and language ids go to every stage (parallel.pipeline).
    decoder = load_config(TINY, ["parallel.pp=2", "data.reset_position_ids=true"])
    validate_config(decoder, world_size=2)
    encoder = REPO / "configs" / "tiny_encoder.yaml"
    overrides = ["parallel.pp=2", "model.tie_embeddings=false", "objective.tlm_share=0.25"]
    validate_config(load_config(encoder, overrides), world_size=2)


@pytest.mark.parametrize(("overrides", "world_size", "message"), BAD_CONFIGS)
def test_bad_config_message(overrides, world_size, message):
    with pytest.raises(ValueError) as err:
        cfg = load_config(TINY, overrides)
        validate_config(cfg, world_size=world_size)
    assert str(err.value) == message


def test_tiny_presets_point_only_the_training_manifest_at_the_demo():
    # A user overriding data.manifest must not train against the demo's tokenizer or
    # validate on the demo's shards.
    for name in ("tiny_decoder.yaml", "tiny_moe.yaml", "tiny_encoder.yaml"):
        data = load_config(REPO / "configs" / name).data
        assert (data.tokenizer, data.valid_manifest) == ("", ""), name


def test_max_word_pieces_reaches_the_loaders_masking():
    from data_pipeline.loader import masking_from_objective

    encoder = REPO / "configs" / "tiny_encoder.yaml"
    cfg = load_config(encoder, ["objective.whole_word=true", "objective.max_word_pieces=3"])
    masking = masking_from_objective(cfg.objective)
    assert (masking.whole_word, masking.max_word_pieces) == (True, 3)
    assert masking_from_objective(load_config(encoder).objective).max_word_pieces == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "parallel.pp_schedule=ZigZag",
            "parallel.pp_schedule ('ZigZag') must be one of 1F1B, GPipe, Interleaved1F1B, "
            "LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV",
        ),
        (
            "parallel.activation_checkpointing=some",
            "parallel.activation_checkpointing ('some') must be one of none, full, selective",
        ),
        ("data.on_bad_shard=ignore", "data.on_bad_shard ('ignore') must be one of skip, raise"),
        (
            "objective.name=ctc",
            "objective.name ('ctc') must be one of clm, mlm, tlm, span, btmlm, nsp, sop, "
            "spanbert, electra, simcse, xlco, t5, bart, prefix_lm, translation",
        ),
        (
            "optim.schedule=step",
            "optim.schedule ('step') must be one of cosine, wsd, linear, constant",
        ),
        ("train.precision=fp8", "train.precision ('fp8') must be one of auto, fp32, bf16, fp16"),
        ("train.device=tpu", "train.device ('tpu') must be one of auto, cpu, cuda"),
        ("model.moe.router=hash", "model.moe.router ('hash') must be one of switch, gshard, topk"),
    ],
)
def test_choice_fields_give_one_message_from_load_and_from_validate(override, message):
    # From YAML or an override the loader refuses the value; a config built in Python meets
    # the same check in validate_config.
    with pytest.raises(ValueError) as info:
        load_config(TINY_MOE, [override])
    assert str(info.value) == message
    cfg = load_config(TINY_MOE)
    key, value = override.split("=")
    *path, name = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert str(info.value) == message


def test_parallel_dims_built_directly_meet_the_config_rules():
    from parallel.mesh import ParallelDims

    dims = ParallelDims(pp=2, dp_replicate=1, dp_shard=2, tp=2, ep=2, world_size=8)
    assert (dims.dp, dims.dp_shard_in_ep, dims.edp) == (2, 2, 1)
    for kwargs, message in (
        (
            {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "ep": 1, "world_size": 8},
            "parallel.dp_replicate (1) x parallel.dp_shard (2) x parallel.tp (2) x parallel.pp "
            "(1) = 4 must equal the world size (8)",
        ),
        (
            {"pp": 1, "dp_replicate": 1, "dp_shard": 6, "tp": 1, "ep": 4, "world_size": 6},
            "parallel.ep (4) must divide parallel.dp_shard (6)",
        ),
        (
            {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "ep": 3, "world_size": 4,
             "ep_over_tp": True},
            "parallel.ep (3) must be a multiple of parallel.tp (2) with parallel.ep_over_tp",
        ),
    ):  # fmt: skip
        with pytest.raises(ValueError) as info:
            ParallelDims(**kwargs)
        assert str(info.value) == message
