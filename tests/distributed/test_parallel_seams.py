"""Parallelism changes a model only through styles and plans: no class swap, no instance
attribute over a method, no forward hook on the model; EP is a ``ParallelStyle``; and a
vocabulary-parallel tied head gives the unsharded model's logits."""

from __future__ import annotations

import copy

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle

from parallel.expert_parallel import ExpertParallel, TokenSplitMoE
from parallel.tensor_parallel import VocabParallelOutput
from parallel.testing import run_distributed
from pretrain.models import build_model
from tests.distributed.parallel_cases import SEED, parallel_model, tiny_config

LAYOUTS = {
    "tp2": (tiny_config("decoder"), {"tp": 2}),
    "tp2-tied-encoder": (tiny_config("encoder"), {"tp": 2}),
    "ep2": (tiny_config("decoder", moe=True), {"ep": 2, "dp_shard": 2}),
    "ep_over_tp": (tiny_config("decoder", moe=True), {"tp": 2, "ep": 2, "ep_over_tp": True}),
}


def _check(rank: int, world_size: int) -> dict:
    out = {}
    for label, (cfg, par) in LAYOUTS.items():
        with torch.device("meta"):
            plain = build_model(copy.deepcopy(cfg))
        classes = {name: type(m) for name, m in plain.named_modules()}
        model, _ = parallel_model(cfg, par, world_size=world_size)
        swapped = [
            name
            for name, m in model.named_modules()
            if name.replace("._fsdp_wrapped_module", "") in classes
            and type(m).__name__ != classes[name.replace("._fsdp_wrapped_module", "")].__name__
            and not type(m).__name__.startswith("FSDP")
        ]
        out[label] = {
            "swapped": swapped,
            "instance_projection": "output_projection" in vars(model),
            # FSDP2's own root hooks (data parallel) are not parallel/'s.
            "root_forward_hooks": len(
                [
                    hook
                    for hook in model._forward_hooks.values()
                    if not getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")
                ]
            ),
        }
        if label == "tp2-tied-encoder":
            tokens_BT = torch.randint(
                1, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1)
            )
            with torch.no_grad():
                logits = model(tokens_BT)
                out[label]["dtensor"] = isinstance(logits, DTensor)
                out[label]["logits"] = logits.full_tensor()
    return out


def test_parallel_seams_world_2() -> None:
    assert issubclass(ExpertParallel, ParallelStyle)
    assert issubclass(TokenSplitMoE, ParallelStyle)
    assert issubclass(VocabParallelOutput, ParallelStyle)
    results = run_distributed(_check, world_size=2, timeout_s=240)
    cfg = LAYOUTS["tp2-tied-encoder"][0]
    reference = build_model(copy.deepcopy(cfg))
    reference.init_weights(SEED)
    tokens_BT = torch.randint(1, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens_BT)
    for rank, per_rank in enumerate(results):
        for label, got in per_rank.items():
            assert got["swapped"] == [], (rank, label, got["swapped"])
            assert not got["instance_projection"], (rank, label)
            assert got["root_forward_hooks"] == 0, (rank, label)
        tied = per_rank["tp2-tied-encoder"]
        assert tied["dtensor"]
        torch.testing.assert_close(tied["logits"], expected, rtol=1e-5, atol=1e-6)
