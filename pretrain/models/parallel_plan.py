"""Parallelisation facts of the model families, stated as data for ``parallel/`` to apply.

What to call: ``tp_plan(cfg)`` for the family's plan (pattern -> style; hand it to
``parallel.parallelize.parallelize_model``), ``pipeline_stage_layers(cfg, num_stages=)`` for the
layer keys of each pipeline stage and ``prune_to_stage(model, ...)`` to cut a model down to one.
Guarantees: ``parallel/`` reaches into a model only through the submodule paths named here.

Plan: a submodule-path pattern (``*`` = one path segment, a layer key) maps to a style name from
``TP_STYLES``. Style ``block`` names the blocks (the units of activation checkpointing,
torch.compile and per-block FSDP2); the other styles say how tensor/sequence parallel shards a
submodule. Submodules not named stay replicated over the tp axis (FSDP still shards them). The
decoder and encoder families share the submodule names of ``pretrain.models.transformer``.

Pipeline: stages own contiguous runs of ``layers``; the first stage also owns
``PIPELINE_FIRST_STAGE`` and the last ``PIPELINE_LAST_STAGE``. ``pipeline_stage_layers`` says
which layer keys each stage holds and ``prune_to_stage`` removes the rest from a model in place
(tied embeddings cannot be split across stages).
"""

from __future__ import annotations

from torch import nn

from pretrain.models.config import ModelConfig

TP_STYLES: dict[str, str] = {
    "block": "a transformer block: the unit of activation checkpointing, torch.compile and "
    "per-block FSDP2 sharding (no tensor-parallel style of its own)",
    "colwise": "ColwiseParallel(): weight sharded on the output dim, activation sharded on the "
    "last dim (local heads / local FFN columns)",
    "rowwise": "RowwiseParallel(): weight sharded on the input dim; output Shard(1) under "
    "sequence parallel, Replicate() without",
    "sequence": "SequenceParallel(): a norm applied to an activation sharded on the sequence dim",
    "sequence_to_replicate_input": "PrepareModuleInput(Shard(1) -> Replicate()): gather the "
    "sequence before a sublayer whose first linears are colwise",
    "embedding": "RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)): "
    "table sharded on its rows, output sharded on the sequence",
    "output": "the output head (untied Linear or tied head), its input the residual stream "
    "(Shard(1) under sequence parallel): vocabulary-parallel, weight and bias Shard(0), the "
    "logits a DTensor Shard(2) for loss_parallel",
    "output_from_replicate": "the output head after a module whose output is replicated (the "
    "MLM head): as output, its input Replicate()",
    "replicate": "weights replicated over tp, applied to a replicated activation (the router gate)",
    "replicate_heads": "weights replicated over tp, applied to local heads (per-head q/k norms)",
    "cross_attention_input": "PrepareModuleInput for cross-attention: the queries' input and the "
    "encoder memory (keyword kv_source_BKD) gathered from Shard(1) to Replicate() under sequence "
    "parallel",
    "moe": "an MoE layer: under tp its input gathered to the whole sequence and its output cut "
    "back to the rank's chunk (sequence parallel), or with parallel.ep_over_tp its tokens split "
    "over tp (parallel.expert_parallel.TokenSplitMoE)",
    "experts": "grouped experts: dim 0 (experts) sharded over ep; under tp w1/w3 sharded on F "
    "(dim 1) and w2 on F (dim 2), the output a partial sum",
}

PIPELINE_FIRST_STAGE: tuple[str, ...] = (
    "tok_embeddings",
    "pos_embeddings",
    "lang_embeddings",
    "type_embeddings",
    "embed_norm",
)
PIPELINE_LAST_STAGE: tuple[str, ...] = (
    "norm",
    "head",
    "pooler",
    "pair_classifier",
    "span_boundary",
    "output",
    "tied_output",
    "output_bias",
)


