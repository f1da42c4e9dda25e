"""Export time and peak memory (RSS) of ``export-hf`` for the 1.1B dense preset.

Builds a random-init checkpoint of configs/decoder_1b.yaml with CheckpointManager (model
materialised on CPU in fp32; no optimizer state is needed by export, so a plain SGD with no
state keeps the checkpoint at model size), then runs ``python -m checkpoints_tools export-hf``
in a child process and reads its peak RSS (``ru_maxrss`` of the child) and wall time.

    python bench/bench_export.py --work /tmp/bench_export [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_checkpoint(work: Path, *, tokenizer: Path) -> Path:
    """A random-init 1.1B checkpoint under ``work/run``; returns its directory."""
    import torch

    from pretrain.checkpoint import CheckpointManager, TrainState
    from pretrain.config import config_to_yaml, load_config
    from pretrain.models import build_model

    run = work / "run"
    cfg = load_config(
        REPO / "configs" / "decoder_1b.yaml",
        [f"train.run_dir={run}", f"data.tokenizer={tokenizer}", "data.manifest="],
    )
    ckpt = run / "checkpoints" / "step_0"
    if ckpt.is_dir():
        return ckpt
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.init_weights(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    CheckpointManager(run, keep=1).save(
        0, TrainState(model, optimizer, step=0), rank_state={}, config_yaml=config_to_yaml(cfg)
    )
    return ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_export")
    parser.add_argument("--tokenizer", default=str(REPO / "demo_out" / "tokenizer"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ckpt = build_checkpoint(work, tokenizer=Path(args.tokenizer))
    build_s = time.perf_counter() - start
    out = work / f"hf_{args.dtype}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoints_tools",
            "export-hf",
            str(ckpt),
            "--out",
            str(out),
            "--dtype",
            args.dtype,
        ],
        check=True,
    )
    export_s = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    ckpt_size = sum(p.stat().st_size for p in ckpt.iterdir())
    import torch

    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "checkpoint_bytes": ckpt_size,
                "export_bytes": size,
                "build_checkpoint_s": round(build_s, 1),
                "export_s": round(export_s, 1),
                "export_peak_rss_gib": round(peak_kib / 2**20, 2),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
