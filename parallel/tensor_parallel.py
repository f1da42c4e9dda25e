"""Tensor and sequence parallel: turn a family's ``tp_plan`` (data) into DTensor styles.

Placements over the ``tp`` axis with sequence parallel (``parallel.sequence_parallel``):

    residual stream between sublayers  local tensor, the rank's chunk of T: ``Shard(1)``
    norms (``sequence``)               run on that chunk; weights ``Replicate``, grads ``Partial``
    attention / feed-forward input     all-gathered to the whole sequence (``Replicate``)
    wq, wk, wv, w1, w3 (``colwise``)   weight ``Shard(0)``; output local heads / FFN columns
    wo, w2 (``rowwise``)               weight ``Shard(1)``; output reduce-scattered to ``Shard(1)``
    embeddings (``embedding``)         table ``Shard(0)`` (rows); output ``Shard(1)``
    output projection (``output``)     weight ``Shard(0)`` (vocab); logits a DTensor ``Shard(2)``
                                       for ``loss_parallel``
    grouped experts (``experts``)      see ``parallel.expert_parallel``

Without sequence parallel the residual stream is replicated and norms are plain modules.

The model computes logits with ``F.linear(x, weight)`` (so that a tied projection reads the
embedding table), which bypasses the ``output`` module's DTensor hooks; ``apply_tp`` therefore
makes the model return hidden states and projects them in a forward hook that keeps the logits
vocabulary-sharded. A ``return_hidden=True`` forward gets the hidden states (local, placed as
the residual stream after the last norm/head: ``Shard(1)`` under SP, else replicated).

Pipeline stages under SP pass the residual stream's local chunk ``x_B(T/tp)D`` between them; a
stage without embeddings therefore gets positions ``0..T-1`` of the whole sequence from a
forward pre-hook (unless the caller passes ``position_ids_BT``).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
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


def _styles(*, sequence_parallel: bool) -> dict[str, ParallelStyle | None]:
    """Style name of ``pretrain.models.parallel_plan.TP_STYLES`` -> ParallelStyle (None: nothing
    to do here; ``experts`` and ``output`` are applied by their own code)."""
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
        "embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        # q/k norms act on local heads (dim 2): replicated weights whose grads are partial sums.
        "replicate_heads": SequenceParallel(sequence_dim=2, use_local_output=True),
        "replicate": None,  # applied in ``apply_tp``: parameters become Replicate DTensors
        "experts": None,
        "output": None,
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
        if style_name == "replicate" and pattern.endswith(("q_norm", "k_norm")):
            style_name = "replicate_heads"
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
    _install_vocab_parallel_output(
        model, tp_mesh=tp_mesh, sequence_parallel=sequence_parallel, plan=plan
    )
    _replicate_the_rest(model, plan, tp_mesh=tp_mesh)
    if sequence_parallel and getattr(model, "tok_embeddings", None) is None:
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
        if not name or any(name == e or name.startswith(e + ".") for e in experts):
            continue
        if any(
            p is not None and not isinstance(p, DTensor) for p in module.parameters(recurse=False)
        ):
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


def _install_vocab_parallel_output(
    model: nn.Module, *, tp_mesh: DeviceMesh, sequence_parallel: bool, plan: dict[str, str]
) -> None:
    weight, _ = model.output_projection()
    if weight is None:
        return  # a pipeline stage without the projection
    if model.output is not None:
        parallelize_module(model.output, tp_mesh, ColwiseParallel())
    elif getattr(model, "output_bias", None) is not None:
        # Tied: the table is already Shard(0) over the vocabulary; its own bias must match.
        model.output_bias = nn.Parameter(
            distribute_tensor(model.output_bias.data, tp_mesh, [Shard(0)])
        )
    # The hidden states entering the projection: the residual chunk after a sequence-parallel
    # final norm, or replicated (no SP, or after the encoder's head which gathers the sequence).
    gathered_before = "head" in plan and getattr(model, "head", None) is not None
    hidden_placement = Shard(1) if sequence_parallel and not gathered_before else Replicate()
    projection = type(model).output_projection

    # Make the model return hidden states; the hook below projects them.
    model.output_projection = lambda: (None, None)

    def project(module: nn.Module, args, kwargs, hidden_BTD: torch.Tensor):
        if kwargs.get("return_hidden", False):
            return hidden_BTD
        weight_VD, bias_V = projection(module)
        x_BTD = DTensor.from_local(hidden_BTD, tp_mesh, [hidden_placement], run_check=False)
        x_BTD = x_BTD.redistribute(tp_mesh, [Replicate()])
        # x Replicate @ weight Shard(0) -> logits Shard(2): no communication.
        return F.linear(x_BTD, weight_VD, bias_V)

    model.register_forward_hook(project, with_kwargs=True)
