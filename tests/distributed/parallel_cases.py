"""Shared by the parallel tests (no tests here): tiny configs, a training loop, the reference.

Every check trains a tiny model for ``STEPS`` optimizer steps on fixed data and compares the
losses, the clipped gradient norms and the parameters after with a single-process run of the
same model, seed and global batch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from parallel.config import ParallelConfig
from parallel.mesh import ParallelDims
from parallel.parallelize import clip_grad_norm_, local_value, loss_context, parallelize_model
from parallel.pipeline import build_pipeline
from pretrain.models import (
    ModelConfig,
    MoEConfig,
    build_model,
    pipeline_stage_layers,
    prune_to_stage,
    tp_plan,
)
from pretrain.models.transformer import canonical_name

STEPS = 5
SEED = 1234
BATCH = 4
SEQ = 16
TARGET_SEQ = 12
MAX_NORM = 0.5  # small enough that clipping acts on every step


def tiny_config(family: str = "decoder", *, moe: bool = False) -> ModelConfig:
    """A 2-layer width-32 model of ``family`` (MoE: 4 dropless experts, no aux loss, so that a
    split batch gives the same gradients as the whole one)."""
    encoder = family == "encoder"
    return ModelConfig(
        family=family,
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2 if not encoder else None,
        ffn_hidden_size=64,
        max_seq_len=64,
        position="learned" if encoder else "rope",
        norm="layernorm" if encoder else "rmsnorm",
        norm_position="post" if encoder else "pre",
        mlp="gelu" if encoder else "swiglu",
        bias=encoder,
        tie_embeddings=encoder,
        qk_norm=not encoder,
        moe=MoEConfig(
            num_experts=4 if moe else 0,
            top_k=2,
            router="gshard",
            expert_ffn_hidden_size=32,
            dropless=True,
            aux_loss_coef=0.0,
            z_loss_coef=0.0,
        ),
    )


def tiny_encdec_config(shape: str = "mt5", *, moe: str = "") -> ModelConfig:
    """A 2 + 2-layer width-32 encoder-decoder: ``mt5`` (RMSNorm, relative positions, gated GELU,
    unscaled attention, untied head) or ``mbart`` (LayerNorm, learned positions, embedding norm,
    biases, tied head with final_logits_bias); ``moe``: ``switch`` (top-1) or ``gshard`` (top-2)
    dropless MoE in every other layer of both stacks, without aux losses (as ``tiny_config``)."""
    mt5 = shape == "mt5"
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=128,
        hidden_size=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        head_dim=12 if mt5 else None,
        ffn_hidden_size=64,
        max_seq_len=64,
        position="relative" if mt5 else "learned",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        norm="rmsnorm" if mt5 else "layernorm",
        norm_eps=1e-6 if mt5 else 1e-5,
        mlp=("gelu" if moe else "gated_gelu") if mt5 else "gelu",
        bias=not mt5,
        scale_attention=not mt5,
        embedding_norm=not mt5,
        final_logits_bias=not mt5,
        tie_embeddings=not mt5,
        init_std=0.1,
        moe=MoEConfig(
            num_experts=4 if moe else 0,
            top_k=1 if moe == "switch" else 2,
            router=moe or "gshard",
            every=2,
            offset=1 if moe else None,
            expert_ffn_hidden_size=32,
            dropless=True,
            aux_loss_coef=0.0,
            z_loss_coef=0.0,
        ),
    )


def batches(cfg: ModelConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` global batches ``(tokens_BT, targets_BT)``. Encoder-decoder: ``tokens`` is the
    source (``SEQ`` ids, 0 = padding at the end of some rows) followed by the decoder inputs
    (``TARGET_SEQ``), see ``logits_of``."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        if cfg.family == "encoder_decoder":
            source = torch.randint(1, cfg.vocab_size, (BATCH, SEQ), generator=gen)
            source[1, -5:] = 0
            source[3, -9:] = 0
            target = torch.randint(1, cfg.vocab_size, (BATCH, TARGET_SEQ + 1), generator=gen)
            out.append((torch.cat([source, target[:, :-1]], dim=1), target[:, 1:].contiguous()))
            continue
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits of a ``batches`` row block (encoder-decoder: source padding has
    document id -1)."""
    if model.cfg.family != "encoder_decoder":
        return model(tokens)
    source, decoder_inputs = tokens[:, :SEQ], tokens[:, SEQ:]
    document_ids = torch.where(source == 0, -1, 0)
    return model(source, decoder_inputs, document_ids_BS=document_ids)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD: AdamW's update is sign-like on near-zero gradients, which turns 1e-8 reduction-order
    # noise into lr-sized parameter differences (shared/notes); SGD keeps differences linear.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> full parameter value (collective for DTensors: call on every rank)."""
    out = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[canonical_name(name)] = value.detach().clone()
    return out


def train(model, data, *, dims, dp_rank: int = 0, dp_size: int = 1, microbatches: int = 1) -> dict:
    """Train ``STEPS`` steps on this rank's slice of each global batch.

    ``microbatches > 1`` (one process): gradient accumulation over that many equal slices, the
    per-token mean loss over the whole batch and each MoE aux loss weighted ``1 / microbatches``
    (what pipeline parallel computes: ``parallel.pipeline``).
    """
    opt = _optimizer(model)
    losses, norms = [], []
    for tokens, targets in data:
        tokens = tokens.chunk(dp_size)[dp_rank]
        targets = targets.chunk(dp_size)[dp_rank]
        opt.zero_grad()
        if microbatches > 1:
            assert dims is None
            model.set_moe_aux_loss_scale(1.0 / microbatches)
            num_targets = (targets != -100).sum()
            loss = torch.zeros(())
            for tok, tgt in zip(tokens.chunk(microbatches), targets.chunk(microbatches)):
                logits = logits_of(model, tok)
                part = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
                (part / num_targets).backward()
                loss = loss + part.detach() / num_targets
            norms.append(clip_grad_norm_(model, max_norm=MAX_NORM, dims=None).item())
            losses.append(loss.item())
            opt.step()
            continue
        logits = logits_of(model, tokens)
        with loss_context(dims):
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
        value = local_value(loss).detach().clone()
        if dims is not None and dims.dp > 1:
            torch.distributed.all_reduce(value, group=dims["dp"].get_group())
            value /= dims.dp
        norms.append(clip_grad_norm_(model, max_norm=MAX_NORM, dims=dims).item())
        losses.append(value.item())
        opt.step()
    return {"losses": losses, "norms": norms}


