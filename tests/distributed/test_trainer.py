"""The trainer end to end on real (small) shards: it learns, stops on a signal with a checkpoint,
and resumes to exactly the loss curve of an uninterrupted run (fp32, CPU), also under EP2/TP2."""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from parallel.testing import run_distributed
from pretrain.checkpoint import complete_checkpoints
from pretrain.preemption import EXIT_DIVERGED, EXIT_PREEMPTED
from tests.distributed.trainer_runs import fit_rank as _run
from tests.distributed.trainer_runs import logged_losses as _losses
from tests.distributed.trainer_runs import trainer_config as _cfg
from tests.sample_data import LANGS, REPO

PP2 = ("parallel.pp=2", "parallel.microbatches=2", "model.document_masking=false")


@pytest.mark.parametrize(
    ("preset", "world_size", "extra"),
    [
        ("tiny_decoder.yaml", 1, ("checkpoint.async=true",)),
        ("tiny_moe.yaml", 2, ("parallel.ep=2", "model.moe.dropless=true")),
        ("tiny_decoder.yaml", 2, ("parallel.tp=2",)),
        # A tp-replicated router gate beside the TP shards in one AdamW group.
        ("tiny_moe.yaml", 2, ("parallel.tp=2", "model.moe.dropless=true")),
        ("tiny_encoder.yaml", 1, ("objective.tlm_share=0.25",)),
        # ELECTRA's sampled replacements resume too; an MoE discriminator under EP
        (
            "tiny_electra.yaml",
            2,
            (
                "model.moe.num_experts=4",
                "model.moe.top_k=2",
                "model.moe.dropless=true",
                "parallel.ep=2",
            ),
        ),  # fmt: skip
        ("tiny_decoder.yaml", 2, PP2),
        (
            "tiny_moe.yaml",
            2,
            (
                "parallel.tp=2",
                "parallel.ep=2",
                "parallel.ep_over_tp=true",
                "model.moe.dropless=true",
            ),
        ),
    ],
    ids=[
        "decoder-async-ckpt",
        "moe-ep2",
        "decoder-tp2",
        "moe-tp2",
        "encoder-mlm-tlm",
        "electra-moe-ep2",
        "decoder-pp2",
        "moe-tp2-ep2-over-tp",
    ],
)
def test_stop_and_resume_reproduce_the_uninterrupted_curve(
    shards, tmp_path: Path, preset: str, world_size: int, extra: tuple[str, ...]
):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = _cfg(preset, shards, full_dir, *extra)
    codes = run_distributed(_run, world_size=world_size, args=(full, None))
    assert codes == [0] * world_size

    split = _cfg(preset, shards, split_dir, *extra)
    codes = run_distributed(_run, world_size=world_size, args=(split, 3))
    assert codes == [EXIT_PREEMPTED] * world_size
    assert [s for s, _ in complete_checkpoints(split_dir / "checkpoints")] == [3]
    resumed = _cfg(preset, shards, split_dir, *extra, "train.resume=auto")
    codes = run_distributed(_run, world_size=world_size, args=(resumed, None))
    assert codes == [0] * world_size

    reference, curve = _losses(full_dir), _losses(split_dir)
    assert sorted(reference) == list(range(1, 9))
    assert curve == reference  # bit for bit
    assert [s for s, _ in complete_checkpoints(split_dir / "checkpoints")] == [4, 8]
    last = json.loads((full_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(last["tokens_per_lang"]) >= {"en", "de"}
    assert "valid_loss" in last and math.isfinite(last["valid_loss"])
    assert (full_dir / "loss.png").is_file()
    if "encoder" in preset:
        assert set(last["loss_per_objective"]) == {"mlm", "tlm"}
    elif "electra" in preset:
        assert set(last["loss_per_objective"]) == set(last["rtd_loss"]) == {"electra"}
    elif extra != PP2 and "parallel.tp=2" not in extra:  # TP: vocab-sharded logits, no split
        assert set(last["loss_per_objective"]) == {"clm"}
    if "moe" in preset or "model.moe.num_experts=4" in extra:
        assert len(last["moe_expert_load"]) == 4
        assert last["moe_dropped_fraction"] == 0.0


def test_loss_falls(shards, tmp_path: Path):
    cfg = _cfg(
        "tiny_decoder.yaml",
        shards,
        tmp_path,
        "train.steps=30",
        "optim.lr=0.01",
        "checkpoint.every=0",
        "train.eval_every=0",
    )
    assert run_distributed(_run, world_size=1, args=(cfg, None)) == [0]
    losses = _losses(tmp_path)
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(28, 31)) / 3
    assert last < first - 1.0, (first, last)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(metrics["loss_per_lang"]) == set(LANGS)


def _weights_sum(trainer) -> float:
    from torch.distributed.tensor import DTensor

    return sum(
        float((p.full_tensor() if isinstance(p, DTensor) else p).double().abs().sum())
        for part in trainer.parts
        for p in part.parameters()
    )


def _run_with_nan(rank: int, world_size: int, cfg, nan_from: int) -> dict:
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    forward = trainer.forward_loss
    calls = {"n": 0}
    weights = {}

    def poisoned(batch, **kwargs):
        calls["n"] += 1  # one micro-batch per step here
        if calls["n"] == nan_from + 1:
            weights["good"] = _weights_sum(trainer)  # after the last good step
        loss, per_lang = forward(batch, **kwargs)
        if calls["n"] > nan_from:
            loss = loss * float("nan")
        return loss, per_lang

    trainer.forward_loss = poisoned
    code = trainer.fit()
    return {
        "code": code,
        "skipped": trainer.guard.total,
        "sync_free": trainer.sync_free,
        "untouched": weights["good"] == _weights_sum(trainer),
    }


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-adamw", "fused-adamw-sync-free"])
def test_nan_losses_skip_updates_then_stop_with_last_good_checkpoint(
    shards, tmp_path: Path, fused: bool
):
    # Fused AdamW takes the sync-free path (CUDA's default): the update is skipped on the
    # device and the guard reads each step's loss a step late, except at log/checkpoint steps.
    cfg = _cfg(
        "tiny_decoder.yaml",
        shards,
        tmp_path,
        "train.max_nonfinite_steps=3",
        "checkpoint.every=2",
        "train.eval_every=0",
        "logging.every=5",
        f"optim.fused={str(fused).lower()}",
    )
    out = run_distributed(_run_with_nan, world_size=1, args=(cfg, 4))[0]
    assert out == {"code": EXIT_DIVERGED, "skipped": 3, "sync_free": fused, "untouched": True}
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    state = torch.load(tmp_path / "checkpoints" / "step_4" / "rank_0.pt", weights_only=True)
    assert "loader" in state and "rng" in state


def _run_killed_in_save(rank: int, world_size: int, cfg, kill_step: int) -> int:
    import os

    import pretrain.checkpoint as checkpoint_module
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    dcp_save = checkpoint_module.dcp.save

    def save_then_die(state, *, checkpoint_id):
        if rank == 1 and f".step_{kill_step}.partial" in str(checkpoint_id):
            os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the save
        return dcp_save(state, checkpoint_id=checkpoint_id)

    checkpoint_module.dcp.save = save_then_die
    return trainer.fit()


def test_rank_killed_mid_save_leaves_previous_checkpoint_and_resume_matches(shards, tmp_path: Path):
    from parallel.testing import DistributedTestError

    extra = ("checkpoint.every=2", "train.eval_every=0")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = _cfg("tiny_decoder.yaml", shards, full_dir, *extra)
    assert run_distributed(_run, world_size=2, args=(full, None)) == [0, 0]

    killed = _cfg("tiny_decoder.yaml", shards, split_dir, *extra)
    # Rank 1 dies; rank 0 fails in the collective it was in (either may be reported first).
    with pytest.raises(DistributedTestError, match=r"rank [01] failed"):
        run_distributed(_run_killed_in_save, world_size=2, args=(killed, 6), timeout_s=120)
    root = split_dir / "checkpoints"
    assert (root / ".step_6.partial").is_dir()
    assert [s for s, _ in complete_checkpoints(root)] == [2, 4]

    resumed = _cfg("tiny_decoder.yaml", shards, split_dir, *extra, "train.resume=auto")
    assert run_distributed(_run, world_size=2, args=(resumed, None)) == [0, 0]
    assert _losses(split_dir) == _losses(full_dir)
    assert [s for s, _ in complete_checkpoints(root)] == [6, 8]
    assert not (root / ".step_6.partial").exists()


def test_pipeline_parallel_matches_one_process(shards, tmp_path: Path):
    """PP2 (1F1B, 2 microbatches) follows the single-process curve of the same model."""
    single = _cfg("tiny_decoder.yaml", shards, tmp_path / "one", "model.document_masking=false")
    assert run_distributed(_run, world_size=1, args=(single, None)) == [0]
    piped = _cfg("tiny_decoder.yaml", shards, tmp_path / "pp", *PP2)
    assert run_distributed(_run, world_size=2, args=(piped, None)) == [0, 0]
    one, pp = _losses(tmp_path / "one"), _losses(tmp_path / "pp")
    assert sorted(one) == sorted(pp) == list(range(1, 9))
    for step in one:
        assert pp[step] == pytest.approx(one[step], rel=1e-5), step
    # Validation runs forward-only through both stages and gives the same per-language losses.
    from pretrain.plots import read_metrics

    valid_one, valid_pp = (
        {r["step"]: r["valid_loss_per_lang"] for r in read_metrics(d / "metrics.jsonl")
         if "valid_loss_per_lang" in r}
        for d in (tmp_path / "one", tmp_path / "pp")
    )  # fmt: skip
    assert sorted(valid_one) == sorted(valid_pp) == [4, 8]
    for step, per_lang in valid_one.items():
        assert set(valid_pp[step]) == set(per_lang) == set(LANGS)
        for lang, value in per_lang.items():
            assert valid_pp[step][lang] == pytest.approx(value, rel=1e-5), (step, lang)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(shards, tmp_path: Path, precision: str):
    """bf16 autocast (fp32 master weights) and fp16 with loss scaling follow the fp32 curve."""
    extra = ("train.steps=3", "checkpoint.every=0", "train.eval_every=0")
    fp32 = _cfg("tiny_decoder.yaml", shards, tmp_path / "fp32", *extra)
    assert run_distributed(_run, world_size=1, args=(fp32, None)) == [0]
    mixed = _cfg("tiny_decoder.yaml", shards, tmp_path / precision, *extra,
                 f"train.precision={precision}")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(mixed, None)) == [0]
    reference, curve = _losses(tmp_path / "fp32"), _losses(tmp_path / precision)
    for step in (1, 2, 3):
        assert curve[step] == pytest.approx(reference[step], rel=2e-2), step
        assert curve[step] != reference[step]  # it really ran in lower precision


