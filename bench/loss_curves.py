"""Stored short loss curves of the tiny presets, and a check that the trainer reproduces them.

Call ``python -m bench.loss_curves --check`` (from the repository root) to train every case
below and compare it with ``tests/distributed/curves/<case>.json``; ``--record`` writes those
files instead. ``tests/distributed/test_loss_curves.py`` runs the same check under pytest.
Guarantee: on a machine whose fingerprint (torch version, ``torch.backends.cpu
.get_cpu_capability()``, Python version) equals the stored one, a trainer change that should not
move numerics reproduces every step's loss, grad norm, per-language and per-objective losses
bit for bit (``float.hex`` equality); on another machine they are compared to rel 1e-5.

Each case is a short run (``STEPS`` optimizer steps, ``logging.every=1``, 2 layers, sequence
length 32, batch 4, fp32, ``train.deterministic=true``, no checkpoints, no evaluation) of a tiny
preset through the real trainer (``Trainer(cfg, rank=..., world_size=...).fit()`` in forked gloo
processes), on shards built from the repository's sample the way the trainer tests build them:
the decoder on 1 process and under tp 2, pp 2 and dp 2 (FSDP2); the MoE decoder on 1 process and
under ep 2; the encoder with MLM + TLM (``objective.tlm_share=0.25``, untied embeddings) on 1
process and under tp 2 and pp 2. All cases of a world size share one launch.

When to re-record: only for a deliberate numerics change (a new initialisation, a changed loss
reduction, another optimizer default, a different data order, a torch upgrade), named as such in
the commit message together with the cases it moves; a refactor must pass ``--check``
unchanged. How: ``python -m bench.loss_curves --record`` (about a minute on 2 CPU cores; all
cases, or ``--cases NAME ...``), then ``--check`` once more to see the new files reproduce, and
commit ``tests/distributed/curves/`` with the change. Record on the machine the tests run on, so
that they compare bit for bit there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parallel.testing import run_distributed
from tests.sample_data import REPO, build_sample_shards

CURVES = REPO / "tests" / "distributed" / "curves"
STEPS = 5
REL_TOLERANCE = 1e-5
"""Tolerance of a comparison on a machine whose fingerprint differs from the recorded one."""

COMMON = (
    "model.vocab_size=2000",
    "model.num_layers=2",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    f"train.steps={STEPS}",
    "train.deterministic=true",
    "train.precision=fp32",
    "train.eval_every=0",
    "optim.warmup_steps=2",
    "checkpoint.every=0",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.progress=false",
)
PP2 = ("parallel.pp=2", "parallel.microbatches=2")
PER_KEY = ("loss_per_lang", "loss_per_objective")
"""The per-language and per-objective train losses of each step, recorded beside the loss."""
# Tied embeddings cannot be split over pipeline stages: untied in every encoder case alike.
TLM = ("objective.tlm_share=0.25", "model.tie_embeddings=false")


@dataclass(frozen=True)
class Case:
    """One stored curve: a preset, the world size it runs on and its overrides (after
    ``COMMON``)."""

    preset: str
    world_size: int
    overrides: tuple[str, ...] = ()


CASES: dict[str, Case] = {
    "decoder-1p": Case("tiny_decoder.yaml", 1),
    "decoder-tp2": Case("tiny_decoder.yaml", 2, ("parallel.tp=2",)),
    "decoder-pp2": Case("tiny_decoder.yaml", 2, PP2),
    "decoder-dp2": Case("tiny_decoder.yaml", 2, ("parallel.dp_shard=2",)),
    "moe-1p": Case("tiny_moe.yaml", 1),
    "moe-ep2": Case("tiny_moe.yaml", 2, ("parallel.ep=2",)),
    "encoder-mlm-tlm-1p": Case("tiny_encoder.yaml", 1, TLM),
    "encoder-mlm-tlm-tp2": Case("tiny_encoder.yaml", 2, (*TLM, "parallel.tp=2")),
    "encoder-mlm-tlm-pp2": Case("tiny_encoder.yaml", 2, (*TLM, *PP2)),
}


def build_shards(root: Path) -> Path:
    """The shards the tests' ``shards`` fixture uses (``tests.sample_data.build_sample_shards``:
    four languages' mono text and en-de pairs from the sample), written under ``root``; returns
    their directory."""
    return build_sample_shards(root)["shards"]


def case_overrides(name: str) -> list[str]:
    """The overrides of case ``name`` on its preset, without the run's paths."""
    return [*COMMON, *CASES[name].overrides]


def fingerprint() -> dict[str, str]:
    """What a bit-for-bit comparison depends on: torch version, CPU kernel capability, Python."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def _fit_each(rank: int, world_size: int, cfgs: list) -> list[int]:
    from pretrain.trainer import Trainer

    return [Trainer(cfg, rank=rank, world_size=world_size).fit() for cfg in cfgs]


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    """Per step of a run's ``metrics.jsonl``: ``step``, ``loss`` and ``grad_norm`` as
    ``float.hex`` strings, ``loss_per_lang`` and ``loss_per_objective`` as ``{name: hex}``."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" not in record:
            continue
        row = {"step": record["step"]}
        row.update({key: float(record[key]).hex() for key in ("loss", "grad_norm")})
        for key in PER_KEY:
            row[key] = {k: float(v).hex() for k, v in sorted((record.get(key) or {}).items())}
        curve.append(row)
    return curve


