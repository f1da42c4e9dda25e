"""Single-device training speed: Rosetta's own path side by side with transformers, one run.

For each model (the dense decoder preset and the MoE decoder with the same active parameters)
it trains ``--steps`` timed steps (after ``--warmup`` untimed ones) of forward, backward and AdamW:

- ``rosetta``: our model, our streaming loader reading real shards, our trainer step (AdamW
  fused on CUDA, the run's precision, chunked cross-entropy, MoE aux losses);
- ``rosetta-synthetic``: the same step on batches held in memory, to measure the data wait;
- ``hf``: the identical shapes as ``LlamaForCausalLM`` / ``MixtralForCausalLM`` (sdpa attention,
  ``torch.compile`` with ``--compile-hf``, fused AdamW, the same autocast).

It prints tokens/s, MFU = tokens/s * (6 N + 12 L H T) / the matmul rate it measures on this
device (bf16 on CUDA, fp32 on the CPU), peak memory, the data-wait share of step time, and the
ratios ours / transformers and our MoE / our dense.

``--levers`` then runs our path again with one lever taken away at a time (in-memory batches,
so the loader does not blur it) and prints each variant's tokens/s against the full path:
``no-compile`` (eager blocks), ``unfused-adamw`` (foreach AdamW, which also brings back the
host syncs of the NaN guard), ``unchunked-loss`` (one chunk: whole-batch logits),
``sdpa-document-mask`` (the document mask as a dense SDPA mask instead of FlexAttention's block
mask), ``math-attention`` (that, on SDPA's math kernel), ``no-grouped-gemm`` (MoE only: one
product per expert, which reads the group sizes on the host), ``loader-in-main`` (the real
loader with ``data.num_workers=0``; real batches). ``no-document-masking`` is not a lever but
the like-for-like row: attention over the whole row with SDPA's causal (flash) kernel, what the
transformers twin computes.

Each path also reports its host syncs per step: on CUDA the synchronizing calls
``torch.cuda.set_sync_debug_mode("warn")`` reports, on the CPU ``tests.host_sync`` (under
which compiled code runs eagerly: it counts the eager step's).

On a GPU: ``python bench/bench_mfu.py --shards demo_out/shards`` (presets decoder_1b and
moe_8x_top2, seq 2048). On a CPU the default is tiny fp32 shapes with the fused AdamW, for a
correctness run; its figures are not the GPU targets (and a compiled fp32 MoE takes the
per-expert products: ``torch._grouped_mm`` compiles in bf16 only).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def measure_matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul FLOP/s this device reaches (square products, best of a few)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _release(device: torch.device) -> None:
    """Free what the previous model left (its graphs, cached blocks, optimizer state) so that
    each model starts clean and compiled code is not reused across configs (dynamo's
    recompile limit would otherwise turn later variants eager)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _run_config(preset: str, shards: str, overrides: list[str]):
    from pretrain.config import load_config, validate_config

    cfg = load_config(
        REPO / "configs" / preset,
        [
            f"data.manifest={shards}",
            "data.valid_manifest=",
            "train.run_dir=/tmp/rosetta_bench_mfu",
            "logging.tensorboard=false",
            "train.eval_every=0",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )
    validate_config(cfg, world_size=1)
    return cfg


def bench_rosetta(cfg, *, steps: int, warmup: int) -> dict:
    """Timed steps through ``pretrain.trainer.Trainer``: real loader, then in-memory batches."""
    from pretrain.trainer import Trainer

    _release(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = Trainer(cfg, rank=0, world_size=1)
    device = trainer.device
    batches = iter(trainer.loader)
    held = []
    for _ in range(warmup):
        batch = next(batches)
        held.append(batch)
        trainer.train_step([batch])
    _sync(device)
    _reset_peak(device)
    wait = 0.0
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - before
        out = trainer.train_step([batch])
        tokens += out["tokens"]
    _sync(device)
    elapsed = time.perf_counter() - start
    real = {
        "tokens_per_s": tokens / elapsed,
        "data_wait_share": wait / elapsed,
        "peak_memory_gib": _peak_memory_gib(device),
        "loss": float(out["loss"]),  # a device tensor on the sync-free path
    }
    # The same step on batches already in memory: what the step costs without any loader.
    held = (held * (steps // max(1, len(held)) + 1))[:steps]
    start = time.perf_counter()
    for batch in held:
        trainer.train_step([batch])
    _sync(device)
    synthetic = {"tokens_per_s": tokens / (time.perf_counter() - start)}
    syncs = count_host_syncs(device, lambda: trainer.train_step([held[0]]))
    result = {
        "host_syncs_per_step": syncs,
        "real": real,
        "synthetic": synthetic,
        "flops_per_token": trainer.flops_per_token,
        "params_active": trainer.params_active,
        "device": device,
        "precision": trainer.precision,
    }
    return result  # the next phase's _release frees this one's model


def bench_hf(cfg, *, steps: int, warmup: int, device: torch.device, precision: str,
             compile_model: bool) -> dict:  # fmt: skip
    """Timed steps of the transformers twin with identical shapes."""
    import transformers

    from checkpoints_tools.adapters import to_hf
    from pretrain.models import build_model

    _release(device)

    with torch.device("meta"):
        ours = build_model(cfg.model)
    _, hf_config = to_hf(ours.state_dict(), cfg.model)
    hf_config._attn_implementation = "sdpa"
    cls = getattr(transformers, hf_config.architectures[0])
    model = cls(hf_config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    step_fn = torch.compile(model) if compile_model else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    inputs = torch.randint(0, cfg.model.vocab_size, shape, generator=gen).to(device)

    def one_step() -> float:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        with ctx:
            loss = step_fn(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1e9)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        one_step()
    syncs = count_host_syncs(device, one_step)
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {
        "tokens_per_s": steps * inputs.numel() / elapsed,
        "peak_memory_gib": _peak_memory_gib(device),
        "loss": float(loss.detach()),
        "class": cls.__name__,
        "host_syncs_per_step": syncs,
    }
    return result


LEVERS = {
    "no-compile": ["parallel.compile=false"],
    "unfused-adamw": ["optim.fused=false"],
    "unchunked-loss": ["objective.loss_chunk_tokens=1000000000"],
    "sdpa-document-mask": ["model.attention=sdpa"],
    "math-attention": ["model.attention=sdpa"],
    "no-grouped-gemm": [],
    "no-document-masking": ["model.document_masking=false"],
    "loader-in-main": ["data.num_workers=0"],
}


def bench_lever(cfg, lever: str, *, steps: int, warmup: int) -> float:
    """Our step's tokens/s with ``lever`` taken away (see the module docstring)."""
    from unittest import mock

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with ExitStack() as stack:
        if lever == "math-attention":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if lever == "no-grouped-gemm":
            stack.enter_context(
                mock.patch("pretrain.models.moe._grouped_mm_ok", lambda *args: False)
            )
        result = bench_rosetta(cfg, steps=steps, warmup=warmup)
    if lever == "loader-in-main":
        return result["real"]["tokens_per_s"]
    return result["synthetic"]["tokens_per_s"]


def count_host_syncs(device: torch.device, step) -> int:
    """Host syncs one call of ``step()`` makes: CUDA's sync debug warnings on a GPU,
    ``tests.host_sync`` on the CPU."""
    if device.type == "cuda":
        import warnings

        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    from tests.host_sync import HostSyncRecorder

    with HostSyncRecorder() as syncs:
        step()
    return len(syncs.calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="demo_out/shards", help="shard directory to read")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument(
        "--shapes",
        choices=("auto", "tiny", "full"),
        default="auto",
        help="full: the 1.1B presets (GPU); tiny: CPU-sized (correctness)",
    )
    parser.add_argument("--compile-hf", action="store_true", help="torch.compile the HF model")
    parser.add_argument("--compile", action="store_true", help="parallel.compile=true for ours")
    parser.add_argument(
        "--models", nargs="+", choices=("dense", "moe"), default=["dense", "moe"],
        help="which models to run (a GPU command has 10 minutes: split the run)",
    )  # fmt: skip
    parser.add_argument(
        "--levers", nargs="*", choices=list(LEVERS), default=None,
        help="also measure these levers taken away (ours only; no names: all)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from parallel.dist import destroy_distributed, init_distributed

    init_distributed()
    cuda = torch.cuda.is_available()
    full = args.shapes == "full" or (args.shapes == "auto" and cuda)
    steps = args.steps or (20 if full else 4)
    warmup = args.warmup or (5 if full else 2)
    if full:
        models = [("dense", "decoder_1b.yaml", []), ("moe", "moe_8x_top2.yaml", [])]
        common = ["data.batch_size=4", "data.seq_len=2048", "data.num_workers=2"]
    else:
        # Tiny shapes, fp32 (this CPU has no fast bf16 matmul), the fused (sync-free) AdamW.
        tiny = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                "model.num_kv_heads=2", "model.ffn_hidden_size=176", "model.vocab_size=8000",
                "train.precision=fp32", "optim.fused=true"]  # fmt: skip
        models = [
            ("dense", "decoder_1b.yaml", tiny),
            ("moe", "moe_8x_top2.yaml", [*tiny, "model.moe.expert_ffn_hidden_size=88"]),
        ]
        common = ["data.batch_size=4", "data.seq_len=128"]
    if args.compile:
        common.append("parallel.compile=true")
    device = torch.device("cuda" if cuda else "cpu")
    rate_dtype = torch.bfloat16 if cuda else torch.float32
    rate = measure_matmul_rate(device, rate_dtype)
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "matmul_rate_tflops": rate / 1e12,
        "matmul_dtype": str(rate_dtype).replace("torch.", ""),
        "shapes": "full" if full else "tiny",
        "models": {},
    }
    for name, preset, overrides in models:
        if name not in args.models:
            continue
        cfg = _run_config(preset, args.shards, [*common, *overrides])
        ours = bench_rosetta(cfg, steps=steps, warmup=warmup)
        hf = bench_hf(cfg, steps=steps, warmup=warmup, device=ours["device"],
                      precision=ours["precision"], compile_model=args.compile_hf)  # fmt: skip
        mfu_ours = ours["real"]["tokens_per_s"] * ours["flops_per_token"] / rate
        mfu_hf = hf["tokens_per_s"] * ours["flops_per_token"] / rate
        results["models"][name] = {
            "preset": preset,
            "params_active": ours["params_active"],
            "rosetta_tokens_per_s": ours["real"]["tokens_per_s"],
            "rosetta_synthetic_tokens_per_s": ours["synthetic"]["tokens_per_s"],
            "rosetta_mfu": mfu_ours,
            "rosetta_peak_memory_gib": ours["real"]["peak_memory_gib"],
            "data_wait_share": ours["real"]["data_wait_share"],
            "rosetta_host_syncs_per_step": ours["host_syncs_per_step"],
            "hf_host_syncs_per_step": hf["host_syncs_per_step"],
            "hf_class": hf["class"],
            "hf_tokens_per_s": hf["tokens_per_s"],
            "hf_mfu": mfu_hf,
            "hf_peak_memory_gib": hf["peak_memory_gib"],
            "ours_over_hf": ours["real"]["tokens_per_s"] / hf["tokens_per_s"],
            "final_loss": {"rosetta": ours["real"]["loss"], "hf": hf["loss"]},
        }
        if args.levers is not None:
            base = ours["synthetic"]["tokens_per_s"]
            table = {"full (in-memory batches)": {"tokens_per_s": base, "vs_full": 1.0}}
            for lever in args.levers or list(LEVERS):
                extra = LEVERS[lever]
                if lever == "no-grouped-gemm" and name != "moe":
                    continue
                variant = _run_config(preset, args.shards, [*common, *overrides, *extra])
                rate_off = bench_lever(variant, lever, steps=steps, warmup=warmup)
                table[lever] = {"tokens_per_s": rate_off, "vs_full": rate_off / base}
            results["models"][name]["levers"] = table
    if "dense" in results["models"] and "moe" in results["models"]:
        results["moe_over_dense"] = (
            results["models"]["moe"]["rosetta_tokens_per_s"]
            / results["models"]["dense"]["rosetta_tokens_per_s"]
        )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
