"""Tensor and sequence parallel: turn a family's ``tp_plan`` (data) into DTensor styles.

What to call: ``apply_tp(model, plan, tp_mesh=..., sequence_parallel=...)`` on a meta model (or
a pipeline stage of one). Guarantees: every module keeps its class and its methods; each plan
entry becomes a ``ParallelStyle`` applied with ``parallelize_module`` to the modules its pattern
matches (nothing else of the model is addressed by name); every parameter becomes a DTensor
over tp; ``model(ids)`` returns the vocabulary-sharded logits (a ``Shard(2)`` DTensor for
``loss_parallel``), ``model(ids, return_hidden=True)`` the local hidden states.

Placements over the ``tp`` axis with sequence parallel (``parallel.sequence_parallel``):

    residual stream between sublayers  local tensor, the rank's chunk of T: ``Shard(1)``
    norms (``sequence``)               run on that chunk; weights ``Replicate``, grads ``Partial``
    attention / feed-forward input     all-gathered to the whole sequence (``Replicate``)
    wq, wk, wv, w1, w3 (``colwise``)   weight ``Shard(0)``; output local heads / FFN columns
    wo, w2 (``rowwise``)               weight ``Shard(1)``; output reduce-scattered to ``Shard(1)``
    embeddings (``embedding``)         table ``Shard(0)`` (rows); output ``Shard(1)``
    output head (``output``)           ``VocabParallelOutput``: weight ``Shard(0)`` (vocab), input
                                       gathered; logits a DTensor ``Shard(2)`` for ``loss_parallel``
    grouped experts, MoE layers        see ``parallel.expert_parallel``

Without sequence parallel the residual stream is replicated and norms are plain modules.

The model computes its logits by calling its output head (an ``nn.Linear``, or a tied head
given the embedding table and its bias), so vocabulary-parallel output is an ordinary plan
entry: ``VocabParallelOutput`` shards the head's own weights, gathers its input and keeps the
logits a DTensor. A tied head's table is ``Shard(0)`` already (the embedding style); its bias,
a parameter of the model that no entry names, is replicated like any such parameter and sliced
to this rank's vocabulary shard on entry. A ``return_hidden=True`` forward gets the hidden
states (local, placed as the residual stream after the last norm/head: ``Shard(1)`` under SP,
else replicated).

Pipeline stages under SP pass the residual stream's local chunk ``x_B(T/tp)D`` between them; a
stage without embeddings therefore gets positions ``0..T-1`` of the whole sequence from a
forward pre-hook (unless the caller passes ``position_ids_BT``).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


class VocabParallelOutput(ParallelStyle):
    """The output head over tp's vocabulary shards (``distribute_module``).

    partition fn: the head's own ``weight`` ``[V, D]`` and ``bias`` ``[V]`` become ``Shard(0)``
    DTensors (an untied ``nn.Linear``; a tied head owns none). input fn: the hidden states
    ``x_BTD`` (local, placed ``input_layout``) become a replicated DTensor; further arguments (a
    tied head's table and bias) are made ``Shard(0)`` DTensors. output fn: none, the logits stay
    a ``Shard(2)`` DTensor (``x`` replicated times a ``Shard(0)`` weight: no communication).

    Args:
        input_layout: placement of the hidden states entering the head.
    """

    def __init__(self, *, input_layout) -> None:
        super().__init__()
        self.input_layout = input_layout

    @staticmethod
    def _partition_fn(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return
        for key, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, mesh, [Shard(0)])
            module.register_parameter(key, nn.Parameter(sharded, requires_grad=param.requires_grad))

    def _input_fn(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x_BTD, *rest = inputs
        if not isinstance(x_BTD, DTensor):
            x_BTD = DTensor.from_local(x_BTD, mesh, [self.input_layout], run_check=False)
        x_BTD = x_BTD.redistribute(mesh, [Replicate()])
        shards = []
        for tensor in rest:
            if isinstance(tensor, DTensor) and tensor.placements != (Shard(0),):
                tensor = tensor.redistribute(mesh, [Shard(0)])
            shards.append(tensor)
        return (x_BTD, *shards)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, partition_fn=self._partition_fn, input_fn=self._input_fn
        )


def _styles(*, sequence_parallel: bool) -> dict[str, ParallelStyle | None]:
    """Style name of ``pretrain.models.parallel_plan.TP_STYLES`` -> ParallelStyle (None: nothing
    to do here; ``block``, ``experts`` and ``moe`` are applied by their own code)."""
    seq = Shard(1) if sequence_parallel else Replicate()
    return {
        "colwise": ColwiseParallel(),
        "rowwise": RowwiseParallel(output_layouts=seq),
        "sequence": SequenceParallel(use_local_output=True) if sequence_parallel else None,
        "sequence_to_replicate_input": (
            PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_output=True,
            )
            if sequence_parallel
            else None
        ),
        "cross_attention_input": (
            PrepareModuleInput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                input_kwarg_layouts={"kv_source_BKD": Shard(1)},
                desired_input_kwarg_layouts={"kv_source_BKD": Replicate()},
                use_local_output=True,
            )
            if sequence_parallel
            else None
        ),
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        # q/k norms act on local heads (dim 2): replicated weights whose grads are partial sums.
        "replicate_heads": SequenceParallel(sequence_dim=2, use_local_output=True),
        "replicate": None,  # applied in ``apply_tp``: parameters become Replicate DTensors
        "output": VocabParallelOutput(input_layout=seq),
        "output_from_replicate": VocabParallelOutput(input_layout=Replicate()),
        # parallel.parallelize (checkpointing, compile, FSDP units):
        "block": None,
        # parallel.expert_parallel:
        "experts": None,
        "moe": None,
    }


def _match(pattern: str, name: str) -> bool:
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)
    )


def matching_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the submodules of ``model`` (not None) matched by any of ``patterns``
    (``*`` = one path segment), in module order."""
    return [
        name
        for name, module in model.named_modules()
        if name and module is not None and any(_match(p, name) for p in patterns)
    ]


def apply_tp(
    model: nn.Module,
    plan: dict[str, str],
    *,
    tp_mesh: DeviceMesh,
    sequence_parallel: bool,
) -> None:
    """Apply ``plan`` (pattern -> style name, see ``pretrain.models.parallel_plan``) over
    ``tp_mesh``.

    Works on the meta device. Grouped experts are left to ``parallel.expert_parallel``.

    Raises:
        ValueError: a style name this module does not know.
    """
    styles = _styles(sequence_parallel=sequence_parallel)
    for pattern, style_name in plan.items():
        if style_name not in styles:
            raise ValueError(f"tp plan style ({style_name!r}) for {pattern} is not supported")
        if style_name == "replicate":
            # Weights applied to a replicated activation (the router gate, which reads its
            # weight as a local tensor): tp-replicated DTensors like every other weight under
            # TP, so that checkpoints, clipping and the optimizer see one kind of parameter.
            for name in matching_modules(model, [pattern]):
                distribute_module(model.get_submodule(name), tp_mesh)
            continue
        style = styles[style_name]
        if style is None:
            continue
        for name in matching_modules(model, [pattern]):
            parallelize_module(model.get_submodule(name), tp_mesh, style)
    _replicate_the_rest(model, plan, tp_mesh=tp_mesh)
    embeddings = matching_modules(model, [p for p, style in plan.items() if style == "embedding"])
    if sequence_parallel and not embeddings:
        # A later pipeline stage receives this rank's sequence chunk x_B(T/tp)D, but RoPE
        # positions must span the whole sequence (attention gathers it).
        model.register_forward_pre_hook(_full_sequence_positions(tp_mesh.size()), with_kwargs=True)


def _replicate_the_rest(model: nn.Module, plan: dict[str, str], *, tp_mesh: DeviceMesh) -> None:
    """Every parameter the plan left a plain tensor (the norms without sequence parallel, the
    encoder's MLM head) becomes a tp-replicated DTensor, and its module computes on
    replicated DTensors (plain inputs wrapped, outputs unwrapped): the optimizer, clipping and
    checkpoints then see one kind of parameter (a foreach AdamW refuses a mix). Grouped
    experts are left to ``parallel.expert_parallel``."""
    experts = matching_modules(model, [p for p, style in plan.items() if style == "experts"])

    def own_params_only(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:  # submodules get their own pass
            return
        for key, param in list(module.named_parameters(recurse=False)):
            if param is not None and not isinstance(param, DTensor):
                replicated = distribute_tensor(param.data, mesh, [Replicate()])
                module.register_parameter(
                    key, nn.Parameter(replicated, requires_grad=param.requires_grad)
                )

    def wrap_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
            if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def unwrap_output(module: nn.Module, output, mesh: DeviceMesh):
        return output.to_local() if isinstance(output, DTensor) else output

    for name, module in model.named_modules():
        if any(name == e or name.startswith(e + ".") for e in experts):
            continue
        if any(
            p is not None and not isinstance(p, DTensor) for p in module.parameters(recurse=False)
        ):
            if not name:
                # The root computes nothing with its own parameters (a tied head's bias): it
                # hands them to a submodule, whose style places them. No hooks on the root.
                # (distribute_module on the root would replicate every submodule too.)
                own_params_only("", module, tp_mesh)
                continue
            distribute_module(
                module,
                tp_mesh,
                partition_fn=own_params_only,
                input_fn=wrap_inputs,
                output_fn=unwrap_output,
            )


def _full_sequence_positions(tp: int):
    def hook(module: nn.Module, args, kwargs):
        if kwargs.get("position_ids_BT") is not None or not args:
            return None
        x_BtD = args[0]
        batch, seq = x_BtD.shape[0], x_BtD.shape[1] * tp
        positions_BT = torch.arange(seq, device=x_BtD.device).expand(batch, seq)
        return args, {**kwargs, "position_ids_BT": positions_BT}

    return hook