def test_continue_pretraining_from_an_imported_hf_model(shards, tmp_path: Path):
    """train -> export-hf -> import-hf -> train.resume=<imported>: the weights carry over."""
    from checkpoints_tools.convert import export_hf, import_hf

    extra = ("checkpoint.every=0", "train.eval_every=0")
    first = _cfg("tiny_decoder.yaml", shards, tmp_path / "a", *extra)
    assert run_distributed(_run, world_size=1, args=(first, None)) == [0]
    trained = _losses(tmp_path / "a")
    export_hf(tmp_path / "a" / "checkpoints" / "step_8", out=tmp_path / "hf",
              tokenizer=shards["tok"])  # fmt: skip
    config = tmp_path / "a" / "checkpoints" / "step_8" / "config.yaml"
    import_hf(tmp_path / "hf", out=tmp_path / "imported", base_config=config)
    again = _cfg("tiny_decoder.yaml", shards, tmp_path / "b", *extra,
                 f"train.resume={tmp_path / 'imported'}")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(again, None)) == [0]
    resumed = _losses(tmp_path / "b")
    assert sorted(resumed) == list(range(1, 9))  # the imported checkpoint starts at step 0
    # Starting from the trained weights, not from a fresh init (whose first loss is ~ln V).
    assert resumed[1] < trained[1] - 0.1, (resumed[1], trained[1])

    # Resharded to TP2 (weights only: no rank states), it continues on 2 ranks with the same
    # first loss as on one (same weights, same data from the start).
    from checkpoints_tools.convert import reshard

    reshard(tmp_path / "imported", out=tmp_path / "imported_tp2",
            overrides=["parallel.tp=2", "parallel.dp_shard=1"])  # fmt: skip
    assert not list((tmp_path / "imported_tp2").glob("rank_*.pt"))
    tp2 = _cfg("tiny_decoder.yaml", shards, tmp_path / "c", *extra, "parallel.tp=2",
               f"train.resume={tmp_path / 'imported_tp2'}")  # fmt: skip
    assert run_distributed(_run, world_size=2, args=(tp2, None)) == [0, 0]
    assert _losses(tmp_path / "c")[1] == pytest.approx(resumed[1], rel=1e-5)


