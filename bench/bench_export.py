"""Export and import time and peak memory (RSS) of ``export-hf`` / ``import-hf`` for the 1.1B
dense preset.

Builds a random-init checkpoint of configs/decoder_1b.yaml with CheckpointManager (model
materialised on CPU in fp32; no optimizer state is needed by export, so a plain SGD with no
state keeps the checkpoint at model size) in one child process, then runs ``export-hf`` in
another under :mod:`checkpoints_tools.memwatch`, which measures the export's peak memory inside
that process: exact peak RSS (``VmHWM``) and sampled peak anonymous / file-backed RSS. Then
``import-hf`` reads the exported directory back into a new checkpoint (model plus fresh Adam
moments, 3x the model on disk) in a third child, measured the same way (``--no-import`` skips
it; ``--verify`` adds the export's logit check to the export step).

Each step is a child because the parent's ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is not a
child's own peak: Linux folds the pre-exec image's high-water mark (here, the parent that had
built and saved the 1.1B model) into the child's ``maxrss``. The first version of this bench built
in-process and so reported 8.5 GiB for an export that peaks at 0.8 GiB. ``*_child_ru_maxrss_gib``
(each child's ``wait4`` rusage) is still printed, from a parent that never held the model, as a
cross-check.

    python bench/bench_export.py --work /tmp/bench_export [--dtype bf16] [--verify] [--no-import]
"""

from __future__ import annotations

import argparse
import json
import os
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


def _measured(argv: list[str], *, report: Path) -> tuple[dict, float, float]:
    """Run ``python -m checkpoints_tools.memwatch REPORT -- ARGV`` as a child; returns its memory
    report, wall seconds and the child's own ``wait4`` ru_maxrss in GiB."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "checkpoints_tools.memwatch", str(report), "--", *argv], cwd=REPO
    )
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would also count earlier children)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen.wait
    if child.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: exit code {child.returncode}")
    seconds = time.perf_counter() - start
    return json.loads(report.read_text()), seconds, round(usage.ru_maxrss / 2**20, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_export")
    parser.add_argument("--tokenizer", default=str(REPO / "demo_out" / "tokenizer"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--verify", action="store_true", help="export with --verify")
    parser.add_argument("--no-import", action="store_true", help="skip the import-hf step")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.build_only:  # the child that builds: its memory must not reach the export's figure
        build_checkpoint(work, tokenizer=Path(args.tokenizer))
        return
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--work",
            str(work),
            "--tokenizer",
            args.tokenizer,
            "--build-only",
        ],
        check=True,
    )
    build_s = time.perf_counter() - start
    ckpt = work / "run" / "checkpoints" / "step_0"
    out = work / f"hf_{args.dtype}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["export-hf", str(ckpt), "--out", str(out), "--dtype", args.dtype]
    memory, export_s, export_maxrss = _measured(
        argv + (["--verify"] if args.verify else []), report=work / "export_memory.json"
    )
    import torch

    result = {
        "dtype": args.dtype,
        "verify": args.verify,
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
        "export_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "build_checkpoint_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "export_inside_s": memory["seconds"],
        "export_peak_rss_gib": memory["peak_rss_gib"],
        "export_peak_anon_gib": memory["peak_anon_gib"],
        "export_peak_file_gib": memory["peak_file_gib"],
        "export_start_rss_gib": memory["start_rss_gib"],
        "export_child_ru_maxrss_gib": export_maxrss,
        "torch": torch.__version__,
    }
    if not args.no_import:
        imported = work / "imported"
        shutil.rmtree(imported, ignore_errors=True)
        memory, import_s, import_maxrss = _measured(
            ["import-hf", str(out), "--out", str(imported)], report=work / "import_memory.json"
        )
        result.update(
            {
                "import_bytes": sum(p.stat().st_size for p in imported.iterdir()),
                "import_files": len(list(imported.iterdir())),
                "import_s": round(import_s, 1),
                "import_inside_s": memory["seconds"],
                "import_peak_rss_gib": memory["peak_rss_gib"],
                "import_peak_anon_gib": memory["peak_anon_gib"],
                "import_peak_file_gib": memory["peak_file_gib"],
                "import_start_rss_gib": memory["start_rss_gib"],
                "import_child_ru_maxrss_gib": import_maxrss,
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
