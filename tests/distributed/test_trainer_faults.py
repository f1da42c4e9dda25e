"""The trainer under faults and bad input: nothing lost, nothing silent.

A fresh start never prunes an earlier run's checkpoints; nothing non-finite is ever saved;
``optim.*`` overrides reach a resumed optimizer; a corrupt latest checkpoint is passed over by
name; the start-up checks are one line before anything is written; skipped corrupt samples
are counted in ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch

from parallel.testing import run_distributed
from pretrain.checkpoint import complete_checkpoints
from pretrain.config import check_run_inputs, config_to_yaml, load_config
from pretrain.preemption import EXIT_DIVERGED
from tests.distributed.trainer_runs import fit_rank as _run
from tests.distributed.trainer_runs import logged_losses as _losses
from tests.distributed.trainer_runs import trainer_config as _cfg

REPO = Path(__file__).resolve().parents[2]
QUICK = ("train.eval_every=0", "checkpoint.keep=2")


def _main(rank: int, world_size: int, argv: list[str]) -> tuple[int, str]:
    """``pretrain.train.main(argv)`` in a harness process: its exit code and stderr."""
    from pretrain.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _cli(cfg, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg), encoding="utf-8")
    return run_distributed(_main, world_size=1, args=(["--config", str(config), *overrides],))[0]


def _log(run_dir: Path) -> str:
    return (run_dir / "logs" / "rank_0.log").read_text(encoding="utf-8")


def _steps(run_dir: Path) -> list[int]:
    return [s for s, _ in complete_checkpoints(run_dir / "checkpoints")]


# --- item 1: a fresh start into an earlier run ---------------------------------------------


def test_fresh_start_into_an_earlier_run_is_refused_and_overwrite_moves_it_aside(
    shards, tmp_path: Path
):
    run = tmp_path / "run"
    # The earlier run: higher steps than the new one will reach (keep ranks by step number).
    earlier = _cfg("tiny_decoder.yaml", shards, run, *QUICK, "train.steps=6", "checkpoint.every=3")
    code, err = _cli(earlier, tmp_path)
    assert code == 0, err
    assert _steps(run) == [3, 6]
    before = (run / "metrics.jsonl").read_text()
    config_before = (run / "config.yaml").read_text()

    fresh = _cfg("tiny_decoder.yaml", shards, run, *QUICK, "train.steps=2", "checkpoint.every=1")
    code, err = _cli(fresh, tmp_path)
    assert code == 2
    assert err.strip() == (
        f"error: train.run_dir ({str(run)!r}) holds checkpoints or metrics of an earlier run: "
        "continue it with train.resume=auto, choose a new train.run_dir, or set "
        "train.overwrite=true to move its contents aside"
    )
    # Nothing written: not even config.yaml.
    assert _steps(run) == [3, 6]
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "config.yaml").read_text() == config_before

    code, err = _cli(fresh, tmp_path, "train.overwrite=true")
    assert code == 0, err
    assert _steps(run) == [1, 2]
    assert sorted(_losses(run)) == [1, 2]
    (moved,) = tmp_path.glob("run.old-*")
    assert _steps(moved) == [3, 6]
    assert (moved / "metrics.jsonl").read_text() == before


# --- item 2: no save of non-finite state ---------------------------------------------------


def _run_poisoned(rank: int, world_size: int, cfg, poison_after: int, what: str, signal_at: int):
    """Train; right after step ``poison_after`` (whose loss was finite) write NaN into one
    parameter (``what="param"``) or one Adam moment (``"moment"``); SIGUSR1 at ``signal_at``."""
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    step_fn, calls = trainer.train_step, {"n": 0}

    def step(batches):
        out = step_fn(batches)
        calls["n"] += 1
        if calls["n"] == poison_after:
            with torch.no_grad():
                param = next(trainer.parts[0].parameters())
                if what == "param":
                    param.mul_(float("nan"))
                else:
                    trainer.optimizers[0].state[param]["exp_avg"].fill_(float("inf"))
        if calls["n"] == signal_at:
            trainer.preemption.request_stop(signal.SIGUSR1)
        return out

    trainer.train_step = step
    return trainer.fit()


@pytest.mark.parametrize(
    ("when", "poison_after", "what", "signal_at", "kept", "line"),
    [
        # Weights NaN after the finite step 4: the periodic save at 4 is refused.
        ("periodic", 4, "param", 0, [2], "the parameters hold NaN/Inf after step 4"),
        ("periodic-moment", 4, "moment", 0, [2], "the optimizer state hold NaN/Inf after step 4"),
        # The end-of-run save (step 5, not a periodic step) after a finite loss.
        ("end", 5, "param", 0, [4], "the parameters hold NaN/Inf after step 5"),
        # The SIGTERM/SIGUSR1 save.
        ("signal", 3, "param", 3, [2], "the parameters hold NaN/Inf after step 3"),
        # The NaN streak's loss at the end of the run (steps 4 and 5 NaN, streak < max).
        ("end-nan-loss", 3, "param", 0, [2], "the loss of step 5 was NaN/Inf"),
    ],
    ids=["periodic", "periodic-moment", "end", "signal", "end-nan-loss"],
)
def test_nonfinite_state_is_never_saved_and_exits_3(
    shards, tmp_path: Path, when, poison_after, what, signal_at, kept, line
):
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path, "train.eval_every=0", "train.steps=5",
               "checkpoint.every=2", "checkpoint.keep=1", "logging.every=1")  # fmt: skip
    args = (cfg, poison_after, what, signal_at)
    assert run_distributed(_run_poisoned, world_size=1, args=args) == [EXIT_DIVERGED]
    assert _steps(tmp_path) == kept  # keep=1: the last good checkpoint was not pushed out
    step = line.split("step ")[-1].split()[0]
    assert f"not saving step {step}: {line}; stopping with the last good checkpoint intact" in _log(
        tmp_path
    )


def test_nan_weight_decay_saves_nothing(shards, tmp_path: Path):
    """A divergence the loss does not show: optim.weight_decay=nan (refused by the config check,
    so set behind it here) makes the weights NaN after step 1 with a finite step-1 loss."""
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path, "train.eval_every=0", "train.steps=3",
               "checkpoint.every=1", "checkpoint.keep=1")  # fmt: skip
    cfg.optim.weight_decay = float("nan")
    assert run_distributed(_run, world_size=1, args=(cfg, None)) == [EXIT_DIVERGED]
    assert _steps(tmp_path) == []
    assert "not saving step 1: the parameters hold NaN/Inf after step 1" in _log(tmp_path)


# --- item 5: optim.* on resume -------------------------------------------------------------


def _run_and_groups(rank: int, world_size: int, cfg) -> tuple[int, list[dict]]:
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    code = trainer.fit()
    groups = [
        {k: v for k, v in g.items() if k in ("lr", "initial_lr", "weight_decay", "betas")}
        for g in trainer.optimizers[0].param_groups
    ]
    return code, groups


def _lrs(run_dir: Path) -> dict[int, float]:
    from pretrain.plots import read_metrics

    return {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl")}


def test_optim_overrides_apply_on_resume_with_one_line(shards, tmp_path: Path):
    extra = (*QUICK, "checkpoint.every=2", "optim.schedule=constant", "optim.warmup_steps=0")
    first = _cfg("tiny_decoder.yaml", shards, tmp_path, *extra, "train.steps=2")
    assert run_distributed(_run, world_size=1, args=(first, None)) == [0]
    assert _lrs(tmp_path)[2] == pytest.approx(3e-3)
    resumed = _cfg("tiny_decoder.yaml", shards, tmp_path, *extra, "train.steps=4",
                   "train.resume=auto", "optim.lr=1e-3", "optim.weight_decay=0.05",
                   "optim.beta2=0.99")  # fmt: skip
    code, groups = run_distributed(_run_and_groups, world_size=1, args=(resumed,))[0]
    assert code == 0
    lrs = _lrs(tmp_path)
    assert lrs[3] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-3)
    assert groups[0] == {"lr": pytest.approx(1e-3), "initial_lr": 1e-3, "weight_decay": 0.05,
                         "betas": (0.9, 0.99)}  # fmt: skip
    assert groups[1]["weight_decay"] == 0.0  # norms/biases/embeddings stay decay-free
    assert (
        f"optim.* differs from checkpoint {tmp_path / 'checkpoints' / 'step_2'}; this run uses "
        "its own: optim.lr 0.003 -> 0.001, optim.beta2 0.95 -> 0.99, "
        "optim.weight_decay 0.1 -> 0.05"
    ) in _log(tmp_path)
    # The checkpoint's config.yaml is the config the run used.
    saved = load_config(tmp_path / "checkpoints" / "step_4" / "config.yaml")
    assert (saved.optim.lr, saved.optim.weight_decay) == (1e-3, 0.05)


def test_continue_from_import_hf_without_config_uses_the_runs_optim(shards, tmp_path: Path):
    """import-hf without --config writes the built-in optim defaults (lr 3e-4, cosine, 100
    warmup steps); the continued run follows its own optim.* instead."""
    from checkpoints_tools.convert import export_hf, import_hf

    extra = (*QUICK, "checkpoint.every=0", "train.steps=2", "optim.schedule=constant",
             "optim.warmup_steps=0")  # fmt: skip
    first = _cfg("tiny_decoder.yaml", shards, tmp_path / "a", *extra)
    assert run_distributed(_run, world_size=1, args=(first, None)) == [0]
    export_hf(tmp_path / "a" / "checkpoints" / "step_2", out=tmp_path / "hf",
              tokenizer=shards["tok"])  # fmt: skip
    import_hf(tmp_path / "hf", out=tmp_path / "imported")
    again = _cfg("tiny_decoder.yaml", shards, tmp_path / "b", *extra,
                 f"train.resume={tmp_path / 'imported'}")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(again, None)) == [0]
    assert _lrs(tmp_path / "b") == {1: pytest.approx(3e-3), 2: pytest.approx(3e-3)}
    assert "this run uses its own: optim.lr 0.0003 -> 0.003" in _log(tmp_path / "b")


# --- corrupt latest checkpoint under resume=auto -------------------------------------------


def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_resumed(shards, tmp_path: Path):
    extra = (*QUICK, "checkpoint.every=2")
    full = _cfg("tiny_decoder.yaml", shards, tmp_path / "full", *extra, "train.steps=6")
    assert run_distributed(_run, world_size=1, args=(full, None)) == [0]
    run = tmp_path / "run"
    first = _cfg("tiny_decoder.yaml", shards, run, *extra, "train.steps=6", "train.stop_at=4")
    assert run_distributed(_run, world_size=1, args=(first, None)) == [0]
    assert _steps(run) == [2, 4]
    shard = run / "checkpoints" / "step_4" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])  # a torn write after the rename

    resumed = _cfg("tiny_decoder.yaml", shards, run, *extra, "train.steps=6", "train.resume=auto")
    assert run_distributed(_run, world_size=1, args=(resumed, None)) == [0]
    log = _log(run)
    assert (
        f"checkpoint {run / 'checkpoints' / 'step_4'} is corrupt ({shard}: truncated "
        f"({size // 2} of {size} bytes)); falling back to the previous complete checkpoint"
    ) in log
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in log
    # Steps 3 and 4 are trained again, exactly as the uninterrupted run did.
    reference = _losses(tmp_path / "full")
    assert {s: v for s, v in _losses(run).items() if s > 4} == {5: reference[5], 6: reference[6]}


# --- start-up checks: one line, before anything is written ---------------------------------


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory: pytest.TempPathFactory, shards) -> Path:
    from data_pipeline.text_inputs import MonoInput
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other_tok")
    text = root / "en.txt"
    shutil.copy(shards["tok"].parent / "en.txt", text)
    train_tokenizer([MonoInput("en", (text,))], vocab_size=500, out=root / "tok", seed=0,
                    num_threads=1)  # fmt: skip
    return root / "tok"


def _check(shards, tmp_path: Path, *overrides: str) -> str:
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path / "run", *overrides)
    with pytest.raises(ValueError) as err:
        check_run_inputs(cfg)
    return str(err.value)


def test_start_up_checks_are_one_line(shards, other_tokenizer: Path, tmp_path: Path):
    m = shards["shards"]
    assert _check(shards, tmp_path, "data.valid_manifest=/no/such") == (
        "data.valid_manifest ('/no/such'): manifest '/no/such/manifest.json': no such file"
    )
    assert _check(shards, tmp_path, "data.manifest=/no/such") == (
        "data.manifest ('/no/such'): manifest '/no/such/manifest.json': no such file"
    )
    assert _check(shards, tmp_path, "data.manifest=") == (
        "data.manifest ('') must name a shard directory or its manifest.json"
    )
    assert _check(shards, tmp_path, "model.vocab_size=1000") == (
        "model.vocab_size (1000) must be >= the vocabulary of the tokenizer of data.manifest (2000)"
    )
    message = _check(shards, tmp_path, f"data.tokenizer={other_tokenizer}")
    assert message.startswith(
        f"data.tokenizer ({str(other_tokenizer)!r}) is not the tokenizer data.manifest "
        f"({str(m)!r}) was made with (model sha256 "
    )
    assert message.endswith("); leave data.tokenizer empty to use the manifest's")
    assert _check(shards, tmp_path, "data.tokenizer=/no/such").startswith(
        "data.tokenizer ('/no/such'): "
    )
    assert _check(shards, tmp_path, f"train.resume={tmp_path}") == (
        f"train.resume ({str(tmp_path)!r}) must be none, auto or a complete checkpoint "
        "directory (one holding .metadata)"
    )
    (tmp_path / "file").write_text("x")
    assert _check(shards, tmp_path, f"train.run_dir={tmp_path / 'file'}") == (
        f"train.run_dir ({str(tmp_path / 'file')!r}) is a file; it must name a directory"
    )
    # The manifest's own tokenizer, named, passes; as does an empty data.tokenizer.
    check_run_inputs(
        _cfg("tiny_decoder.yaml", shards, tmp_path / "ok", f"data.tokenizer={shards['tok']}")
    )
    check_run_inputs(_cfg("tiny_decoder.yaml", shards, tmp_path / "ok", "data.tokenizer="))


def test_corrupt_checkpoint_named_by_train_resume_is_one_line(shards, tmp_path: Path):
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path / "a", *QUICK, "train.steps=1")
    assert run_distributed(_run, world_size=1, args=(cfg, None)) == [0]
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    (ckpt / ".metadata").write_bytes(b"\x80\x04truncated")
    message = _check(shards, tmp_path, f"train.resume={ckpt}")
    assert message.startswith(
        f"train.resume ({str(ckpt)!r}) is corrupt: {ckpt / '.metadata'}: unreadable ("
    )


def test_bad_valid_manifest_fails_at_start_without_writing(shards, tmp_path: Path):
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path / "run", "data.valid_manifest=/no/such")
    code, err = _cli(cfg, tmp_path)
    assert (code, err.strip()) == (
        2,
        "error: data.valid_manifest ('/no/such'): manifest '/no/such/manifest.json': no such file",
    )
    assert not (tmp_path / "run").exists()


# --- bad samples in metrics.jsonl ----------------------------------------------------------


def test_skipped_corrupt_samples_are_counted_in_metrics(shards, tmp_path: Path):
    from data_pipeline.shard import ShardSettings, run_shard_job
    from data_pipeline.text_inputs import MonoInput

    # Several shards per language (a skipped shard leaves others to read), some corrupt.
    root = shards["tok"].parent
    mono = [MonoInput(lang, (root / f"{lang}.txt",)) for lang in ("en", "de")]
    data = tmp_path / "shards"
    settings = ShardSettings(sample_tokens=512, shard_text_bytes=8 << 10)
    run_shard_job(mono, pairs=[], tokenizer=shards["tok"], out=data, workers=1, settings=settings)
    en = sorted(data.glob("mono_en_*.tar"))
    assert len(en) > 1
    for shard in en[:-1]:  # all but one: the first reads meet a corrupt one
        raw = bytearray(shard.read_bytes())
        raw[1100:1300] = b"\xff" * 200  # inside the first payload (and the next header)
        shard.write_bytes(bytes(raw))
    cfg = _cfg("tiny_decoder.yaml", {"shards": data}, tmp_path / "run", *QUICK, "train.steps=3",
               "checkpoint.every=0", "data.batch_size=16",
               "data.language_weights={en: 1}")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(cfg, None)) == [0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["bad_samples"] > 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    clean = _cfg("tiny_decoder.yaml", shards, tmp_path / "clean", *QUICK, "train.steps=1",
                 "checkpoint.every=0")  # fmt: skip
    assert run_distributed(_run, world_size=1, args=(clean, None)) == [0]
    assert json.loads((tmp_path / "clean" / "metrics.jsonl").read_text())["bad_samples"] == 0


def test_valid_manifest_of_another_tokenizer_is_one_line(shards, tmp_path: Path):
    manifest = json.loads((shards["shards"] / "manifest.json").read_text())
    sha = manifest["tokenizer"]["model_sha256"]
    manifest["tokenizer"]["model_sha256"] = "0" * 64
    (tmp_path / "valid").mkdir()
    (tmp_path / "valid" / "manifest.json").write_text(json.dumps(manifest))
    assert _check(shards, tmp_path, f"data.valid_manifest={tmp_path / 'valid'}") == (
        f"data.valid_manifest ({str(tmp_path / 'valid')!r}) was made with another tokenizer "
        f"than data.manifest ({str(shards['shards'])!r}) (model sha256 000000000000 != "
        f"{sha[:12]})"
    )


def _main_per_rank(rank: int, world_size: int, argvs: list[list[str]]) -> tuple[int, str]:
    return _main(rank, world_size, argvs[rank])


def test_a_start_refused_on_one_rank_stops_every_rank(shards, tmp_path: Path):
    """Ranks on nodes without a shared file system may see different inputs: one refusal
    stops all (no rank waits for the others in a collective)."""
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path / "run", *QUICK, "train.steps=2")
    config = tmp_path / "run.yaml"
    config.write_text(config_to_yaml(cfg), encoding="utf-8")
    argvs = [["--config", str(config)], ["--config", str(config), "data.valid_manifest=/no/such"]]
    out = run_distributed(_main_per_rank, world_size=2, args=(argvs,), timeout_s=120)
    assert out == [
        (2, "error: another rank refused the start (its error names the input)\n"),
        (2, "error: data.valid_manifest ('/no/such'): manifest '/no/such/manifest.json': "
            "no such file\n"),
    ]  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_every_checkpoint_corrupt_under_resume_auto_is_one_line(shards, tmp_path: Path):
    cfg = _cfg("tiny_decoder.yaml", shards, tmp_path, *QUICK, "train.steps=2")
    assert _cli(cfg, tmp_path)[0] == 0
    (tmp_path / "checkpoints" / "step_2" / ".metadata").write_bytes(b"torn")
    first_config = (tmp_path / "config.yaml").read_text()
    resumed = _cfg("tiny_decoder.yaml", shards, tmp_path, *QUICK, "train.steps=3",
                   "train.resume=auto")  # fmt: skip
    code, err = _cli(resumed, tmp_path)
    assert code == 2
    assert err.strip().startswith(
        f"error: train.resume (auto): no loadable checkpoint in {tmp_path / 'checkpoints'}; "
        f"the newest, step_2, is corrupt: {tmp_path / 'checkpoints' / 'step_2' / '.metadata'}: "
        "unreadable ("
    )
    assert (tmp_path / "config.yaml").read_text() == first_config  # nothing written


# --- an async checkpoint is complete once written ------------------------------------------


def _run_killed_after_async_write(rank: int, world_size: int, cfg, kill_at: int, saved: int):
    """Train; at step ``kill_at`` wait until the async checkpoint of step ``saved`` is complete
    on disk (its write has ended: no later save, no close), then SIGKILL this process."""
    import os
    import time

    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    step_fn, calls = trainer.train_step, {"n": 0}
    final = trainer.run_dir / "checkpoints" / f"step_{saved}"

    def step(batches):
        out = step_fn(batches)
        calls["n"] += 1
        if calls["n"] == kill_at:
            deadline = time.monotonic() + 60
            while not final.is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    trainer.train_step = step
    return trainer.fit()


def test_run_killed_after_an_async_write_resumes_from_that_checkpoint(shards, tmp_path: Path):
    from parallel.testing import DistributedTestError

    extra = (*QUICK, "checkpoint.every=2", "checkpoint.async=true", "train.steps=6")
    full = _cfg("tiny_decoder.yaml", shards, tmp_path / "full", *extra)
    assert run_distributed(_run, world_size=2, args=(full, None)) == [0, 0]

    run = tmp_path / "run"
    killed = _cfg("tiny_decoder.yaml", shards, run, *extra)
    with pytest.raises(DistributedTestError, match=r"rank [01]"):
        run_distributed(_run_killed_after_async_write, world_size=2, args=(killed, 3, 2))
    # Both processes died after the write of step 2 and before the save of step 4.
    assert _steps(run) == [2]
    assert not list((run / "checkpoints").glob(".step_*"))

    resumed = _cfg("tiny_decoder.yaml", shards, run, *extra, "train.resume=auto")
    assert run_distributed(_run, world_size=2, args=(resumed, None)) == [0, 0]
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in _log(run)
    reference = _losses(tmp_path / "full")
    assert {s: v for s, v in _losses(run).items() if s > 2} == {
        s: reference[s] for s in range(3, 7)
    }
    assert _steps(run) == [4, 6]
