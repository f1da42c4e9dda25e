"""Importing a Megatron ``torch_dist`` checkpoint of a Llama-style decoder as our checkpoint.

What to call (one process, no process group, no megatron import)::

    import_megatron(run_or_iter_dir, out=ckpt, base_config=None, overrides=[...], tokenizer=None)
    mcp = open_megatron(run_or_iter_dir)   # MegatronCheckpoint: shapes, read(fqn, layer=None)
    metadata = read_dcp_metadata(iter_dir) # the DCP .metadata, unpickled with a whitelist

Guarantees: ``out`` is a checkpoint like ``import-hf`` writes (DCP shards of
``{"train": {"model", "optim", "step": 0, "scheduler"}}`` with a fresh optimizer state and a
``config.yaml``), which ``train.resume=<out>``, ``inspect`` and ``export-hf`` read; it is complete
or absent. Weights are only sliced, split and renamed, never changed (up to the cast to our
parameter dtype). Tensors stream one at a time: a stacked tensor is read one layer at a time, so
memory is about the largest stored chunk (Megatron stores each layer as its own) plus two tensors.
User mistakes and files we refuse raise ``ValueError`` with one line.

Safety: DCP's ``.metadata`` is a pickle and torch's ``FileSystemReader`` unpickles it without
restriction. A checkpoint from elsewhere is read here by :func:`read_dcp_metadata`, whose unpickler
admits only DCP's metadata classes, ``torch.Size``, dtypes, layouts and memory formats (and the
``pathlib`` path DCP records as the checkpoint id); any other global is refused before anything
is built. Tensor data is then read by DCP itself, which loads each stored chunk with
``torch.load(weights_only=True)``. ``common.pt`` (Megatron's pickled arguments) is never opened.

Layout read (megatron-core's GPT model, keys without a ``model.`` prefix, which is accepted too):

    embedding.word_embeddings.weight        [Vp, D]   padded vocabulary: rows past V dropped
    decoder.layers[.{i}].self_attention.linear_qkv.weight   [G * (H/G + 2) * Hd, D]
        fused per query group g: rows (g, [H/G query heads, 1 key head, 1 value head] x Hd)
    decoder.layers[.{i}].self_attention.linear_proj.weight  [D, H * Hd]    -> wo
    decoder.layers[.{i}].mlp.linear_fc1.weight              [2F, D] = [gate; up] -> w1, w3
    decoder.layers[.{i}].mlp.linear_fc2.weight              [D, F]         -> w2
    norms: TE spec ``self_attention.linear_qkv.layer_norm_weight`` /
        ``mlp.linear_fc1.layer_norm_weight``, local spec ``input_layernorm.weight`` /
        ``pre_mlp_layernorm.weight``; ``decoder.final_layernorm.weight``
    output_layer.weight                     [Vp, D]   absent when the head is tied

``decoder.layers.X`` (a dense model, saved stacked) carries a leading layer axis; MoE or mixed
models save ``decoder.layers.{i}.X``; both are read. ``*._extra_state`` (TE's fp8 metadata),
byte objects and ``optimizer.*`` / ``rng_state`` entries are skipped; any other stored tensor
(biases, MoE experts, q/k norms, LayerNorm biases) has no place in our Llama-shaped decoder and is
refused by name. RMSNorm is taken from the absence of norm biases; RoPE is megatron's default
half-split rotation, which ours is.

What the weights do not say comes from the run config (``base_config`` and ``overrides``):
``model.num_heads`` is required (from the config file or an override); ``rope_theta``,
``norm_eps``, ``max_seq_len`` keep the config's values (defaults 10000, 1e-5: megatron's too).
``hidden_size``, ``num_layers``, ``ffn_hidden_size``, ``num_kv_heads``, ``head_dim`` and
``tie_embeddings`` come from the shapes; a value the user set that disagrees is refused.
``vocab_size``: the tokenizer's (``tokenizer``, else the one the config's ``data.manifest``
records), else the config file's ``model.vocab_size``, else the stored rows.

Shape legend: V vocabulary, Vp padded vocabulary, D model width, H query heads, G query groups
(key/value heads), Hd head width, F feed-forward width, L layers.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import (
    _create_chunk_from_tensor,
    create_read_items_for_chunk_list,
)

from pretrain.models.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# restricted reading of DCP's .metadata

_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # DCP pickles a layout as _get_layout("torch.strided"), a table lookup
    "torch.serialization": {"_get_layout"},
    # StorageMeta.checkpoint_id is the path the writer was given
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a DCP ``.metadata`` file needs."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if name == "Size" or isinstance(
                value, torch.dtype | torch.layout | torch.memory_format
            ):
                return value
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_dcp_metadata(directory: str | os.PathLike) -> Metadata:
    """The DCP ``Metadata`` of ``directory/.metadata``, unpickled with a whitelist (module
    docstring): nothing but DCP's metadata classes, ``torch.Size``, dtypes, layouts, memory
    formats and ``pathlib`` paths is resolved, so no other code runs.

    Raises:
        ValueError: no ``.metadata``, a global outside the whitelist (named), or a file that is
            not a DCP metadata pickle.
    """
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise ValueError(f"{str(Path(directory))!r} has no .metadata: not a DCP checkpoint")
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{str(path)!r} refers to {err}, which a DCP metadata file never holds: refusing to "
            "unpickle it (only DCP's metadata classes, torch.Size and dtypes are admitted)"
        ) from None
    except Exception as err:  # noqa: BLE001 - a file from elsewhere: any failure is "not DCP"
        raise ValueError(
            f"{str(path)!r} is not a DCP metadata file ({type(err).__name__})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{str(path)!r} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


# ---------------------------------------------------------------------------------------------
# the Megatron checkpoint


class _PreparsedReader(FileSystemReader):
    """``FileSystemReader`` that hands DCP the metadata read by :func:`read_dcp_metadata`
    (its own ``read_metadata`` would unpickle ``.metadata`` unrestricted)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


