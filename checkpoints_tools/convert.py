"""The conversions behind ``python -m checkpoints_tools``: inspect, export-hf, import-hf, reshard.

What to call (one process, no process group)::

    info = inspect_checkpoint(ckpt)        # metadata and config only; format_inspect(info)
    export_hf(ckpt, out=dir, dtype="fp32", tokenizer=None, verify=False)
    import_hf(hf_dir, out=ckpt, base_config=None, overrides=[...])
    reshard(ckpt, out=ckpt2, overrides=["parallel.tp=2", ...], world_size=None)

Guarantees: each returns a small dict describing what it did; the writing ones leave ``out``
complete or absent (:func:`atomic_dir`); tensors stream one at a time, so memory follows the
largest tensor, not the model (``export_hf``: about the largest tensor, one fp32 model with
``verify``; ``import_hf``: about twice the largest tensor; ``reshard`` hard-links or copies the
shards). ``verify_export`` compares transformers' logits with ours within
``VERIFY_ATOL``.

Every function that writes builds its output under a temporary name in the output's parent
(``.<name>.tmp-<pid>``) and renames it when complete, so a failure leaves nothing behind; an
output path that exists is refused. User mistakes raise ``ValueError`` with one line.

Shape legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from checkpoints_tools.adapters import adapter_for, adapter_for_hf, tensor_map
from checkpoints_tools.dcp_io import MODEL_PREFIX, Checkpoint, open_checkpoint
from checkpoints_tools.dcp_stream import save_streamed
from checkpoints_tools.safetensors_stream import (
    SafetensorsDir,
    plan_shards,
    write_index,
    write_shard,
)
from pretrain.config import RunConfig, config_to_yaml, load_config
from pretrain.models.config import ModelConfig

if TYPE_CHECKING:
    from data_pipeline.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 2 << 30
VERIFY_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------
# output handling


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; rename it to ``out`` if the block succeeds,
    delete it otherwise.

    Raises:
        ValueError: ``out`` exists, or its parent does not.
    """
    out = Path(out)
    if out.exists():
        raise ValueError(f"output {str(out)!r} exists: choose a new path")
    if not out.parent.is_dir():
        raise ValueError(f"output parent {str(out.parent)!r} does not exist")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# inspect


def family_name(cfg: ModelConfig) -> str:
    """``decoder``, ``decoder-moe``, ``encoder``, ``encoder-moe`` or ``encoder_decoder``."""
    return cfg.family + ("-moe" if cfg.moe.num_experts > 0 else "")


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, from its metadata and config only (no tensor is read).

    Returns:
        ``{"path", "step", "family", "hf_architecture" (or the reason there is none),
        "parallel", "world_size" (ranks that saved it), "model", "tensors": [{"name", "shape",
        "dtype", "bytes"}], "params", "model_bytes", "has_optimizer"}``.

    Raises:
        ValueError: an incomplete or unreadable checkpoint.
    """
    ckpt = open_checkpoint(path)
    shapes = ckpt.model_shapes()
    tensors = [
        {
            "name": k,
            "shape": list(s),
            "dtype": str(d).removeprefix("torch."),
            "bytes": s.numel() * d.itemsize,
        }
        for k, (s, d) in shapes.items()
    ]
    try:
        architecture = adapter_for(ckpt.model_cfg).hf_architecture
    except ValueError as err:
        architecture = f"none ({err})"
    from pretrain.config import config_to_dict

    full = config_to_dict(ckpt.cfg)
    return {
        "path": str(ckpt.path),
        "step": ckpt.step(),
        "family": family_name(ckpt.model_cfg),
        "hf_architecture": architecture,
        "parallel": full["parallel"],
        "world_size": len(list(ckpt.path.glob("rank_*.pt"))),
        "model": full["model"],
        "tensors": tensors,
        "params": sum(s.numel() for s, _ in shapes.values()),
        "model_bytes": sum(t["bytes"] for t in tensors),
        "has_optimizer": ckpt.has_optimizer(),
    }


def format_inspect(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`'s result."""
    lines = [
        f"checkpoint   {info['path']}",
        f"step         {info['step']}",
        f"family       {info['family']} -> {info['hf_architecture']}",
        f"parallel     {info['parallel']} (saved by {info['world_size']} ranks)",
        f"params       {info['params']:,} ({info['model_bytes'] / 2**20:.1f} MiB model, "
        f"optimizer state {'present' if info['has_optimizer'] else 'absent'})",
        "model        " + ", ".join(f"{k}={v}" for k, v in info["model"].items() if k != "moe"),
        "moe          " + ", ".join(f"{k}={v}" for k, v in info["model"]["moe"].items()),
        "tensors:",
    ]
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"]) or "scalar"
        lines.append(f"  {t['name']:<{width}}  {shape:>14}  {t['dtype']:<8} {t['bytes']:>12,} B")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _manifest_tokenizer(cfg: RunConfig) -> tuple[Path, dict[str, Any]] | str:
    """The run's manifest file and its ``"tokenizer"`` entry (``dir``, ``model_sha256``,
    ``vocab_size``, as ``data_pipeline shard`` writes it), or why there is none."""
    if not cfg.data.manifest:
        return "the checkpoint's config has no data.manifest"
    manifest = Path(cfg.data.manifest)
    manifest = manifest / "manifest.json" if manifest.is_dir() else manifest
    if not manifest.is_file():
        return f"the checkpoint's data.manifest ({cfg.data.manifest!r}) is not reachable (moved?)"
    try:
        entry = json.loads(manifest.read_text(encoding="utf-8")).get("tokenizer")
    except (OSError, ValueError, AttributeError) as err:
        return f"the checkpoint's data.manifest ({str(manifest)!r}) is unreadable ({err})"
    if not isinstance(entry, dict) or not entry.get("model_sha256"):
        return f"the checkpoint's data.manifest ({str(manifest)!r}) records no tokenizer sha256"
    return manifest, entry