def reference(cfg: ModelConfig, *, microbatches: int = 1, data=None) -> dict:
    """The unsharded single-process run (``microbatches``: see ``train``; ``data``: batches
    other than ``batches(cfg)``)."""
    model = build_model(copy.deepcopy(cfg))
    model.init_weights(SEED)
    data = batches(cfg) if data is None else data
    result = train(model, data, dims=None, microbatches=microbatches)
    result["params"] = full_params(model)
    return result


def parallel_model(
    cfg: ModelConfig, par: dict, *, world_size: int
) -> tuple[torch.nn.Module, ParallelDims]:
    """``cfg``'s model built on the meta device and parallelized with ``parallel.*`` settings
    ``par`` over this rank's mesh (seeded init), and the layout."""
    pcfg = ParallelConfig(**par)
    dims = ParallelDims.from_config(pcfg, world_size=world_size)
    dims.build_mesh()
    with torch.device("meta"):
        model = build_model(copy.deepcopy(cfg))
    parallelize_model(model, dims=dims, cfg=pcfg, tp_plan=tp_plan(cfg), seed=SEED)
    return model, dims


def parallel_run(rank: int, world_size: int, cfg: ModelConfig, par: dict) -> dict:
    """One rank of a parallel run of ``cfg`` with ``parallel.*`` settings ``par``."""
    model, dims = parallel_model(cfg, par, world_size=world_size)
    result = train(model, batches(cfg), dims=dims, dp_rank=dims.dp_rank, dp_size=dims.dp_world_size)
    result["expert_local"] = expert_elements(model, local=True)
    params = full_params(model)
    if rank == 0:
        result["params"] = params
    return result


def expert_elements(model: torch.nn.Module, *, local: bool) -> int:
    """Elements of the grouped-expert parameters: this rank's shards (``local``) or the full
    tensors."""
    total = 0
    for name, param in model.named_parameters():
        if ".experts." in f".{name}.":
            is_dtensor = hasattr(param, "to_local")
            total += param.to_local().numel() if local and is_dtensor else param.numel()
    return total


def assert_matches(result: dict, ref: dict, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Losses, grad norms and parameters of ``result`` equal the reference's."""
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol
    )
    torch.testing.assert_close(
        torch.tensor(result["norms"]), torch.tensor(ref["norms"]), rtol=rtol, atol=atol
    )
    if "params" in result:
        assert result["params"].keys() == ref["params"].keys()
        for name, value in ref["params"].items():
            torch.testing.assert_close(
                result["params"][name],
                value,
                rtol=rtol,
                atol=atol,
                msg=lambda m, n=name: f"{n}: {m}",
            )


def run_cases(rank: int, world_size: int, cases: list[tuple[ModelConfig, dict]]) -> list[dict]:
    """Several parallel runs in one launch (each launch costs seconds of start-up)."""
    return [parallel_run(rank, world_size, cfg, par) for cfg, par in cases]


def check_cases(
    world_size: int, cases: dict[str, tuple[ModelConfig, dict]]
) -> dict[str, list[dict]]:
    """Run ``cases`` (label -> (model config, parallel settings)) in one ``world_size`` launch
    and compare every rank of every case with its reference.

    Returns:
        label -> the per-rank results (``losses``, ``norms``, ``expert_local``, ...).
    """
    from parallel.testing import run_distributed

    labels = list(cases)
    results = run_distributed(
        run_cases, world_size=world_size, args=([cases[k] for k in labels],), timeout_s=240
    )
    for index, label in enumerate(labels):
        ref = reference(cases[label][0])
        for rank, per_rank in enumerate(results):
            try:
                assert_matches(per_rank[index], ref)
            except AssertionError as err:
                raise AssertionError(f"{label}, rank {rank}: {err}") from None
    return {label: [per_rank[index] for per_rank in results] for index, label in enumerate(labels)}


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy (the pipeline tests' loss; -100 targets ignored)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def pipeline_setup(world_size: int, cfg: ModelConfig, par: dict) -> tuple:
    """``(dims, schedule, stage models, info)`` of a pipeline over ``cfg`` on this rank's mesh
    (``par``: ParallelConfig fields), stages split as the trainer splits them."""
    pcfg = ParallelConfig(**par)
    dims = ParallelDims.from_config(pcfg, world_size=world_size)
    dims.build_mesh()

    def build_stage(stage: int, num_stages: int):
        with torch.device("meta"):
            model = build_model(copy.deepcopy(cfg))
        keys = pipeline_stage_layers(cfg, num_stages=num_stages)
        prune_to_stage(
            model, layer_keys=keys[stage], first=stage == 0, last=stage == num_stages - 1
        )
        return model

    schedule, models, info = build_pipeline(
        build_stage, dims=dims, cfg=pcfg, tp_plan=tp_plan(cfg), seed=SEED, loss_sum_fn=loss_sum
    )
    return dims, schedule, models, info