class _SlicePlanner(DefaultLoadPlanner):
    """Load planner that reads, for each fqn in ``rows``, only rows ``[start, start + n)`` of
    dim 0 of the stored tensor into a target of that slice's shape."""

    def __init__(self, rows: dict[str, int]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._rows = rows

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, target in self.state_dict.items():
            stored = self.metadata.state_dict_metadata[fqn]
            chunk = _create_chunk_from_tensor(target)
            if fqn in self._rows:
                offsets = torch.Size([self._rows[fqn], *[0] * (target.dim() - 1)])
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=target.shape)
            items += create_read_items_for_chunk_list(fqn, stored, [chunk])
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # the target is the slice itself: DCP's lookup would look for a shard at that offset
        return self.state_dict[index.fqn]


_SKIPPED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")
_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


@dataclass
class MegatronCheckpoint:
    """An opened ``iter_NNNNNNN`` directory.

    Attributes:
        path: the iteration directory.
        metadata: DCP's metadata, read with the restricted unpickler.
        shapes: model tensor key (``model.`` prefix removed) -> (global shape, dtype); skipped
            entries (module docstring) are not in it.
        prefix: ``""`` or ``"model."``, as stored.
    """

    path: Path
    metadata: Metadata
    shapes: dict[str, tuple[torch.Size, torch.dtype]]
    prefix: str

    def read(self, key: str, *, layer: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (global shape), or only row ``layer`` of its leading axis (a stacked
        layer tensor), without that axis; read by DCP, no process group.

        Raises:
            KeyError: no model tensor ``key``.
        """
        shape, dtype = self.shapes[key]
        fqn = self.prefix + key
        rows = {} if layer is None else {fqn: layer}
        target = torch.empty((1, *shape[1:]) if layer is not None else shape, dtype=dtype)
        with warnings.catch_warnings():
            # without a process group DCP loads in this process and warns that it does so
            warnings.simplefilter("ignore")
            dcp.load(
                {fqn: target},
                storage_reader=_PreparsedReader(self.path, self.metadata),
                planner=_SlicePlanner(rows),
                no_dist=True,
            )
        return target[0] if layer is not None else target


def iteration_dir(directory: str | os.PathLike) -> Path:
    """The checkpoint directory of a Megatron run directory (the iteration its
    ``latest_checkpointed_iteration.txt`` names: ``iter_NNNNNNN`` or ``release``), or
    ``directory`` itself when it is an iteration directory.

    Raises:
        ValueError: neither, or a tracker file naming a missing directory.
    """
    directory = Path(directory)
    tracker = directory / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8").strip()
        if text == "release":
            found = directory / "release"
        elif text.isdigit():
            found = directory / f"iter_{int(text):07d}"
        else:
            raise ValueError(
                f"{str(tracker)!r} must hold an iteration number or 'release' (got {text[:40]!r})"
            )
        if not found.is_dir():
            raise ValueError(f"{str(tracker)!r} names {str(found)!r}, which does not exist")
        return found
    if (directory / ".metadata").is_file() or (directory / "metadata.json").is_file():
        return directory
    raise ValueError(
        f"{str(directory)!r} is neither a Megatron run directory (latest_checkpointed_iteration"
        ".txt) nor an iteration directory (iter_NNNNNNN with metadata.json and .metadata)"
    )


def open_megatron(directory: str | os.PathLike) -> MegatronCheckpoint:
    """Open a Megatron ``torch_dist`` checkpoint (run or iteration directory) from metadata only.

    Raises:
        ValueError: not such a directory, ``metadata.json`` missing or naming another backend
            than ``torch_dist``, a refused or malformed ``.metadata``, no model tensors.
    """
    path = iteration_dir(directory)
    meta_json = path / "metadata.json"
    if not meta_json.is_file():
        raise ValueError(
            f"{str(path)!r} has no metadata.json: not a Megatron distributed checkpoint"
        )
    try:
        backend = json.loads(meta_json.read_text(encoding="utf-8")).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{str(meta_json)!r} is not a JSON object ({err})") from None
    if backend != "torch_dist":
        raise ValueError(
            f"{str(meta_json)!r}: sharded_backend ({backend!r}) must be 'torch_dist' to import"
        )
    metadata = read_dcp_metadata(path)
    entries = metadata.state_dict_metadata
    prefix = "model." if "model.embedding.word_embeddings.weight" in entries else ""
    shapes = {}
    for fqn, meta in entries.items():
        # TE's _extra_state is a tensor or, under a "/shard_..." key, a byte object
        if isinstance(meta, BytesStorageMetadata) or "._extra_state" in fqn:
            continue
        if fqn.startswith(_SKIPPED_PREFIXES) or not isinstance(meta, TensorStorageMetadata):
            continue
        shapes[fqn.removeprefix(prefix)] = (meta.size, meta.properties.dtype)
    if "embedding.word_embeddings.weight" not in shapes:
        raise ValueError(
            f"{str(path)!r} holds no embedding.word_embeddings.weight: not a Megatron GPT model"
        )
    return MegatronCheckpoint(path=path, metadata=metadata, shapes=shapes, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# the plan: our tensor <- (stored key, layer row, transform)


@dataclass(frozen=True)
class MegatronItem:
    """One of our tensors: ``combine(read(source, layer=layer))``."""

    name: str
    source: str
    layer: int | None
    combine: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    stacked: bool
    num_layers: int


def _layout(mcp: MegatronCheckpoint) -> _Layout:
    per_layer = {int(m.group(1)) for k in mcp.shapes if (m := _LAYER_KEY.fullmatch(k))}
    stacked_qkv = mcp.shapes.get("decoder.layers.self_attention.linear_qkv.weight")
    if stacked_qkv is not None and per_layer:
        raise ValueError(
            f"{str(mcp.path)!r} mixes stacked (decoder.layers.X) and per-layer "
            "(decoder.layers.{i}.X) keys"
        )
    if stacked_qkv is not None:
        return _Layout(stacked=True, num_layers=int(stacked_qkv[0][0]))
    if not per_layer:
        raise ValueError(
            f"{str(mcp.path)!r} holds no decoder.layers.*.self_attention.linear_qkv.weight"
        )
    num_layers = max(per_layer) + 1
    missing = sorted(set(range(num_layers)) - per_layer)
    if missing:
        raise ValueError(f"{str(mcp.path)!r} lacks decoder layer {missing[0]} of {num_layers}")
    return _Layout(stacked=False, num_layers=num_layers)


def _layer_key(layout: _Layout, layer: int, suffix: str) -> tuple[str, int | None]:
    if layout.stacked:
        return f"decoder.layers.{suffix}", layer
    return f"decoder.layers.{layer}.{suffix}", None


def _layer_shape(mcp: MegatronCheckpoint, layout: _Layout, suffix: str) -> torch.Size:
    key, _ = _layer_key(layout, 0, suffix)
    if key not in mcp.shapes:
        raise ValueError(f"{str(mcp.path)!r} lacks tensor {key!r}")
    shape = mcp.shapes[key][0]
    return shape[1:] if layout.stacked else shape


def _pick_norm(mcp: MegatronCheckpoint, layout: _Layout, te: str, local: str) -> str:
    for suffix in (te, local):
        if _layer_key(layout, 0, suffix)[0] in mcp.shapes:
            return suffix
    raise ValueError(
        f"{str(mcp.path)!r} lacks {_layer_key(layout, 0, te)[0]!r} (TE spec) and "
        f"{_layer_key(layout, 0, local)[0]!r} (local spec)"
    )


@dataclass(frozen=True)
class MegatronShape:
    """What the stored shapes say about the model."""

    padded_vocab: int
    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    qkv_rows: int
    proj_width: int
    tied: bool
    stacked: bool


def megatron_shape(mcp: MegatronCheckpoint) -> MegatronShape:
    """The model dimensions the stored shapes give (no tensor is read).

    Raises:
        ValueError: a missing tensor, or a feed-forward that is not SwiGLU.
    """
    layout = _layout(mcp)
    vocab, hidden = mcp.shapes["embedding.word_embeddings.weight"][0]
    qkv_rows = _layer_shape(mcp, layout, "self_attention.linear_qkv.weight")[0]
    proj_width = _layer_shape(mcp, layout, "self_attention.linear_proj.weight")[1]
    fc1_rows = _layer_shape(mcp, layout, "mlp.linear_fc1.weight")[0]
    ffn = _layer_shape(mcp, layout, "mlp.linear_fc2.weight")[1]
    if fc1_rows != 2 * ffn:
        key = _layer_key(layout, 0, "mlp.linear_fc1.weight")[0]
        raise ValueError(
            f"{key!r} has {fc1_rows} rows, not 2 x linear_fc2's {ffn}: only SwiGLU feed-forwards "
            "(Llama-style, [gate; up]) import"
        )
    return MegatronShape(
        padded_vocab=int(vocab),
        hidden_size=int(hidden),
        num_layers=layout.num_layers,
        ffn_hidden_size=int(ffn),
        qkv_rows=int(qkv_rows),
        proj_width=int(proj_width),
        tied="output_layer.weight" not in mcp.shapes,
        stacked=layout.stacked,
    )


def split_qkv(
    qkv_RD: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused ``linear_qkv.weight`` ``[G * (H/G + 2) * Hd, D]`` -> ``(wq [H*Hd, D],
    wk [G*Hd, D], wv [G*Hd, D])``: rows are grouped per query group as ``[H/G query heads, key,
    value]`` (megatron-core ``SelfAttention.get_query_key_value_tensors``); query head h then
    uses key/value head ``h // (H/G)``, as in grouped-query attention everywhere."""
    per_group = num_heads // num_kv_heads
    dim = qkv_RD.shape[-1]
    grouped = qkv_RD.reshape(num_kv_heads, (per_group + 2) * head_dim, dim)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(-1, dim).contiguous(),
        k.reshape(-1, dim).contiguous(),
        v.reshape(-1, dim).contiguous(),
    )