def run_cases(names: list[str], *, shards: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    """Train the cases ``names`` (one launch per world size, cases in ``CASES`` order) on
    ``shards``, run directories under ``workdir``.

    Returns:
        ``{name: {"preset", "world_size", "overrides", "fingerprint", "curve"}}``, the form of a
        stored curve file.

    Raises:
        ValueError: a name is not in ``CASES``.
        RuntimeError: a case's trainer returned a non-zero exit code.
        DistributedTestError: a rank raised or timed out (see ``run_distributed``).
    """
    from pretrain.config import load_config

    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"unknown loss-curve case(s) {unknown}; known: {sorted(CASES)}")
    ordered = [name for name in CASES if name in names]
    results: dict[str, dict[str, Any]] = {}
    for world_size in sorted({CASES[name].world_size for name in ordered}):
        group = [name for name in ordered if CASES[name].world_size == world_size]
        cfgs = [
            load_config(
                REPO / "configs" / CASES[name].preset,
                [
                    f"data.manifest={shards}",
                    f"train.run_dir={workdir / name}",
                    *case_overrides(name),
                ],
            )
            for name in group
        ]
        codes = run_distributed(_fit_each, world_size=world_size, args=(cfgs,), timeout_s=600)
        for name, code in zip(group, codes[0]):
            if code != 0 or any(rank_codes != codes[0] for rank_codes in codes):
                raise RuntimeError(f"loss-curve case {name} exited with codes {codes}")
            results[name] = {
                "preset": CASES[name].preset,
                "world_size": world_size,
                "overrides": case_overrides(name),
                "fingerprint": fingerprint(),
                "curve": read_curve(workdir / name),
            }
    return results


def load_stored(name: str, *, curves: Path = CURVES) -> dict[str, Any]:
    """The stored curve file of case ``name``."""
    return json.loads((curves / f"{name}.json").read_text())


def compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Differences between a fresh run ``got`` and a stored curve ``want`` (both as
    :func:`run_cases` returns them), one line each; empty when they agree.

    Bit for bit (hex equality) when both fingerprints are equal, else to rel ``REL_TOLERANCE``.
    A case whose preset or overrides changed since recording is a difference: re-record it.
    """
    problems = []
    for key in ("preset", "world_size", "overrides"):
        if got[key] != want[key]:
            problems.append(f"{key} changed since recording ({want[key]} -> {got[key]}): re-record")
    if problems:
        return problems
    exact = got["fingerprint"] == want["fingerprint"]
    how = (
        "bit for bit (same fingerprint)"
        if exact
        else f"to rel {REL_TOLERANCE} (fingerprint {got['fingerprint']} differs from the "
        f"recorded {want['fingerprint']})"
    )

    def same(a: str, b: str) -> bool:
        if exact:
            return a == b
        x, y = float.fromhex(a), float.fromhex(b)
        return abs(x - y) <= REL_TOLERANCE * max(abs(x), abs(y))

    steps_got = [r["step"] for r in got["curve"]]
    steps_want = [r["step"] for r in want["curve"]]
    if steps_got != steps_want:
        return [f"logged steps {steps_got} != recorded {steps_want}"]
    for g, w in zip(got["curve"], want["curve"]):
        for key in ("loss", "grad_norm"):
            if not same(g[key], w[key]):
                problems.append(
                    f"step {g['step']} {key}: {float.fromhex(g[key])!r} ({g[key]}) != recorded "
                    f"{float.fromhex(w[key])!r} ({w[key]}), compared {how}"
                )
        for per in PER_KEY:
            if set(g[per]) != set(w[per]):
                problems.append(
                    f"step {g['step']} {per} names {sorted(g[per])} != recorded {sorted(w[per])}"
                )
                continue
            for name, value in w[per].items():
                if not same(g[per][name], value):
                    problems.append(
                        f"step {g['step']} {per}[{name}]: {float.fromhex(g[per][name])!r} != "
                        f"recorded {float.fromhex(value)!r}, compared {how}"
                    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help="write the curve files")
    mode.add_argument("--check", action="store_true", help="compare with the curve files")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--curves", type=Path, default=CURVES, help="curve file directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loss_curves_") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        results = run_cases(args.cases, shards=build_shards(root / "data"), workdir=root / "runs")
    failed = 0
    for name, result in results.items():
        if args.record:
            args.curves.mkdir(parents=True, exist_ok=True)
            path = args.curves / f"{name}.json"
            path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
            print(f"recorded {path} ({len(result['curve'])} steps)")
            continue
        problems = compare(result, load_stored(name, curves=args.curves))
        failed += bool(problems)
        print(f"{name}: {'ok' if not problems else 'DIFFERS'}")
        for line in problems:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