def tp_plan(cfg: ModelConfig) -> dict[str, str]:
    """The TP/SP plan of a model built from ``cfg`` (pattern -> ``TP_STYLES`` name)."""
    if cfg.family == "encoder_decoder":
        return _encoder_decoder_plan(cfg)
    plan: dict[str, str] = {"layers.*": "block", "tok_embeddings": "embedding"}
    if cfg.position == "learned":
        plan["pos_embeddings"] = "embedding"
    if cfg.num_languages > 0:
        plan["lang_embeddings"] = "embedding"
    if cfg.type_vocab_size > 0:
        plan["type_embeddings"] = "embedding"
    if cfg.norm_position == "post":
        plan["embed_norm"] = "sequence"
    else:
        plan["norm"] = "sequence"
    plan.update(
        {
            "layers.*.attention_norm": "sequence",
            "layers.*.attention": "sequence_to_replicate_input",
            "layers.*.attention.wq": "colwise",
            "layers.*.attention.wk": "colwise",
            "layers.*.attention.wv": "colwise",
            "layers.*.attention.wo": "rowwise",
            "layers.*.ffn_norm": "sequence",
        }
    )
    if cfg.qk_norm:
        plan["layers.*.attention.q_norm"] = "replicate_heads"
        plan["layers.*.attention.k_norm"] = "replicate_heads"
    plan.update(_feed_forward_plan(cfg, "layers.*"))
    if cfg.family == "encoder" and cfg.generator_fraction:
        # ELECTRA: the generator (a quarter of the width: its heads need not divide by tp) runs
        # replicated over tp on the gathered sequence, its blocks still checkpointing / FSDP
        # units; the discriminator's head reads the gathered sequence too.
        plan["generator.layers.*"] = "block"
        plan["generator"] = "sequence_to_replicate_input"
        plan["discriminator"] = "sequence_to_replicate_input"
    elif cfg.family == "encoder":
        # The MLM head's dense + norm need the whole width: run it on the gathered sequence.
        plan["head"] = "sequence_to_replicate_input"
        if cfg.pair_head:  # the pooler reads position 0 of the whole sequence
            plan["pooler"] = "sequence_to_replicate_input"
        if cfg.span_boundary_positions:  # the boundary states of the whole sequence
            plan["span_boundary"] = "sequence_to_replicate_input"
        # the contrastive objectives' mean over the whole sequence (no parameters)
        plan["sentence_pool"] = "sequence_to_replicate_input"
    # The MLM head (ELECTRA: the generator) gathers the sequence, so the projection's input is
    # replicated after it.
    output_style = "output_from_replicate" if cfg.family == "encoder" else "output"
    plan["tied_output" if cfg.tie_embeddings else "output"] = output_style
    return plan


def _feed_forward_plan(cfg: ModelConfig, layers: str) -> dict[str, str]:
    """The dense and MoE feed-forward entries of the blocks matched by ``layers``."""
    plan: dict[str, str] = {}
    if cfg.moe.num_experts == 0 or cfg.moe.every > 1:
        plan[f"{layers}.feed_forward"] = "sequence_to_replicate_input"
        plan[f"{layers}.feed_forward.w1"] = "colwise"
        plan[f"{layers}.feed_forward.w2"] = "rowwise"
        if cfg.mlp in ("swiglu", "gated_gelu"):
            plan[f"{layers}.feed_forward.w3"] = "colwise"
    if cfg.moe.num_experts > 0:
        plan[f"{layers}.moe"] = "moe"
        plan[f"{layers}.moe.router.gate"] = "replicate"
        plan[f"{layers}.moe.experts"] = "experts"
    return plan


def _encoder_decoder_plan(cfg: ModelConfig) -> dict[str, str]:
    """Both stacks of ``pretrain.models.encoder_decoder``: attention heads, cross-attention
    heads (its memory gathered to the whole source sequence under sequence parallel), the
    relative-position table by heads (``colwise`` on an embedding shards its columns: the
    rank's heads), feed-forwards and MoE layers as in the decoder; the output head
    vocabulary-parallel."""
    plan: dict[str, str] = {
        "encoder.layers.*": "block",
        "decoder.layers.*": "block",
        "tok_embeddings": "embedding",
    }
    for stack in ("encoder", "decoder"):
        layers = f"{stack}.layers.*"
        if cfg.position == "learned":
            plan[f"{stack}.pos_embeddings"] = "embedding"
        if cfg.embedding_norm:
            plan[f"{stack}.embed_norm"] = "sequence"
        if cfg.norm_position == "pre":
            plan[f"{stack}.norm"] = "sequence"
        attentions = ["attention"] + (["cross_attention"] if stack == "decoder" else [])
        for attention in attentions:
            plan[f"{layers}.{attention}_norm"] = "sequence"
            plan[f"{layers}.{attention}"] = (
                "cross_attention_input" if attention == "cross_attention" else
                "sequence_to_replicate_input"
            )  # fmt: skip
            for name in ("wq", "wk", "wv"):
                plan[f"{layers}.{attention}.{name}"] = "colwise"
            plan[f"{layers}.{attention}.wo"] = "rowwise"
        plan[f"{layers}.attention.relative_attention_bias"] = "colwise"
        plan[f"{layers}.ffn_norm"] = "sequence"
        plan.update(_feed_forward_plan(cfg, layers))
    plan["tied_output" if cfg.tie_embeddings else "output"] = "output"
    return plan