def _load(directory: Path) -> Tokenizer:
    from data_pipeline.tokenizer import load_tokenizer

    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise ValueError(str(err).splitlines()[0]) from None


def run_tokenizer(
    cfg: RunConfig,
    *,
    override: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> Tokenizer:
    """The tokenizer a checkpoint's run trained on, loaded: one tokenizer per run, the one its
    ``data.manifest`` was made with (that manifest records the model's sha256). ``data.tokenizer``
    is not consulted (the trainer reads the manifest's).

    - ``override`` (``--tokenizer DIR``) is used only if its model sha256 is the manifest's;
    - without it, the tokenizer directory the manifest names (``<manifest dir>/<dir>``);
    - when the manifest is not reachable (moved, or no ``data.manifest``), ``override`` is used
      unchecked, with a warning line through ``log`` (default: stderr).

    Raises:
        ValueError: ``override``'s sha256 differs from the manifest's; the manifest's tokenizer
            directory is missing or was replaced; neither a reachable manifest nor ``override``;
            an unloadable tokenizer directory.
    """
    log = log or _stderr
    found = _manifest_tokenizer(cfg)
    if isinstance(found, str):
        if override is None:
            raise ValueError(
                f"tokenizer not found: {found}; pass --tokenizer DIR (the tokenizer the run's "
                "shards were made with)"
            )
        log(
            f"warning: {found}: exporting --tokenizer {str(override)!r} unchecked against the "
            "run's tokenizer"
        )
        return _load(Path(override))
    manifest, entry = found
    expected = str(entry["model_sha256"])
    if override is not None:
        tok = _load(Path(override))
        if tok.model_sha256 != expected:
            raise ValueError(
                f"--tokenizer ({str(override)!r}) is not the tokenizer of the checkpoint's run "
                f"(model sha256 {tok.model_sha256[:12]} != {expected[:12]}, recorded in "
                f"{str(manifest)!r}): one tokenizer per run; leave --tokenizer out to export "
                "the manifest's"
            )
        return tok
    directory = manifest.parent / str(entry.get("dir") or "tokenizer")
    if not directory.is_dir():
        raise ValueError(
            f"tokenizer not found: {str(manifest)!r} names tokenizer {str(directory)!r} (model "
            f"sha256 {expected[:12]}), which is missing; pass --tokenizer DIR with that tokenizer"
        )
    tok = _load(directory)
    if tok.model_sha256 != expected:
        raise ValueError(
            f"tokenizer {str(directory)!r} has model sha256 {tok.model_sha256[:12]} but "
            f"{str(manifest)!r} records {expected[:12]}: it was replaced after sharding; pass "
            "--tokenizer DIR with the run's tokenizer"
        )
    return tok


# ---------------------------------------------------------------------------------------------
# export


def export_items(cfg: ModelConfig) -> list[Any]:
    """The streaming export plan of ``cfg``: its adapter's own (``export_items``, the
    encoder-decoder adapters) or ``tensor_map``'s (decoder and encoder families)."""
    adapter = adapter_for(cfg)
    if hasattr(adapter, "export_items"):
        return adapter.export_items(cfg)
    return tensor_map.export_items(cfg)


def import_items(cfg: ModelConfig, hf_names: Any) -> list[Any]:
    """The streaming import plan of ``cfg`` over the stored names (as :func:`export_items`)."""
    adapter = adapter_for(cfg)
    if hasattr(adapter, "import_items"):
        return adapter.import_items(cfg, hf_names)
    return tensor_map.import_items(cfg, hf_names)


def _plan(
    ckpt: Checkpoint, dtype: torch.dtype, items: list[Any] | None = None
) -> list[tuple[Any, torch.Size]]:
    """Export items (default: the checkpoint's :func:`export_items`) with their output shapes,
    computed on the meta device."""
    shapes = ckpt.model_shapes()
    planned = []
    for item in export_items(ckpt.model_cfg) if items is None else items:
        missing = [s for s in item.sources if s not in shapes]
        if missing:
            raise ValueError(
                f"checkpoint {str(ckpt.path)!r} lacks model tensor {missing[0]!r} that its "
                "config.yaml implies: config and weights disagree"
            )
        metas = [torch.empty(shapes[s][0], dtype=dtype, device="meta") for s in item.sources]
        planned.append((item, item.combine(*metas).shape))
    return planned


def export_hf(
    path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    dtype: str = "fp32",
    tokenizer: str | os.PathLike | None = None,
    verify: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export checkpoint ``path`` (any parallel layout) to a transformers directory ``out``.

    Writes ``config.json``, ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``, ``generation_config.json`` (decoders and
    encoder-decoders) and the tokenizer (``tokenizer.json`` and its configs, see
    :mod:`checkpoints_tools.hf_tokenizer`); an ELECTRA model writes its discriminator there
    and its generator, a model of its own, to ``out/generator`` (the same files). Tensors are
    read from DCP, mapped and written one at a time: peak memory is about the largest tensor.

    Args:
        path: a complete checkpoint directory.
        out: the directory to create (must not exist).
        dtype: ``fp32`` or ``bf16`` for the saved weights.
        tokenizer: a tokenizer directory; default the run's (the one its ``data.manifest``
            records). Given, it must be that tokenizer (same model sha256); see
            :func:`run_tokenizer`.
        verify: after writing, load ``out`` with transformers and compare logits with our model
            (see :func:`verify_export`) before the directory is renamed into place.
        max_shard_bytes: the largest safetensors file (a bigger tensor gets one of its own).
        log: where a warning line goes (default stderr).

    Returns:
        ``{"out", "architecture", "shards", "bytes", "seconds", "max_abs_diff" (with verify)}``
        (ELECTRA: with ``generator`` and ``generator_architecture``; shards and bytes of both).

    Raises:
        ValueError: incomplete checkpoint, a family with no twin, a missing tokenizer or one
            the run did not use (another sha256, more pieces than ``model.vocab_size``), existing
            output, a bad dtype, or (with ``verify``) logits beyond tolerance.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype ({dtype!r}) must be one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if Path(out).exists():
        raise ValueError(f"output {str(out)!r} exists: choose a new path")
    ckpt = open_checkpoint(path)
    cfg = ckpt.model_cfg
    adapter = adapter_for(cfg)
    planned = _plan(ckpt, torch_dtype)
    tok = run_tokenizer(ckpt.cfg, override=tokenizer, log=log)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {str(tok.directory)!r} has {tok.vocab_size} pieces but model.vocab_size "
            f"is {cfg.vocab_size}: another run's tokenizer?"
        )

    note = moe_export_difference(cfg, architecture=adapter.hf_architecture)
    if note is not None:
        (log or _stderr)(note)
    upstream = _upstream_warning(cfg)
    if upstream is not None:
        if verify:  # before anything is written
            raise ValueError(_cannot_verify(upstream))
        (log or _stderr)(upstream)

    result: dict[str, Any] = {"out": str(out), "architecture": adapter.hf_architecture}
    with atomic_dir(out) as tmp:
        _, hf_config = adapter.to_hf(_meta_state(ckpt), cfg)
        hf_config.dtype = dtype_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        hf_config.bos_token_id = tok.special_ids["bos"]
        hf_config.eos_token_id = tok.special_ids["eos"]
        if hf_config.pad_token_id is None:
            hf_config.pad_token_id = tok.special_ids["pad"]
        generation: dict[str, Any] = {"pad_token_id": tok.special_ids["pad"]}
        if cfg.family == "encoder_decoder":
            # T5 family: pad (set by the adapter); mBART: eos, the target language token
            # being forced as the first generated one (mBART-50's convention)
            if hf_config.decoder_start_token_id is None:
                hf_config.decoder_start_token_id = tok.special_ids["eos"]
            generation["decoder_start_token_id"] = hf_config.decoder_start_token_id
            generation["pad_token_id"] = hf_config.pad_token_id
        hf_config.save_pretrained(str(tmp))
        if cfg.family in ("decoder", "encoder_decoder"):
            from transformers import GenerationConfig

            GenerationConfig(
                bos_token_id=tok.special_ids["bos"],
                eos_token_id=tok.special_ids["eos"],
                **generation,
            ).save_pretrained(str(tmp))
        num_shards, total = _write_weights(tmp, ckpt, planned, torch_dtype, max_shard_bytes)
        from checkpoints_tools.hf_tokenizer import save_tokenizer

        save_tokenizer(tok, tmp, family="bert" if cfg.pair_head else cfg.family)
        if hasattr(adapter, "generator_to_hf"):
            # ELECTRA: the generator is a model of its own (ElectraForMaskedLM) in generator/
            gen_dir = tmp / "generator"
            gen_dir.mkdir()
            _, gen_config = adapter.generator_to_hf(_meta_state(ckpt), cfg)
            gen_config.dtype = dtype_name
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(gen_config, key, getattr(hf_config, key))
            gen_config.save_pretrained(str(gen_dir))
            gen_plan = _plan(ckpt, torch_dtype, adapter.generator_export_items(cfg))
            gen_shards, gen_bytes = _write_weights(
                gen_dir, ckpt, gen_plan, torch_dtype, max_shard_bytes
            )
            num_shards, total = num_shards + gen_shards, total + gen_bytes
            save_tokenizer(tok, gen_dir, family=cfg.family)
            result["generator"] = str(Path(out) / "generator")
            result["generator_architecture"] = adapter.generator_architecture
        (tmp / "rosetta_export.json").write_text(
            json.dumps(
                {"checkpoint": str(Path(path).resolve()), "step": ckpt.step(), "dtype": dtype_name},
                indent=2,
            )
            + "\n"
        )
        if verify:
            result["max_abs_diff"] = verify_export(ckpt, tmp, dtype=torch_dtype)
        result.update(shards=num_shards, bytes=total)
    result["seconds"] = time.perf_counter() - start
    return result