def megatron_items(mcp: MegatronCheckpoint, cfg: ModelConfig) -> list[MegatronItem]:
    """The import plan of every tensor of our decoder ``cfg`` (its vocabulary at most the stored
    rows).

    Raises:
        ValueError: a tensor the plan needs is not stored, or a stored model tensor has no place
            in our decoder (named).
    """
    layout = _layout(mcp)
    vocab = cfg.vocab_size
    heads = {
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
    }

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[:vocab].contiguous()

    def identity(t: torch.Tensor) -> torch.Tensor:
        return t

    def qkv_part(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: split_qkv(t, **heads)[index]

    def fc1_part(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: t.chunk(2, dim=0)[index].contiguous()

    attn_norm = _pick_norm(
        mcp, layout, "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"
    )
    ffn_norm = _pick_norm(
        mcp, layout, "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
    )
    items = [
        MegatronItem("tok_embeddings.weight", "embedding.word_embeddings.weight", None, rows),
        MegatronItem("norm.weight", "decoder.final_layernorm.weight", None, identity),
    ]
    if not cfg.tie_embeddings:
        items.append(MegatronItem("output.weight", "output_layer.weight", None, rows))
    table = (
        ("attention.wq.weight", "self_attention.linear_qkv.weight", qkv_part(0)),
        ("attention.wk.weight", "self_attention.linear_qkv.weight", qkv_part(1)),
        ("attention.wv.weight", "self_attention.linear_qkv.weight", qkv_part(2)),
        ("attention.wo.weight", "self_attention.linear_proj.weight", identity),
        ("attention_norm.weight", attn_norm, identity),
        ("feed_forward.w1.weight", "mlp.linear_fc1.weight", fc1_part(0)),
        ("feed_forward.w3.weight", "mlp.linear_fc1.weight", fc1_part(1)),
        ("feed_forward.w2.weight", "mlp.linear_fc2.weight", identity),
        ("ffn_norm.weight", ffn_norm, identity),
    )
    for layer in range(cfg.num_layers):
        for ours, suffix, combine in table:
            key, row = _layer_key(layout, layer, suffix)
            items.append(MegatronItem(f"layers.{layer}.{ours}", key, row, combine))
    for item in items:
        if item.source not in mcp.shapes:
            raise ValueError(f"{str(mcp.path)!r} lacks tensor {item.source!r}")
    used = {item.source for item in items}
    for key in mcp.shapes:
        if key not in used:
            raise ValueError(
                f"Megatron tensor {key!r} has no place in a Llama-style decoder (no biases, "
                "MoE, q/k norms or LayerNorm biases): not imported"
            )
    return items


# ---------------------------------------------------------------------------------------------
# the model config


_DERIVED = ("hidden_size", "num_layers", "ffn_hidden_size", "tie_embeddings")
_FIXED = {
    "family": "decoder",
    "position": "rope",
    "norm": "rmsnorm",
    "norm_position": "pre",
    "mlp": "swiglu",
    "bias": False,
    "qk_norm": False,
    "num_languages": 0,
}


def model_config_from_megatron(
    shape: MegatronShape,
    base: ModelConfig,
    *,
    user_keys: set[str],
    vocab_size: int,
) -> ModelConfig:
    """Our ``ModelConfig``: ``base`` (the run config's model section) with the shapes' values.

    Args:
        user_keys: ``model.*`` keys (without ``model.``) the user set (every key when a config
            file was given); a value of one of them that the weights contradict is refused, and
            ``num_heads`` must be one of them.
        vocab_size: rows to keep (at most ``shape.padded_vocab``).

    Raises:
        ValueError: one line naming the key and the rule.
    """
    if "num_heads" not in user_keys:
        raise ValueError(
            "model.num_heads is not stored in a Megatron checkpoint: pass --config RUN_YAML "
            "with it, or model.num_heads=N"
        )
    for key, expected in _FIXED.items():
        if key in user_keys and getattr(base, key) != expected:
            raise ValueError(
                f"model.{key} ({getattr(base, key)!r}) must be {expected!r} to import a "
                "Megatron Llama-style decoder"
            )
    if "moe.num_experts" in user_keys and base.moe.num_experts != 0:
        raise ValueError(
            f"model.moe.num_experts ({base.moe.num_experts}) must be 0: only dense Megatron "
            "decoders import"
        )
    derived: dict[str, Any] = {
        "hidden_size": shape.hidden_size,
        "num_layers": shape.num_layers,
        "ffn_hidden_size": shape.ffn_hidden_size,
        "tie_embeddings": shape.tied,
    }
    for key in _DERIVED:
        if key in user_keys and getattr(base, key) != derived[key]:
            raise ValueError(
                f"model.{key} ({getattr(base, key)!r}) disagrees with the Megatron checkpoint "
                f"({derived[key]!r})"
            )
    heads = base.num_heads
    if heads <= 0 or shape.proj_width % heads != 0:
        raise ValueError(
            f"model.num_heads ({heads}) must divide linear_proj's input width "
            f"({shape.proj_width} = heads x head_dim)"
        )
    head_dim = shape.proj_width // heads
    kv_rows = shape.qkv_rows - shape.proj_width
    if kv_rows <= 0 or kv_rows % (2 * head_dim) != 0:
        raise ValueError(
            f"model.num_heads ({heads}) gives head_dim {head_dim}, which does not split "
            f"linear_qkv's {shape.qkv_rows} rows into queries and key/value heads"
        )
    kv_heads = kv_rows // (2 * head_dim)
    if heads % kv_heads != 0:
        raise ValueError(
            f"model.num_heads ({heads}) must be divisible by the checkpoint's {kv_heads} "
            "query groups"
        )
    for key, value in (("head_dim", head_dim), ("num_kv_heads", kv_heads)):
        if key in user_keys and getattr(base, key) not in (None, value):
            raise ValueError(
                f"model.{key} ({getattr(base, key)}) disagrees with the Megatron checkpoint "
                f"({value}, with model.num_heads={heads})"
            )
    if vocab_size > shape.padded_vocab:
        raise ValueError(
            f"vocabulary of {vocab_size} is larger than the checkpoint's embedding rows "
            f"({shape.padded_vocab})"
        )
    return replace(
        base,
        **_FIXED,
        **derived,
        vocab_size=vocab_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        moe=replace(base.moe, num_experts=0),
    )


# ---------------------------------------------------------------------------------------------
# import


def import_megatron(
    directory: str | os.PathLike,
    *,
    out: str | os.PathLike,
    base_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    tokenizer: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A Megatron ``torch_dist`` checkpoint of a Llama-style decoder -> our checkpoint ``out``.

    Args:
        directory: the Megatron run directory (``latest_checkpointed_iteration.txt``) or one
            ``iter_NNNNNNN`` directory.
        out: the checkpoint directory to create (must not exist).
        base_config: a run config (the model's non-stored values, ``model.num_heads`` among
            them, and the other sections of ``config.yaml``); default the built-in defaults.
        overrides: ``key=value`` overrides of that config.
        tokenizer: the tokenizer directory whose vocabulary the padded rows are trimmed to;
            default the one the config's ``data.manifest`` records (given too, it must be that
            one, see ``checkpoints_tools.convert.run_tokenizer``).
        log: where a warning line goes (default stderr).

    Returns:
        ``{"out", "family", "params", "model", "source" (the iteration directory),
        "layout" ("stacked" or "per-layer"), "padded_vocab"}``.

    Raises:
        ValueError: a refused ``.metadata`` (a global outside the whitelist), not a Megatron
            torch_dist checkpoint, a model we do not import, a config the weights contradict,
            missing ``model.num_heads``, existing output. ``out`` is then absent.
    """
    from checkpoints_tools.convert import _reload, atomic_dir, family_name, run_tokenizer
    from checkpoints_tools.dcp_io import MODEL_PREFIX
    from checkpoints_tools.dcp_stream import save_streamed
    from pretrain.checkpoint import TrainState
    from pretrain.config import config_to_dict, config_to_yaml, load_config
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, build_scheduler

    if Path(out).exists():
        raise ValueError(f"output {str(out)!r} exists: choose a new path")
    mcp = open_megatron(directory)
    shape = megatron_shape(mcp)
    overrides = list(overrides or [])
    run_cfg = load_config(base_config or None, overrides)
    user_keys = _user_model_keys(base_config, overrides)
    manifest = Path(run_cfg.data.manifest) if run_cfg.data.manifest else None
    if tokenizer is not None or (manifest is not None and manifest.exists()):
        vocab = run_tokenizer(run_cfg, override=tokenizer, log=log).vocab_size
    elif "vocab_size" in user_keys:
        vocab = run_cfg.model.vocab_size
    else:
        vocab = shape.padded_vocab
    model_cfg = model_config_from_megatron(
        shape, run_cfg.model, user_keys=user_keys, vocab_size=vocab
    )
    # A round trip through YAML validates the assembled config like any run config.
    run_cfg = _reload(config_to_yaml(replace(run_cfg, model=model_cfg)))
    items = {item.name: item for item in megatron_items(mcp, run_cfg.model)}
    with torch.device("meta"):
        model = build_model(run_cfg.model)
    _check_plan(mcp, items, model.state_dict())
    optimizer = build_optimizer(model, run_cfg.optim, device_type="cpu")
    scheduler = build_scheduler(optimizer, run_cfg.optim, total_steps=run_cfg.train.steps)
    state = {"train": TrainState(model, optimizer, scheduler, step=0).state_dict()}
    recent: collections.OrderedDict[tuple[str, int | None], torch.Tensor] = (
        collections.OrderedDict()
    )

    def read(source: str, layer: int | None) -> torch.Tensor:
        # wq/wk/wv share linear_qkv and w1/w3 linear_fc1 (w2 written between): keep two reads
        key = (source, layer)
        if key not in recent:
            recent[key] = mcp.read(source, layer=layer)
            while len(recent) > 2:
                recent.popitem(last=False)
        return recent[key]

    def produce(key: str, meta: torch.Tensor) -> torch.Tensor:
        if not key.startswith(MODEL_PREFIX):
            return torch.zeros(meta.shape, dtype=meta.dtype)  # Adam's moments before any step
        item = items[key[len(MODEL_PREFIX) :]]
        return item.combine(read(item.source, item.layer)).to(meta.dtype)

    with atomic_dir(out) as tmp:
        (tmp / "config.yaml").write_text(config_to_yaml(run_cfg), encoding="utf-8")
        save_streamed(state, path=tmp, produce=produce)
    return {
        "out": str(out),
        "family": family_name(run_cfg.model),
        "params": sum(p.numel() for p in model.parameters()),
        "model": config_to_dict(run_cfg)["model"],
        "source": str(mcp.path),
        "layout": "stacked" if shape.stacked else "per-layer",
        "padded_vocab": shape.padded_vocab,
    }


def _user_model_keys(base_config: str | os.PathLike | None, overrides: list[str]) -> set[str]:
    """The ``model.*`` keys (without ``model.``; ``moe.x`` nested) the config file's ``model``
    section and the overrides set."""
    import yaml

    keys = {
        item.split("=", 1)[0].strip().removeprefix("model.")
        for item in overrides
        if item.strip().startswith("model.")
    }
    if base_config:
        # load_config has read and checked this file already
        tree = yaml.safe_load(Path(base_config).read_text(encoding="utf-8")) or {}
        section = tree.get("model") or {}
        for key, value in section.items():
            if isinstance(value, dict):
                keys |= {f"{key}.{sub}" for sub in value}
            else:
                keys.add(str(key))
    return keys


def _check_plan(
    mcp: MegatronCheckpoint, items: dict[str, MegatronItem], expected: dict[str, torch.Tensor]
) -> None:
    """Every tensor of our model planned once, with the model's shape (on the meta device).

    Raises:
        ValueError: a missing tensor or a stored shape the config does not imply.
    """
    missing = sorted(set(expected) - set(items))
    if missing:
        raise ValueError(f"no Megatron tensor for our {missing[0]!r}")
    for name, item in items.items():
        stored = mcp.shapes[item.source][0]
        if item.layer is not None:
            stored = stored[1:]
        try:
            got = item.combine(torch.empty(stored, device="meta")).shape
        except RuntimeError:
            got = None
        if got != expected[name].shape:
            raise ValueError(
                f"Megatron tensor {item.source!r} {tuple(stored)} does not give our {name!r} of "
                f"shape {tuple(expected[name].shape)}"
            )