def pipeline_stage_layers(cfg: ModelConfig, *, num_stages: int) -> list[list[str]]:
    """Layer keys held by each of ``num_stages`` stages: contiguous, as even as possible, the
    extra layers going to the middle stages (the end stages also hold embeddings / output).

    Raises:
        ValueError: more stages than layers.
    """
    if cfg.family == "encoder_decoder":
        return _encoder_decoder_stage_layers(cfg, num_stages=num_stages)
    if num_stages < 1 or num_stages > cfg.num_layers:
        raise ValueError(
            f"pipeline stages ({num_stages}) must be between 1 and model.num_layers "
            f"({cfg.num_layers})"
        )
    return [[str(i) for i in run] for run in _even_runs(cfg.num_layers, num_stages)]


def _even_runs(num_layers: int, num_stages: int) -> list[range]:
    """``num_layers`` split into ``num_stages`` contiguous runs, as even as possible, the extra
    layers going to the middle stages first, then the last, then the first."""
    base, extra = divmod(num_layers, num_stages)
    sizes = [base] * num_stages
    priority = list(range(1, num_stages - 1)) + ([num_stages - 1] if num_stages > 1 else []) + [0]
    for stage in priority[:extra]:
        sizes[stage] += 1
    runs, start = [], 0
    for size in sizes:
        runs.append(range(start, start + size))
        start += size
    return runs


def _encoder_decoder_stage_layers(cfg: ModelConfig, *, num_stages: int) -> list[list[str]]:
    """``[encoder stages | decoder stages]``: no stage holds blocks of both stacks; the
    encoder gets ``floor(S * L_enc / (L_enc + L_dec))`` of the ``S`` stages (at least one, and
    at least one left for the decoder; a decoder block costs more, cross-attention, so a tie
    goes to the decoder), each stack's blocks split evenly over its stages. Keys
    are ``encoder.{i}`` / ``decoder.{j}``."""
    from pretrain.models.encoder_decoder import decoder_layers

    enc, dec = cfg.num_layers, decoder_layers(cfg)
    if num_stages == 1:
        return [[f"encoder.{i}" for i in range(enc)] + [f"decoder.{j}" for j in range(dec)]]
    if num_stages < 1 or num_stages > enc + dec:
        raise ValueError(
            f"pipeline stages ({num_stages}) must be between 1 and model.num_layers + "
            f"model.num_decoder_layers ({enc + dec})"
        )
    enc_stages = min(max(num_stages * enc // (enc + dec), 1), num_stages - 1)
    enc_stages = min(enc_stages, enc)
    enc_stages = max(enc_stages, num_stages - dec)
    return [[f"encoder.{i}" for i in run] for run in _even_runs(enc, enc_stages)] + [
        [f"decoder.{j}" for j in run] for run in _even_runs(dec, num_stages - enc_stages)
    ]


def pipeline_split_points(cfg: ModelConfig, *, num_stages: int) -> list[str]:
    """Module names where stages 1..num_stages-1 begin (torchtitan style: ``"layers.4"``)."""
    stages = pipeline_stage_layers(cfg, num_stages=num_stages)
    if cfg.family == "encoder_decoder":
        return [_stack_layer_path(layers[0]) for layers in stages[1:]]
    return [f"layers.{layers[0]}" for layers in stages[1:]]


def _stack_layer_path(key: str) -> str:
    """``encoder.3`` -> ``encoder.layers.3``."""
    stack, _, index = key.partition(".")
    return f"{stack}.layers.{index}"


def prune_to_stage(model: nn.Module, *, layer_keys: list[str], first: bool, last: bool) -> None:
    """Keep only ``layer_keys`` of ``model.layers``, the embeddings if ``first`` and the final
    norm/head/output if ``last`` (the rest set to None). Works on the meta device.

    Raises:
        ValueError: tied embeddings on a model that is not both first and last stage.
    """
    if (
        getattr(model, "cfg", None) is not None
        and model.cfg.tie_embeddings
        and not (first and last)
    ):
        raise ValueError(
            "model.tie_embeddings (True) cannot be split over pipeline stages; untie it"
        )
    if hasattr(model, "prune_to_stage"):
        model.prune_to_stage(layer_keys=layer_keys, first=first, last=last)
        return
    for key in list(model.layers.keys()):
        if key not in layer_keys:
            del model.layers[key]
    if not first:
        for name in PIPELINE_FIRST_STAGE:
            setattr(model, name, None)
    if not last:
        for name in PIPELINE_LAST_STAGE:
            setattr(model, name, None)


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{"params_total", "params_active"}``; experts count top_k / num_experts of their size
    in the active figure. Works on the meta device."""
    from pretrain.models.moe import GroupedExperts

    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            cfg = model.cfg.moe
            size = sum(p.numel() for p in module.parameters())
            inactive += size * (1.0 - cfg.top_k / cfg.num_experts)
    return {"params_total": total, "params_active": round(total - inactive)}