def _write_weights(
    directory: Path,
    ckpt: Checkpoint,
    planned: list[tuple[Any, torch.Size]],
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> tuple[int, int]:
    """The planned tensors read, mapped and written one at a time into ``directory``'s
    safetensors shards and index; ``(shards, bytes)``."""
    by_name = {item.name: item for item, _ in planned}
    entries = [(item.name, shape, dtype) for item, shape in planned]
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    total = 0
    names = []

    def produce(name: str) -> torch.Tensor:
        item = by_name[name]
        sources = [ckpt.read_tensor(s) for s in item.sources]
        return item.combine(*sources).to(dtype)

    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(directory / file, shard, produce)
        names.append((file, [name for name, _, _ in shard]))
    write_index(directory, names, total_size=total)
    return len(shards), total


def hf_moe_routing(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the MoE routing the export target evaluates with: every MoE twin
    (``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``) runs dropless, so ours is evaluated
    dropless too; ``SwitchTransformersForConditionalGeneration`` is exported with an expert
    capacity of ``model.max_seq_len`` per sequence, which drops nothing up to that length, and
    ``NllbMoeForConditionalGeneration`` with an eval capacity of every token."""
    if not cfg.moe.num_experts:
        return cfg
    return replace(cfg, moe=replace(cfg.moe, dropless=True))


def moe_export_difference(cfg: ModelConfig, *, architecture: str) -> str | None:
    """One warning line naming what the export target's MoE cannot express of the training
    routing (expert capacity, Switch-type aux loss with k > 1, router jitter, random second
    expert), or None when it expresses all of it (or the model is dense)."""
    moe = cfg.moe
    if not moe.num_experts:
        return None
    lost = []
    if not moe.dropless:
        lost.append(
            f"expert capacity (model.moe.capacity_factor={moe.capacity_factor}, "
            f"eval_capacity_factor={moe.eval_capacity_factor}): it routes dropless"
        )
    if moe.aux_loss_type == "switch" and moe.top_k > 1:
        lost.append("model.moe.aux_loss_type=switch: its aux loss counts all top-k choices")
    if moe.jitter > 0:
        lost.append(f"router jitter (model.moe.jitter={moe.jitter})")
    if moe.random_second_expert:
        lost.append("model.moe.random_second_expert")
    if not lost:
        return None
    return (
        f"warning: {architecture} does not express the training MoE routing: "
        + "; ".join(lost)
        + " (--verify compares with our model routed the same way)"
    )


def _upstream_warning(cfg: ModelConfig) -> str | None:
    """The target adapter's line about a defect of the installed transformers that keeps it
    from running the export as trained (NLLB-MoE's top-2 dispatch), or None."""
    warning = getattr(adapter_for(cfg), "export_warning", None)
    return None if warning is None else warning(cfg)


def _cannot_verify(upstream: str) -> str:
    return "--verify cannot pass: " + upstream.removeprefix("warning: ") + "; export without it"


def _meta_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    # to_hf builds the transformers config; meta tensors keep it from touching any weight
    return {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in ckpt.model_shapes().items()}


def fixed_batch(cfg: ModelConfig, *, avoid: int | None) -> torch.Tensor:
    """The verification batch: 2 x min(16, max_seq_len) seeded random ids (``avoid`` replaced:
    XLM-R derives positions from which tokens are padding)."""
    gen = torch.Generator().manual_seed(1234)
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, min(16, cfg.max_seq_len)), generator=gen)
    if avoid is not None:
        tokens_BT[tokens_BT == avoid] = (avoid + 1) % cfg.vocab_size
    return tokens_BT


def verify_export(ckpt: Checkpoint, out: str | os.PathLike, *, dtype: torch.dtype) -> float:
    """Load ``out`` with transformers (fp32) and compare its logits with our model's on
    :func:`fixed_batch`; our weights are rounded to ``dtype`` first, so a bf16 export is
    compared exactly too. ELECTRA: the discriminator's logits with ``out``'s
    ``ElectraForPreTraining``, the generator's with ``out/generator``'s ``ElectraForMaskedLM``.
    MoE layers route as the target does (:func:`hf_moe_routing`: dropless, as transformers runs
    Mixtral and Qwen3-MoE), whatever the training capacity.

    Memory: one model at a time, not both. Ours is built on the meta device and takes the
    tensors as read (``assign``, no second copy); its logits are kept and it is freed before
    transformers loads ``out``. So the peak is about one fp32 model (plus transformers' own
    loading overhead), where holding both took about 3x.

    Returns:
        The largest absolute logit difference.

    Raises:
        ValueError: the difference exceeds ``VERIFY_ATOL`` (1e-4), or the installed
            transformers cannot run the export as trained (``_upstream_warning``).
    """
    import gc

    import transformers

    from pretrain.models import build_model

    cfg = hf_moe_routing(ckpt.model_cfg)
    upstream = _upstream_warning(cfg)
    if upstream is not None:
        raise ValueError(_cannot_verify(upstream))
    hf_config = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    # XLM-R and NLLB-MoE derive positions from which tokens are padding
    skips_padding = cfg.family == "encoder" or cfg.position == "sinusoidal"
    avoid = hf_config.get("pad_token_id") if skips_padding else None
    tokens_BT = fixed_batch(cfg, avoid=avoid)
    with torch.device("meta"):
        model = build_model(cfg)
    state = {k: ckpt.read_tensor(k).to(dtype).float() for k in ckpt.model_shapes_cache()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.eval()
    # encoder-decoders: the batch is the source, its reverse the decoder input
    inputs: dict[str, torch.Tensor] = {"input_ids": tokens_BT}
    if cfg.family == "encoder_decoder":
        inputs["decoder_input_ids"] = tokens_BT.flip(1)
    ours_B2 = ours_disc_BT = None
    with torch.no_grad():
        if cfg.pair_head:  # BertForPreTraining: the pair logits are verified too
            ours_BTV, ours_B2 = model(tokens_BT, return_pair_logits=True)
        else:
            ours_BTV = model(*inputs.values())
        if cfg.generator_fraction:  # ELECTRA: the discriminator here, the generator's logits
            ours_disc_BT = model(tokens_BT, return_discriminator=True).float()
        ours_BTV = ours_BTV.float()
    del model
    gc.collect()
    adapter = adapter_for(cfg)
    if ours_disc_BT is not None:
        return max(
            _hf_diff(adapter.hf_architecture, out, inputs, ours_disc_BT),
            _hf_diff(adapter.generator_architecture, Path(out) / "generator", inputs, ours_BTV),
        )
    cls = getattr(transformers, adapter.hf_architecture)
    # eager attention: SDPA's T5 kernels differ from eager by a few 1e-6 already
    extra = {"attn_implementation": "eager"} if cfg.family == "encoder_decoder" else {}
    hf_model = cls.from_pretrained(str(out), dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        theirs = hf_model(**inputs)
    del hf_model
    gc.collect()
    if ours_B2 is not None:
        theirs_BTV = theirs.prediction_logits.float()
        diff = float((ours_B2.float() - theirs.seq_relationship_logits.float()).abs().max())
    else:
        theirs_BTV, diff = theirs.logits.float(), 0.0
    diff = max(diff, float((ours_BTV - theirs_BTV).abs().max()))
    _check_diff(out, diff)
    return diff


def _check_diff(out: str | os.PathLike, diff: float) -> None:
    if not diff <= VERIFY_ATOL:
        raise ValueError(
            f"--verify: logits of {str(out)!r} differ from the checkpoint's by {diff:.3g} "
            f"(tolerance {VERIFY_ATOL})"
        )


def _hf_diff(
    architecture: str, directory: str | os.PathLike, inputs: dict[str, torch.Tensor], ours
) -> float:
    """The largest difference of ``architecture`` loaded from ``directory`` (fp32) from our
    logits ``ours`` on ``inputs``; past ``VERIFY_ATOL`` a ValueError."""
    import gc

    import transformers

    hf_model = getattr(transformers, architecture).from_pretrained(
        str(directory), dtype=torch.float32
    )
    with torch.no_grad():
        theirs = hf_model.eval()(**inputs).logits.float()
    del hf_model
    gc.collect()
    diff = float((ours - theirs).abs().max())
    _check_diff(directory, diff)
    return diff


# ---------------------------------------------------------------------------------------------
# import


def open_hf_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], SafetensorsDir]:
    """``config.json`` (as a dict) and the safetensors weights of a transformers directory, read
    with JSON and safetensors only (no pickle, no remote code); no tensor is read yet.

    Raises:
        ValueError: no config.json, one that is not a JSON object with a model_type, a
            model_type we do not import, or no (or malformed) safetensors weights.
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"transformers directory {str(directory)!r} has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{str(config_file)!r} must be a JSON object with a model_type string")
    adapter_for_hf(config)  # an unsupported family is named before any weight is looked for
    return config, SafetensorsDir(directory)


def model_config_from_hf(hf_config: dict[str, Any], *, directory: str | os.PathLike) -> ModelConfig:
    """Our ``ModelConfig`` of a ``config.json`` dict of a supported family.

    Raises:
        ValueError: a variant we do not import, or a field of the wrong type or missing.
    """
    try:
        return adapter_for_hf(hf_config).config_from_hf(hf_config)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - config.json is untrusted input
        # transformers' config classes reject a wrong field with assorted error types
        # (TypeError, huggingface_hub's StrictDataclassFieldValidationError, ...)
        detail = " ".join(str(err).split())[:300]  # one line, however the error is laid out
        raise ValueError(
            f"transformers directory {str(directory)!r}: config.json is not a valid "
            f"{hf_config['model_type']} config ({type(err).__name__}: {detail})"
        ) from None


def import_hf(
    directory: str | os.PathLike,
    *,
    out: str | os.PathLike,
    base_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """A transformers directory of a supported family -> our checkpoint at ``out``.

    ``out`` holds DCP shards of ``{"train": {"model", "optim", "step": 0, "scheduler"}}`` with a
    fresh optimizer state (zero moments, built from the config's ``optim`` section) and a
    ``config.yaml``: ``base_config`` (a run config; default: the built-in defaults) with the
    imported ``model`` section and ``overrides`` applied. No ``rank_*.pt``: there is no data
    loader state to continue, the resumed run starts its data from the beginning.

    Streams: the model and optimizer are built on the meta device (structure only), and each
    tensor is read from the safetensors files, mapped (:func:`import_items`: renames, an MoE
    layer's experts stacked) and written by DCP one at a time (:mod:`checkpoints_tools.dcp_stream`),
    so memory stays about twice the largest tensor whatever the model size.

    Raises:
        ValueError: an unsupported model_type or variant, missing files, weights that do not
            match their config.json, existing output.
    """
    from pretrain.checkpoint import TrainState
    from pretrain.config import config_to_dict
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, build_scheduler

    if Path(out).exists():
        raise ValueError(f"output {str(out)!r} exists: choose a new path")
    hf_config, weights = open_hf_dir(directory)
    model_cfg = model_config_from_hf(hf_config, directory=directory)
    run_cfg = load_config(base_config or None, list(overrides or []))
    run_cfg = replace(run_cfg, model=model_cfg)
    # A round trip through YAML validates the assembled config like any run config.
    run_cfg = _reload(config_to_yaml(run_cfg))
    items = {item.name: item for item in import_items(run_cfg.model, weights.names())}
    with torch.device("meta"):
        model = build_model(run_cfg.model)
    _check_import_plan(items, model.state_dict(), weights, directory=directory)
    # On the meta device the optimizer's state comes out as the trainer saves a fresh one:
    # moments as meta tensors (written as zeros below), step counters and groups as values.
    optimizer = build_optimizer(model, run_cfg.optim, device_type="cpu")
    scheduler = build_scheduler(optimizer, run_cfg.optim, total_steps=run_cfg.train.steps)
    state = {"train": TrainState(model, optimizer, scheduler, step=0).state_dict()}

    def produce(key: str, meta: torch.Tensor) -> torch.Tensor:
        if not key.startswith(MODEL_PREFIX):
            return torch.zeros(meta.shape, dtype=meta.dtype)  # Adam's moments before any step
        item = items[key[len(MODEL_PREFIX) :]]
        sources = [weights.read(name) for name in item.sources]
        return item.combine(*sources).to(meta.dtype)

    with atomic_dir(out) as tmp:
        (tmp / "config.yaml").write_text(config_to_yaml(run_cfg), encoding="utf-8")
        save_streamed(state, path=tmp, produce=produce)
    return {
        "out": str(out),
        "family": family_name(model_cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "model": config_to_dict(run_cfg)["model"],
    }


def _check_import_plan(
    items: dict[str, Any],
    expected: dict[str, torch.Tensor],
    weights: SafetensorsDir,
    *,
    directory: str | os.PathLike,
) -> None:
    """Every tensor of our model planned once, with the model's shape (worked out on the meta
    device from the stored shapes).

    Raises:
        ValueError: a missing or extra tensor, or a shape the config does not imply.
    """
    missing = sorted(set(expected) - set(items))
    unexpected = sorted(set(items) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"transformers directory {str(directory)!r}: weights do not match the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, item in items.items():
        metas = [torch.empty(weights.shape(s), device="meta") for s in item.sources]
        try:
            shape = item.combine(*metas).shape
        except RuntimeError:  # pieces that do not stack or split
            shape = None
        if shape != expected[name].shape:
            stored = ", ".join(f"{s} {tuple(weights.shape(s))}" for s in item.sources[:2])
            raise ValueError(
                f"transformers directory {str(directory)!r}: {stored} do not give our "
                f"{name!r} of shape {tuple(expected[name].shape)} that config.json implies"
            )


def _reload(text: str) -> RunConfig:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


# ---------------------------------------------------------------------------------------------
# reshard


def mesh_dp_rank(rank: int, degrees: dict[str, int]) -> int:
    """The loader's data-parallel rank of global ``rank``, as ``ParallelDims.build_mesh``
    lays ranks out: row-major over (pp, dp_replicate, dp_shard / ep, ep, tp), dp being the
    flattened (dp_replicate, dp_shard / ep, ep) coordinate."""
    # the dp axes are adjacent and just above tp in that order, so they flatten to this
    dp = degrees["dp_replicate"] * degrees["dp_shard"]
    return (rank // degrees["tp"]) % dp


def reshard(
    path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    overrides: list[str],
    world_size: int | None = None,
) -> dict[str, Any]:
    """Offline change of a checkpoint's parallel layout.

    DCP stores global tensors, so the shards are kept as they are (hard links where the
    filesystem allows, else copies). What changes: ``config.yaml`` gets the new ``parallel.*``
    values (validated for the new world size), and the per-rank loader states are re-dealt for
    the new data-parallel layout: every new rank gets ``rank_<r>.pt`` whose loader state is what
    the loader's resume computes for that rank's dp coordinate from one state per old dp rank
    (``pretrain.data.loader_resume_state``: the old state itself when the dp layout is
    unchanged, else the elastic re-dealing), with that coordinate and old rank 0's RNG state.
    The trainer then takes the exact-resume path. An
    imported checkpoint (``import-hf``: weights only, no rank states) gets the new config only.

    Args:
        overrides: ``parallel.<key>=<value>`` strings (nothing else may change).
        world_size: ranks of the new layout; needed when ``parallel.dp_shard`` is -1.

    Raises:
        ValueError: an override outside ``parallel.*``, a layout invalid for the model or the
            world size, an incomplete checkpoint, an existing output.
    """
    from pretrain.config import validate_config
    from pretrain.data import build_train_loader, loader_rank_state, loader_resume_state

    for item in overrides:
        if not item.startswith("parallel.") or "=" not in item:
            raise ValueError(f"reshard override ({item!r}) must be parallel.<key>=<value>")
    if Path(out).exists():
        raise ValueError(f"output {str(out)!r} exists: choose a new path")
    ckpt = open_checkpoint(path)
    new_cfg = load_config(ckpt.path / "config.yaml", list(overrides))
    if world_size is None:
        if new_cfg.parallel.dp_shard == -1:
            raise ValueError(
                "parallel.dp_shard (-1) resolves against the world size: pass --world-size N "
                "or set parallel.dp_shard"
            )
        p = new_cfg.parallel
        world_size = p.pp * p.dp_replicate * p.dp_shard * p.tp
    degrees = validate_config(new_cfg, world_size=world_size)
    old_states = {
        int(f.stem.split("_")[1]): torch.load(f, map_location="cpu", weights_only=True)
        for f in sorted(ckpt.path.glob("rank_*.pt"))
    }
    # An imported checkpoint (import-hf) has weights only: no rank states to re-deal, and the
    # trainer starts its data from the beginning whatever the layout.
    # One loader state per old dp rank (tp/pp/ep peers saved the same one); the loader keeps
    # it as it is when the dp layout is unchanged, else re-deals them (elastic).
    dp_world = degrees["dp_replicate"] * degrees["dp_shard"]
    workers = new_cfg.data.num_workers
    loaders: dict[int, dict] = {}
    for dp_rank in range(dp_world if old_states else 0):
        loader = build_train_loader(new_cfg, dp_rank=dp_rank, dp_world_size=dp_world)
        loader.load_state_dict(
            loader_resume_state(
                old_states, dp_rank=dp_rank, dp_world_size=dp_world, num_workers=workers
            )
        )
        loaders[dp_rank] = loader_rank_state(
            loader, dp_rank=dp_rank, dp_world_size=dp_world, num_workers=workers
        )
    with atomic_dir(out) as tmp:
        for file in ckpt.path.iterdir():
            if file.name == "config.yaml" or file.name.startswith("rank_"):
                continue
            try:
                os.link(file, tmp / file.name)
            except OSError:
                shutil.copy2(file, tmp / file.name)
        (tmp / "config.yaml").write_text(config_to_yaml(new_cfg), encoding="utf-8")
        rng = old_states[min(old_states)]["rng"] if old_states else None
        for rank in range(world_size if old_states else 0):
            state = {"rng": rng, **loaders[mesh_dp_rank(rank, degrees)]}
            torch.save(state, tmp / f"rank_{rank}.pt")
    return {"out": str(out), "world_size": world_size, "parallel": degrees}
