"""Small builders shared by the checkpoint-tool tests: a tokenizer on every sample language, a
small shard directory made with it (the manifest that fixes a run's tokenizer) and tiny
checkpoints of each family saved in-process (no trainer, no process group).

What to call::

    tok_dir = make_tokenizer(tmp_path)                 # model_type="unigram" by default
    cfg = family_config(family, tokenizer=tok_dir, run_dir=tmp_path / "run")  # FAMILIES
    ckpt = save_family_checkpoint(cfg, step=5, seed=0) # every parameter perturbed

``shards_for(tokenizer)`` is the shard directory ``family_config`` trains on (made on the first
call; its manifest records the tokenizer's ``model_sha256`` as a run's does);
``sample_languages()`` / ``sample_lines(lang, split="valid", count=100)`` read the bundled
samples. ``save_family_checkpoint(..., optimizer_state=False)`` saves a stateless SGD instead
(checkpoint = model size).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MONO = REPO / "data_pipeline" / "sample" / "mono"
VOCAB = 2500

FAMILIES = {
    # name: (preset, overrides that make it tiny and exportable)
    "decoder": ("tiny_decoder.yaml", ()),
    "moe": ("tiny_moe.yaml", ("model.moe.dropless=true",)),
    "switch": (
        "tiny_moe.yaml",
        (
            "model.moe.router=switch",
            "model.moe.top_k=1",
            "model.moe.every=2",
            "model.qk_norm=true",
            "model.moe.dropless=true",
        ),
    ),
    "encoder": ("tiny_encoder.yaml", ()),
    # NSP / SOP pre-training: segment embeddings and the pair head (BertForPreTraining)
    "bert": ("tiny_encoder.yaml", ("model.type_vocab_size=2", "model.pair_head=true")),
    # ELECTRA: discriminator + generator (ElectraForPreTraining, ElectraForMaskedLM; export only)
    "electra": ("tiny_electra.yaml", ()),
}
IMPORTED = tuple(family for family in FAMILIES if family != "electra")
"""The families an export of which imports back (ELECTRA's is export only)."""


def sample_languages() -> list[str]:
    """Every language with a ``*.valid.txt.zst`` sample."""
    return sorted(p.name.split(".")[0] for p in SAMPLE_MONO.glob("*.valid.txt.zst"))


def sample_lines(lang: str, *, split: str = "valid", count: int = 100) -> list[str]:
    """The first ``count`` lines of a sample file (newlines stripped)."""
    import zstandard

    with open(SAMPLE_MONO / f"{lang}.{split}.txt.zst", "rb") as handle:
        text = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(handle), "utf-8")
        return [line.rstrip("\n") for _, line in zip(range(count), text)]


def make_tokenizer(root: Path, *, model_type: str = "unigram") -> Path:
    """A small tokenizer trained on every sample language (rare characters fall back to bytes
    ); returns its directory."""
    from data_pipeline.text_inputs import MonoInput
    from data_pipeline.tokenizer import train_tokenizer

    inputs = []
    for lang in sample_languages():
        path = root / f"{lang}.txt"
        path.write_text("\n".join(sample_lines(lang, split="train", count=150)) + "\n")
        inputs.append(MonoInput(lang, (path,)))
    out = root / f"tok_{model_type}"
    train_tokenizer(
        inputs,
        vocab_size=VOCAB,
        out=out,
        model_type=model_type,
        character_coverage=0.9995,
        seed=0,
        num_threads=1,
    )
    return out


def shards_for(tokenizer: Path) -> Path:
    """``<tokenizer>_shards``: a few English documents sharded with ``tokenizer`` (made on the
    first call), whose manifest records that tokenizer's ``model_sha256`` as a run's does."""
    from data_pipeline.shard import run_shard_job
    from data_pipeline.text_inputs import MonoInput

    out = tokenizer.parent / f"{tokenizer.name}_shards"
    if not (out / "manifest.json").is_file():
        text = tokenizer.parent / f"{tokenizer.name}_shards.en.txt"
        text.write_text("\n".join(sample_lines("en", count=20)) + "\n", encoding="utf-8")
        run_shard_job(
            [MonoInput("en", (text,))], tokenizer=tokenizer, out=out, workers=1, log=lambda _: None
        )
    return out


def family_config(family: str, *, tokenizer: Path, run_dir: Path, extra: tuple[str, ...] = ()):
    """The tiny run config of ``family`` (see ``FAMILIES``) with a 32-wide model, trained (as
    its ``data.manifest`` says) on :func:`shards_for` ``tokenizer``."""
    from pretrain.config import load_config

    preset, overrides = FAMILIES[family]
    return load_config(
        REPO / "configs" / preset,
        [
            f"model.vocab_size={VOCAB}",
            "model.hidden_size=32",
            "model.num_heads=4",
            "model.ffn_hidden_size=64",
            "model.max_seq_len=64",
            f"data.manifest={shards_for(tokenizer)}",
            "data.valid_manifest=",
            f"train.run_dir={run_dir}",
            *overrides,
            *extra,
        ],
    )


def encdec_config(
    preset: str = "tiny_encdec.yaml",
    *,
    tokenizer: Path,
    run_dir: Path,
    max_seq_len: int = 64,
    extra: tuple[str, ...] = (),
):
    """The run config of the encoder-decoder ``preset`` (``configs/<preset>``) made tiny (width
    32, FFN 48, head dim 8), trained (as its ``data.manifest`` says) on :func:`shards_for`
    ``tokenizer``."""
    from pretrain.config import load_config

    return load_config(
        REPO / "configs" / preset,
        [
            f"model.vocab_size={VOCAB}",
            "model.hidden_size=32",
            "model.ffn_hidden_size=48",
            "model.head_dim=8",
            f"model.max_seq_len={max_seq_len}",
            f"data.manifest={shards_for(tokenizer)}",
            f"train.run_dir={run_dir}",
            *extra,
        ],
    )


def save_family_checkpoint(
    cfg, *, step: int = 5, seed: int = 0, optimizer_state: bool = True
) -> Path:
    """Save a randomised model of ``cfg`` (every parameter perturbed, so a wrong mapping shows)
    with optimizer and scheduler as the trainer does; returns the checkpoint directory.

    ``optimizer_state=False`` saves a stateless SGD instead (checkpoint = model size: the memory
    test wants a large model without paying for Adam's two moments on disk)."""
    from pretrain.checkpoint import CheckpointManager, TrainState
    from pretrain.config import config_to_yaml
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, build_scheduler

    model = build_model(cfg.model)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    if optimizer_state:
        optimizer = build_optimizer(model, cfg.optim, device_type="cpu")
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    manager = CheckpointManager(cfg.train.run_dir, keep=1)
    manager.save(
        step,
        TrainState(model, optimizer, scheduler, step=step),
        rank_state={},
        config_yaml=config_to_yaml(cfg),
    )
    return Path(cfg.train.run_dir) / "checkpoints" / f"step_{step}"
