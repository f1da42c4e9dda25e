"""``python -m checkpoints_tools``: a thin argparse layer over :mod:`checkpoints_tools.convert`.

What to call::

    python -m checkpoints_tools inspect CKPT [--json]
    python -m checkpoints_tools export-hf CKPT --out DIR [--dtype fp32|bf16] [--tokenizer DIR]
        [--verify] [--max-shard-gb 2.0]
    python -m checkpoints_tools import-hf DIR --out CKPT [--config RUN_YAML] [key=value ...]
    python -m checkpoints_tools import-megatron DIR --out CKPT [--config RUN_YAML]
        [--tokenizer DIR] [key=value ...]
    python -m checkpoints_tools reshard CKPT --out CKPT2 [--world-size N] [parallel.key=value ...]

or ``main(argv)``, which returns the exit code. Each subcommand calls one function of
:mod:`checkpoints_tools.convert` (``inspect_checkpoint``, ``export_hf``, ``import_hf``,
``reshard``) and prints one summary line (``inspect``: text or JSON).

Exit codes: 0 success, 2 a user mistake (one line on stderr; nothing left behind).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

TRUST_NOTE = (
    "DCP checkpoints are trusted run output: their .metadata is a pickle, so open only "
    "checkpoints your own runs wrote. transformers directories are read with safetensors and "
    "JSON only (no pickle, no remote code)."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands inspect, export-hf, import-hf, import-megatron, reshard)."""
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_tools",
        description="Inspect, export, import and reshard Rosetta checkpoints. " + TRUST_NOTE,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "inspect",
        help="step, family, config, layout and tensor shapes",
        description="Read a checkpoint's metadata and config (no tensor is loaded). " + TRUST_NOTE,
    )
    p.add_argument("ckpt", help="checkpoint directory (<run_dir>/checkpoints/step_<N>)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "export-hf",
        help="checkpoint -> transformers directory",
        description="Export a checkpoint of any parallel layout to a transformers "
        "directory with safetensors shards and the tokenizer. " + TRUST_NOTE,
    )
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--out", required=True, help="directory to create (must not exist)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="saved weight dtype")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (default: the run's, the one its data.manifest records); "
        "it must be that tokenizer (same model sha256), and is used unchecked, with a "
        "warning, only when that manifest is not reachable",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the result with transformers and compare logits (tolerance 1e-4); "
        "needs memory for one fp32 model (ours, then transformers', one after the other)",
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors file")

    p = sub.add_parser(
        "import-hf",
        help="transformers directory -> checkpoint",
        description="Import a transformers directory (llama, mixtral, qwen3_moe, "
        "xlm-roberta; fused or per-expert MoE tensors, one model.safetensors or indexed "
        "shards) as a checkpoint that train.resume=<CKPT> continues, with a fresh optimizer "
        "state at step 0. Tensors are read, mapped and written one at a time: memory stays "
        "about twice the largest tensor, not the model. " + TRUST_NOTE,
    )
    p.add_argument("dir", help="transformers model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--config",
        default=None,
        help="run config whose sections other than model go into config.yaml",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of that config")

    p = sub.add_parser(
        "import-megatron",
        help="Megatron torch_dist checkpoint -> checkpoint",
        description="Import a Megatron-LM / megatron-core torch_dist checkpoint of a "
        "Llama-style GPT decoder (stacked or per-layer keys, TE or local norm names, fused "
        "QKV per query group, SwiGLU, tied or untied head) as a checkpoint that "
        "train.resume=<CKPT> continues, with a fresh optimizer state at step 0. Its DCP "
        ".metadata is unpickled with a whitelist (DCP's metadata classes, torch.Size, dtypes): "
        "any other reference is refused; common.pt is not read. model.num_heads is not stored: "
        "give it in --config or as model.num_heads=N.",
    )
    p.add_argument(
        "dir", help="Megatron run directory (latest_checkpointed_iteration.txt) or iter_N"
    )
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--config",
        default=None,
        help="run config: the model values the weights do not hold (num_heads, rope_theta, "
        "norm_eps, max_seq_len) and the other sections of config.yaml",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory whose vocabulary the padded embedding rows are trimmed to "
        "(default: the one the config's data.manifest records)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of that config")

    p = sub.add_parser(
        "reshard",
        help="offline change of parallel layout",
        description="Rewrite a checkpoint for another parallel layout: new "
        "config.yaml and per-rank loader states; DCP shards are reused. " + TRUST_NOTE,
    )
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks of the new layout (needed when parallel.dp_shard is -1)",
    )
    p.add_argument("overrides", nargs="+", help="parallel.<key>=<value> ...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    from checkpoints_tools import convert

    try:
        if args.command == "inspect":
            info = convert.inspect_checkpoint(args.ckpt)
            print(json.dumps(info, indent=2) if args.json else convert.format_inspect(info))
        elif args.command == "export-hf":
            result = convert.export_hf(
                args.ckpt,
                out=args.out,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                verify=args.verify,
                max_shard_bytes=int(args.max_shard_gb * 2**30),
            )
            line = (
                f"exported {result['architecture']} to {result['out']}: {result['shards']} "
                f"shard(s), {result['bytes'] / 2**20:.1f} MiB in {result['seconds']:.1f} s"
            )
            if "generator" in result:
                line += (
                    f" (its generator: {result['generator_architecture']} in {result['generator']})"
                )
            if "max_abs_diff" in result:
                line += f"; verified, max |logit diff| {result['max_abs_diff']:.2e}"
            print(line)
        elif args.command == "import-hf":
            result = convert.import_hf(
                args.dir, out=args.out, base_config=args.config, overrides=args.overrides
            )
            print(
                f"imported {result['family']} ({result['params']:,} params) to {result['out']}; "
                f"continue with train.resume={result['out']}"
            )
        elif args.command == "import-megatron":
            from checkpoints_tools.megatron_import import import_megatron

            result = import_megatron(
                args.dir,
                out=args.out,
                base_config=args.config,
                overrides=args.overrides,
                tokenizer=args.tokenizer,
            )
            print(
                f"imported {result['family']} ({result['params']:,} params, "
                f"{result['layout']} keys) from {result['source']} to {result['out']}; "
                f"continue with train.resume={result['out']}"
            )
        elif args.command == "reshard":
            result = convert.reshard(
                args.ckpt, out=args.out, overrides=args.overrides, world_size=args.world_size
            )
            print(
                f"resharded to {result['out']}: {result['parallel']} on "
                f"{result['world_size']} ranks"
            )
    except (ValueError, FileNotFoundError) as err:
        print(
            f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
    return 0