def test_gradient_accumulation_matches_the_larger_batch(shards, tmp_path: Path):
    """2 micro-batches of 4 rows per step follow 1 batch of 8 (full CLM rows: equal weights)."""
    extra = ("train.steps=4", "checkpoint.every=0", "train.eval_every=0")
    big = _cfg("tiny_decoder.yaml", shards, tmp_path / "big", *extra, "data.batch_size=8")
    assert run_distributed(_run, world_size=1, args=(big, None)) == [0]
    accum = _cfg("tiny_decoder.yaml", shards, tmp_path / "accum", *extra, "data.batch_size=4",
                 "train.grad_accum=2")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(accum, None)) == [0]
    one, two = _losses(tmp_path / "big"), _losses(tmp_path / "accum")
    for step in range(1, 5):
        assert two[step] == pytest.approx(one[step], rel=1e-5), step


@contextlib.contextmanager
def _cuda_syncs_raise():
    """CUDA's own check: any synchronizing call raises inside (nothing is left to record)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield SimpleNamespace(calls=[])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _watched_steps(rank: int, world_size: int, cfgs: dict, cuda: bool = False) -> dict:
    """Per config: two steps (after a first one: lazy optimizer state, allocator warm-up) under
    the host-sync check (``tests.host_sync`` on the CPU, CUDA's sync debug mode with
    ``cuda``), their losses and what the check recorded."""
    from pretrain.trainer import Trainer
    from tests.host_sync import HostSyncRecorder

    watch = _cuda_syncs_raise if cuda else HostSyncRecorder
    result = {}
    for label, cfg in cfgs.items():
        trainer = Trainer(cfg, rank=rank, world_size=world_size)
        batches = iter(trainer.loader)
        trainer.train_step([next(batches)])
        held = [next(batches) for _ in range(2)]
        with watch() as syncs:
            outs = [trainer.train_step([batch]) for batch in held]
        for out in outs:
            trainer.settle(out)
        result[label] = {
            "sync_free": trainer.sync_free,
            "syncs": syncs.calls,
            "losses": [out["loss"] for out in outs],
        }
    return result


def test_step_makes_no_host_sync_checked_on_cpu(shards, tmp_path: Path):
    # The sync-free step, checked in every CI: with the fused AdamW (CUDA's default; on the CPU
    # asked for) the step has no device-to-host read (tests.host_sync), MoE token counts
    # included, dropless and with capacity. The unfused step reads its loss for the NaN guard
    # and MLM compacts its targets (documented syncs): the check sees both.
    cfgs = {
        "dense": _cfg("tiny_decoder.yaml", shards, tmp_path / "a", "optim.fused=true"),
        "moe capacity": _cfg("tiny_moe.yaml", shards, tmp_path / "b", "optim.fused=true"),
        "moe dropless": _cfg(
            "tiny_moe.yaml", shards, tmp_path / "c", "optim.fused=true", "model.moe.dropless=true"
        ),
        "dense unfused": _cfg("tiny_decoder.yaml", shards, tmp_path / "d", "optim.fused=false"),
        "mlm": _cfg("tiny_encoder.yaml", shards, tmp_path / "e", "optim.fused=true"),
    }
    out = run_distributed(_watched_steps, world_size=1, args=(cfgs,))[0]
    for label in ("dense", "moe capacity", "moe dropless"):
        assert out[label]["sync_free"] is True, label
        assert out[label]["syncs"] == [], (label, out[label]["syncs"])
        assert all(math.isfinite(loss) for loss in out[label]["losses"]), label
    assert out["dense unfused"]["sync_free"] is False
    assert any("trainer.py" in call for call in out["dense unfused"]["syncs"])
    # The fused and unfused AdamW take the same steps.
    assert out["dense unfused"]["losses"] == pytest.approx(out["dense"]["losses"], rel=1e-5)
    assert [call.split(" at ")[0] for call in out["mlm"]["syncs"]] == ["aten.nonzero.default"] * 2


def _trainer_error(rank: int, world_size: int, cfg) -> str:
    from pretrain.trainer import Trainer

    try:
        Trainer(cfg, rank=rank, world_size=world_size)
    except ValueError as error:
        return str(error)
    return ""


def test_flex_attention_on_the_cpu_is_refused_in_one_line(shards, tmp_path: Path):
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path, "model.attention=flex")
    message = run_distributed(_trainer_error, world_size=1, args=(cfg,))[0]
    assert message == (
        "model.attention (flex) needs a CUDA device to train on (train.device is 'auto', "
        "resolved to cpu): FlexAttention has no CPU backward; use auto or sdpa"
    )


def _eager_and_compiled_losses(rank: int, world_size: int, cfgs: dict) -> dict:
    import torch._dynamo

    from pretrain.trainer import Trainer

    result = {}
    for label, (eager_cfg, compiled_cfg) in cfgs.items():
        losses = []
        for cfg in (eager_cfg, compiled_cfg):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            trainer = Trainer(cfg, rank=rank, world_size=world_size)
            batches = iter(trainer.loader)
            outs = [trainer.train_step([next(batches)]) for _ in range(3)]
            for out in outs:
                trainer.settle(out)
            losses.append([out["loss"] for out in outs])
        result[label] = {
            "eager": losses[0],
            "compiled": losses[1],
            "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
            "frames": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        }
    return result


def test_compiled_blocks_train_like_eager(shards, tmp_path: Path):
    # The "compiled blocks" lever on the CPU (inductor): three steps with
    # parallel.compile=true give the eager losses, and the bf16 MoE block (autocast, one
    # grouped bf16 product per projection) compiles without a graph break.
    runs = {
        "dense fp32": ("tiny_decoder.yaml", ["train.precision=fp32"]),
        "moe dropless bf16": (
            "tiny_moe.yaml",
            ["train.precision=bf16", "model.moe.dropless=true", "optim.fused=true"],
        ),
    }
    cfgs = {
        label: tuple(
            _cfg(preset, shards, tmp_path / f"{i}{j}", *extra, f"parallel.compile={flag}")
            for j, flag in enumerate(("false", "true"))
        )
        for i, (label, (preset, extra)) in enumerate(runs.items())
    }
    out = run_distributed(_eager_and_compiled_losses, world_size=1, args=(cfgs,))[0]
    assert out["dense fp32"]["compiled"] == pytest.approx(out["dense fp32"]["eager"], rel=1e-4)
    moe = out["moe dropless bf16"]
    assert moe["compiled"] == pytest.approx(moe["eager"], rel=2e-2)
    assert moe["graph_breaks"] == {}
    assert moe["frames"] >= 1
    assert all(math.isfinite(loss) for loss in moe["compiled"])


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny_decoder.yaml", "tiny_moe.yaml"])
def test_cuda_step_makes_no_host_sync(shards, tmp_path: Path, preset: str):
    # The sync-free step queues forward, backward, clipping and the fused AdamW without
    # waiting for the GPU (no .item()/.cpu()/nonzero, MoE token counts included).
    cfg = _cfg(preset, shards, tmp_path, "train.device=cuda", "train.precision=bf16")
    out = run_distributed(_watched_steps, world_size=1, args=({preset: cfg}, True))[0][preset]
    assert out["sync_free"] is True
    assert all(math.isfinite(loss) for loss in out["losses"])


def test_bench_mfu_runs_on_the_cpu_and_reports_consistent_figures(shards, tmp_path: Path):
    # The single-device benchmark without a GPU: it runs end to end on tiny shapes (ours from real
    # shards, the transformers twins, two levers) and its figures hang together. No speed goal.
    import subprocess
    import sys

    out = tmp_path / "mfu.json"
    command = [
        sys.executable, str(REPO / "bench" / "bench_mfu.py"), "--shards", str(shards["shards"]),
        "--steps", "2", "--warmup", "1", "--json", str(out),
        "--levers", "no-grouped-gemm", "no-document-masking",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shapes"] == "tiny" and result["matmul_rate_tflops"] > 0
    dense, moe = result["models"]["dense"], result["models"]["moe"]
    assert (dense["hf_class"], moe["hf_class"]) == ("LlamaForCausalLM", "MixtralForCausalLM")
    # Same active parameters (8 experts of half the FFN, top-2), within the router's share.
    assert moe["params_active"] == pytest.approx(dense["params_active"], rel=0.01)
    for model in (dense, moe):
        assert model["ours_over_hf"] == pytest.approx(
            model["rosetta_tokens_per_s"] / model["hf_tokens_per_s"]
        )
        assert model["rosetta_mfu"] / model["hf_mfu"] == pytest.approx(model["ours_over_hf"])
        assert 0.0 <= model["data_wait_share"] < 1.0
        assert model["rosetta_host_syncs_per_step"] == 0  # the fused AdamW's sync-free step
        assert all(math.isfinite(loss) for loss in model["final_loss"].values())
    assert "no-grouped-gemm" in moe["levers"] and "no-grouped-gemm" not in dense["levers"]
    assert moe["levers"]["no-document-masking"]["tokens_per_s"] > 0
    assert result["moe_over_dense"] == pytest.approx(
        moe["rosetta_tokens_per_s"] / dense["rosetta_tokens_per_s"]
    )
