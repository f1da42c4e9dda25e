"""Mixture-of-Experts feed-forward: routers, capacity/dropless dispatch, grouped experts.

Call ``MoE(cfg)(x_BTD, token_mask_BT=..., lang_ids_BT=...) -> y_BTD``. Guarantees: tokens
outside ``token_mask_BT`` (padding) are not routed: they take no capacity, count in no loss or
statistic, and their output is 0 (the block's residual carries them); ``MoE.metrics`` holds the
last forward's ``MoEMetrics``; ``MoE.stats(reset=...)`` the ``MoEStats`` summed over every
training forward since the last reset (a forward recomputed by activation checkpointing counts
once). No host sync on the capacity path, nor on the dropless path with ``torch._grouped_mm``.

Routing (``TopKRouter``): fp32 logits ``x W_g^T``, softmax probabilities, top-k experts.
    switch: top-1, gate = softmax probability (unnormalised);
    gshard: top-2, gates renormalised to sum to 1, optionally a random second expert (kept with
            probability min(1, 2 * g2) in training);
    topk:   general top-k, renormalised unless ``moe.normalize_gates`` is false.

Dispatch (``MoE``), assignments in slot-major order (every token's first choice before any
second choice, as in GShard/Switch, so overflow drops second choices first):
    capacity: each expert takes at most C = ceil(capacity_factor * N * k / E) assignments into a
              zero-padded ``[E * C, D]`` buffer; overflow assignments are dropped, i.e. they add
              nothing and the token rides the residual connection. Static shapes, no host sync:
              N counts every position, padding included (padding takes no place in a queue,
              but C does not shrink with it). In eval mode ``moe.eval_capacity_factor`` replaces
              ``capacity_factor`` (None: dropless at eval).
    dropless: assignments sorted by expert, group offsets from a device-side count; no host sync.
Both feed one grouped matrix product over all experts (``torch._grouped_mm`` with int32 end
offsets); where it is missing, the widths are not 16-byte aligned, or on CUDA in a dtype other
than bf16 (its CUDA kernel's only one), a segment loop over the groups is the fallback (it syncs
once to read the group sizes).

Auxiliary losses over the R real (unmasked) tokens: ``aux_loss = E * sum_i f_i * P_i`` with
P_i the mean router probability of expert i and f_i, by ``moe.aux_loss_type``:
    topk (default): the fraction of the routed assignments (all k choices, before dropping;
        sum_i f_i = 1, so a perfect balance gives 1) that chose expert i: Mixtral's and
        transformers' ``load_balancing_loss_func``, whose value is k times this one (its f_i
        is divided by R, not R * k);
    switch: the fraction of tokens whose first choice is expert i (Switch eq. 4-6, GShard).
Top-1 routers give the same value for both. The default is ``topk``: every choice carries
expert load (a second choice fills capacity like a first one), it is what the exported
Mixtral/Qwen3-MoE models compute, and it keeps the numerics of earlier runs.
``z_loss = mean_n logsumexp(logits_n)^2``. Their weighted sum
``aux_loss_coef * aux_loss + z_loss_coef * z_loss`` is attached to the layer's output by an
identity autograd function whose backward adds ``aux_loss_scale`` times its gradient
(Megatron's MoEAuxLossAutoScaler): the trainer's loss and every pipeline schedule backpropagate
it without plumbing.

Shape legend:
    B batch, T sequence, N tokens (B*T), D model width, E experts, F expert FFN width,
    K top-k slots, A assignments (K*N, slot-major), C expert capacity, M grouped rows,
    L tracked languages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.models.config import ModelConfig
from pretrain.models.precision import autocast_operands


@dataclass
class MoEMetrics:
    """What one MoE layer reports for its last forward (all detached, on the layer's device).

    Attributes:
        tokens_per_expert_E: routed assignments per expert before dropping (sums to R * K for
            R real tokens, less GShard's randomly skipped second choices).
        dropped_fraction: dropped / routed assignments (0 when dropless).
        aux_loss: load-balancing loss E * sum_i f_i P_i (unweighted; ``moe.aux_loss_type``).
        z_loss: router z-loss (unweighted).
    """

    tokens_per_expert_E: torch.Tensor
    dropped_fraction: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


@dataclass
class MoEStats:
    """One MoE layer's routing statistics summed over training forwards (detached tensors on
    the layer's device; no host sync). Counts are over this rank's tokens (padding excluded);
    under data parallel, and with ``parallel.ep_over_tp`` over tp, ranks see different tokens
    and their counts add up. The loss sums are the layer's loss values, already global over
    tp with ``ep_over_tp``.

    Attributes:
        tokens_per_expert_E: routed assignments per expert before dropping (int64).
        num_routed: routed assignments (int64 scalar; ``tokens_per_expert_E.sum()``).
        num_dropped: of those, dropped by expert capacity (int64 scalar; 0 when dropless).
        aux_loss_sum: sum of the unweighted load-balancing losses (fp32 scalar).
        z_loss_sum: sum of the unweighted z-losses (fp32 scalar).
        num_forwards: forwards summed (int64 scalar): ``aux_loss_sum / num_forwards`` is the
            mean loss.
        load_by_lang_LE: routed assignments per language x expert (int64), or None when no
            languages are tracked (``Transformer.track_moe_languages``) or no forward had
            language ids. Ids outside ``[0, L)`` are not counted.
    """

    tokens_per_expert_E: torch.Tensor
    num_routed: torch.Tensor
    num_dropped: torch.Tensor
    aux_loss_sum: torch.Tensor
    z_loss_sum: torch.Tensor
    num_forwards: torch.Tensor
    load_by_lang_LE: torch.Tensor | None = None

    def __add__(self, other: MoEStats) -> MoEStats:
        """Field-wise sum (a missing per-language table counts as zeros)."""
        mine, theirs = self.load_by_lang_LE, other.load_by_lang_LE
        if mine is None or theirs is None:
            by_lang = mine if theirs is None else theirs
        else:
            by_lang = mine + theirs
        return MoEStats(
            tokens_per_expert_E=self.tokens_per_expert_E + other.tokens_per_expert_E,
            num_routed=self.num_routed + other.num_routed,
            num_dropped=self.num_dropped + other.num_dropped,
            aux_loss_sum=self.aux_loss_sum + other.aux_loss_sum,
            z_loss_sum=self.z_loss_sum + other.z_loss_sum,
            num_forwards=self.num_forwards + other.num_forwards,
            load_by_lang_LE=by_lang,
        )

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """``num_dropped / num_routed`` (fp32 scalar; 0 with nothing routed)."""
        return self.num_dropped.float() / self.num_routed.clamp(min=1).float()


def recomputing() -> bool:
    """Whether this forward runs inside a backward: activation checkpointing recomputing it
    (non-reentrant checkpointing recomputes in the autograd engine). Always False while
    torch.compile traces: a compiled region's recompute does not rerun Python."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; backward also sends ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux, ctx.scale), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient times ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class TokenSplit(Protocol):
    """The tokens of one MoE call are split over a group of ranks, each routing its own part
    (``parallel.ep_over_tp``). Set on a layer with ``MoE.token_split = split``; the layer then
    takes what it computes from all of its tokens from here, so that its losses, statistics and
    capacity queues equal the unsplit layer's (``parallel.expert_parallel.TpTokenSplit``)."""

    def sum_gradient(self, weight: torch.Tensor) -> torch.Tensor:
        """Identity forward; the gradient summed over the group (the router gate: each rank's
        tokens give a part of it)."""

    def routing_totals(
        self,
        counts_E: torch.Tensor,
        probs_E: torch.Tensor,
        z_sum: torch.Tensor,
        num_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's routing statistics (see ``MoE.routing_totals``) -> the group's sums."""

    def queue_positions(
        self,
        experts_A: torch.Tensor,
        valid_A: torch.Tensor,
        *,
        batch: int,
        top_k: int,
        num_experts: int,
    ) -> tuple[torch.Tensor, int]:
        """Each of this rank's assignments' place in its expert's queue as the unsplit layer
        queues them, and the token count capacity is computed from (see
        ``MoE.queue_positions``)."""


def gates_normalized(cfg: ModelConfig) -> bool:
    """Whether top-k gates are renormalised: ``moe.normalize_gates`` or the router's default."""
    if cfg.moe.normalize_gates is not None:
        return cfg.moe.normalize_gates
    return cfg.moe.router != "switch"


def expert_capacity(
    cfg: ModelConfig, *, num_tokens: int, capacity_factor: float | None = None
) -> int:
    """Assignments each expert accepts: ceil(capacity_factor * N * K / E), at least 1
    (``capacity_factor`` default: ``moe.capacity_factor``)."""
    moe = cfg.moe
    factor = moe.capacity_factor if capacity_factor is None else capacity_factor
    return max(1, math.ceil(factor * num_tokens * moe.top_k / moe.num_experts))


def queue_positions(
    experts_A: torch.Tensor, valid_A: torch.Tensor, *, num_experts: int
) -> torch.Tensor:
    """0-based place of each assignment in its expert's queue, in the given (priority) order;
    invalid assignments take no place (their own value is meaningless)."""
    # A comparison, not F.one_hot: off CUDA that reads the ids' min and max on the host.
    experts_E = torch.arange(num_experts, device=experts_A.device)
    onehot_AE = ((experts_A[:, None] == experts_E) & valid_A[:, None]).long()
    return (onehot_AE.cumsum(dim=0) - 1).gather(1, experts_A[:, None]).squeeze(1)


@dataclass
class Routing:
    """Router output for N tokens.

    Attributes:
        logits_NE: fp32 router logits.
        probs_NE: softmax of the logits.
        gates_NK: weight of each chosen expert (0 for a skipped random second choice).
        experts_NK: chosen expert ids (int64).
        valid_NK: False where GShard's random routing skipped the second choice.
    """

    logits_NE: torch.Tensor
    probs_NE: torch.Tensor
    gates_NK: torch.Tensor
    experts_NK: torch.Tensor
    valid_NK: torch.Tensor


class TopKRouter(nn.Module):
    """Linear gate ``gate`` (D -> E, no bias) and the top-k choice. See the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.moe.num_experts
        self.top_k = cfg.moe.top_k
        self.normalize = gates_normalized(cfg)
        self.jitter = cfg.moe.jitter
        self.random_second = cfg.moe.random_second_expert
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)
        self.token_split: TokenSplit | None = None
        """Set by ``MoE.token_split``: the layer's tokens are split over ranks."""

    def gate_weight(self) -> torch.Tensor:
        """``W_g`` ``[E, D]`` as the forward uses it: a local tensor (under tensor parallel the
        weight is a tp-replicated DTensor applied to replicated tokens); with a ``token_split``
        its gradient is summed over the ranks that route the other tokens."""
        weight = self.gate.weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight
        if self.token_split is not None:
            weight = self.token_split.sum_gradient(weight)
        return weight

    def forward(self, x_ND: torch.Tensor) -> Routing:
        """Route ``x_ND``. Jitter and random routing apply only in training (global RNG)."""
        if self.training and self.jitter > 0:
            noise_ND = torch.empty_like(x_ND).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_ND = x_ND * noise_ND
        # fp32 logits: softmax/top-k ties and the z-loss are sensitive to bf16 rounding.
        logits_NE = F.linear(x_ND.float(), self.gate_weight().float())
        probs_NE = logits_NE.softmax(dim=-1)
        gates_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.normalize:
            gates_NK = gates_NK / gates_NK.sum(dim=-1, keepdim=True)
        valid_NK = torch.ones_like(experts_NK, dtype=torch.bool)
        if self.random_second and self.training:
            keep_N = torch.rand_like(gates_NK[:, 1]) < 2.0 * gates_NK[:, 1]
            valid_NK = torch.stack([valid_NK[:, 0], keep_N], dim=1)
            gates_NK = gates_NK * valid_NK
        return Routing(logits_NE, probs_NE, gates_NK, experts_NK, valid_NK)


def _grouped_mm_ok(x_MD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    # torch._grouped_mm needs 16-byte aligned strides (a tp-sharded F may break them), one dtype
    # and at least one row (an ep rank may receive none). Its CUDA kernel, and its meta kernel
    # (what torch.compile traces with, on any device), take bf16 only; eager CPU takes any float
    # dtype. Anything else takes the fallback.
    if not hasattr(torch, "_grouped_mm") or x_MD.dtype != w_EDF.dtype or x_MD.shape[0] == 0:
        return False
    if x_MD.dtype != torch.bfloat16 and (
        x_MD.device.type == "cuda" or torch.compiler.is_compiling()
    ):
        return False
    align = 16 // x_MD.element_size()
    return x_MD.shape[-1] % align == 0 and w_EDF.shape[-1] % align == 0


def grouped_mm(x_MD: torch.Tensor, w_EDF: torch.Tensor, *, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``x_MD`` times ``w_EDF[e]``, all groups in one product.

    Under autocast both operands are cast to its dtype first (``pretrain.models.precision``:
    fp32 weights would otherwise keep the product in fp32, off the bf16 kernel).

    Args:
        x_MD: rows grouped by expert, ``offs_E[-1] == M``.
        w_EDF: per-expert weights (any strides).
        offs_E: int32 end offsets (cumulative group sizes).

    Returns:
        ``y_MF`` (the autocast dtype under autocast).
    """
    x_MD, w_EDF = autocast_operands(x_MD, w_EDF)
    if _grouped_mm_ok(x_MD, w_EDF):
        return torch._grouped_mm(x_MD, w_EDF, offs=offs_E)
    # Fallback: one segment per expert (a host sync to read the sizes); not the main path.
    sizes = torch.diff(offs_E, prepend=offs_E.new_zeros(1)).tolist()
    parts = [seg @ w_EDF[e] for e, seg in enumerate(torch.split(x_MD, sizes))]
    return torch.cat(parts) if parts else x_MD.new_zeros(0, w_EDF.shape[-1])


class GroupedExperts(nn.Module):
    """E expert MLPs as stacked weights (torchtitan layout, expert dim first for EP sharding).

    Parameters: ``w1`` ``[E, F, D]`` (gate), ``w2`` ``[E, D, F]`` (down), ``w3`` ``[E, F, D]``
    (up; SwiGLU only); with ``cfg.bias`` also ``b1`` ``[E, F]`` and ``b2`` ``[E, D]``.

    Sharded (``parallel.expert_parallel.ExpertParallel``), the parameters are DTensors and the
    forward uses their local parts: the local experts (the style's input hook sends each row to
    the rank holding its expert, its output hook brings the rows back), F-sharded under tensor
    parallel. Two attributes say what the sharding asks of the forward:

    ``weight_grad_scale`` (default 1.0): the local weights' gradients are multiplied by it (a
    rank's expert gradient sums the tokens of several data-parallel ranks).
    ``partial_output_sum`` (default None): F is sharded; called on the down projection's partial
    product, before ``b2``, it returns the sum over the shards.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        num_experts = cfg.moe.num_experts
        ffn = cfg.expert_ffn_width
        dim = cfg.hidden_size
        self.swiglu = cfg.mlp == "swiglu"
        self.relu = cfg.mlp == "relu"  # Switch Transformers' experts (encoder_decoder)
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, dim)) if self.swiglu else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn)) if cfg.bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if cfg.bias else None
        self.weight_grad_scale = 1.0
        self.partial_output_sum: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        x_MD: torch.Tensor,
        offs_E: torch.Tensor,
        row_experts_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply expert e to rows ``offs[e-1]:offs[e]``. Returns ``y_MD``. Positional
        arguments, so that a parallel style's input hook sees them all.

        Args:
            x_MD: rows grouped by expert.
            offs_E: int32 end offsets, ``offs_E[-1] == M``.
            row_experts_M: expert of each row; needed only with biases.
        """
        w1, w2, w3, b1, b2 = self.expert_weights()
        h_MF = grouped_mm(x_MD, w1.transpose(-2, -1), offs_E=offs_E)
        if b1 is not None:
            h_MF = h_MF + b1[row_experts_M]
        if w3 is not None:
            h_MF = F.silu(h_MF) * grouped_mm(x_MD, w3.transpose(-2, -1), offs_E=offs_E)
        elif self.relu:
            h_MF = F.relu(h_MF)
        else:
            h_MF = F.gelu(h_MF)
        y_MD = grouped_mm(h_MF, w2.transpose(-2, -1), offs_E=offs_E)
        if self.partial_output_sum is not None:
            y_MD = self.partial_output_sum(y_MD)
        if b2 is not None:
            y_MD = y_MD + b2[row_experts_M]
        return y_MD

    def expert_weights(self) -> tuple[torch.Tensor | None, ...]:
        """``(w1, w2, w3, b1, b2)`` as the forward uses them: local tensors (a DTensor
        parameter's local part: this rank's experts), gradients times ``weight_grad_scale``."""
        return tuple(self._local(p) for p in (self.w1, self.w2, self.w3, self.b1, self.b2))

    def _local(self, param: torch.Tensor | None) -> torch.Tensor | None:
        if param is None:
            return None
        local = param.to_local() if isinstance(param, DTensor) else param
        if self.weight_grad_scale != 1.0:
            local = _ScaleGrad.apply(local, self.weight_grad_scale)
        return local


class MoE(nn.Module):
    """Token-choice MoE feed-forward: ``router`` (TopKRouter) and ``experts`` (GroupedExperts).

    ``forward(x_BTD, *, token_mask_BT=None, lang_ids_BT=None) -> y_BTD`` where dropped
    assignments and masked (padding) tokens contribute zero (the enclosing block's residual
    carries the token). After each forward ``self.metrics`` holds a ``MoEMetrics``; training
    forwards also add to the ``MoEStats`` that ``stats()`` returns. ``aux_loss_scale`` (default
    1.0) multiplies the auxiliary gradient: set it to the factor the trainer applies to its main
    loss (e.g. 1 / gradient-accumulation steps). ``num_tracked_languages`` (default 0) sizes
    the per-language load table of the stats. ``token_split`` (default None; a ``TokenSplit``)
    says that this call's tokens are part of a call split over ranks: the router gate's gradient,
    the routing statistics behind the aux and z losses and the capacity queues are then the
    whole call's (``routing_totals``, ``queue_positions``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.moe.num_experts
        self.top_k = cfg.moe.top_k
        self.dropless = cfg.moe.dropless
        self.aux_loss_type = cfg.moe.aux_loss_type
        self.aux_loss_coef = cfg.moe.aux_loss_coef
        self.z_loss_coef = cfg.moe.z_loss_coef
        self.aux_loss_scale = 1.0
        self.num_tracked_languages = 0
        self.router = TopKRouter(cfg)
        self.experts = GroupedExperts(cfg)
        self.metrics: MoEMetrics | None = None
        self._stats: MoEStats | None = None

    @property
    def token_split(self) -> TokenSplit | None:
        """The ``TokenSplit`` this layer's tokens are part of (None: they are all its own)."""
        return self.router.token_split

    @token_split.setter
    def token_split(self, split: TokenSplit | None) -> None:
        self.router.token_split = split

    def capacity_factor(self) -> float | None:
        """The capacity factor this mode routes with; None: dropless (``moe.dropless``, or
        eval mode with ``moe.eval_capacity_factor`` None)."""
        if self.dropless:
            return None
        if self.training:
            return self.cfg.moe.capacity_factor
        return self.cfg.moe.eval_capacity_factor

    def stats(self, *, reset: bool = True) -> MoEStats | None:
        """The ``MoEStats`` summed since the last reset (None: no training forward since);
        ``reset`` starts a new sum."""
        stats = self._stats
        if reset:
            self._stats = None
        return stats

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        token_mask_BT: torch.Tensor | None = None,
        lang_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x_BTD -> y_BTD`` (see the class docstring).

        Args:
            x_BTD: the normalised residual stream.
            token_mask_BT: bool, False at padding (not routed, output 0); None: all real.
            lang_ids_BT: language of each token, for the per-language load of the stats.
        """
        batch, seq, dim = x_BTD.shape
        x_ND = x_BTD.reshape(-1, dim)
        num_tokens = x_ND.shape[0]
        routing = self.router(x_ND)
        mask_N = None if token_mask_BT is None else token_mask_BT.reshape(-1).bool()
        valid_NK = routing.valid_NK if mask_N is None else routing.valid_NK & mask_N[:, None]

        # Slot-major flattening: assignment a = k * N + n.
        experts_A = routing.experts_NK.t().reshape(-1)
        valid_A = valid_NK.t().reshape(-1)
        gates_A = routing.gates_NK.t().reshape(-1)
        if mask_N is not None:
            gates_A = gates_A * valid_A
        tokens_A = torch.arange(num_tokens, device=x_ND.device).repeat(self.top_k)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E = counts_E.scatter_add(0, experts_A, valid_A.long())

        factor = self.capacity_factor()
        if factor is None:
            y_AD = self._dropless(x_ND, experts_A=experts_A, tokens_A=tokens_A, counts_E=counts_E)
            kept_A = valid_A
        else:
            y_AD, kept_A = self._with_capacity(
                x_ND,
                experts_A=experts_A,
                tokens_A=tokens_A,
                valid_A=valid_A,
                capacity_factor=factor,
                batch=batch,
            )
            gates_A = gates_A * kept_A
        num_routed = valid_A.sum()
        num_dropped = num_routed - kept_A.sum()

        # Sum over slots in a fixed order (deterministic, unlike a scatter-add of k rows).
        weighted_AD = y_AD * gates_A[:, None].to(y_AD.dtype)
        out_ND = weighted_AD.view(self.top_k, num_tokens, dim).sum(dim=0)
        out_BTD = out_ND.view(batch, seq, dim)

        aux_loss, z_loss = self._aux_losses(
            routing, valid_NK=valid_NK, mask_N=mask_N, counts_E=counts_E
        )
        if not recomputing():
            # A recomputed forward (activation checkpointing) repeats the original's values.
            self.metrics = MoEMetrics(
                tokens_per_expert_E=counts_E.detach(),
                dropped_fraction=(num_dropped.float() / num_routed.clamp(min=1).float()).detach(),
                aux_loss=aux_loss.detach(),
                z_loss=z_loss.detach(),
            )
            if self.training:
                self._accumulate(
                    counts_E=counts_E,
                    num_routed=num_routed,
                    num_dropped=num_dropped,
                    aux_loss=aux_loss,
                    z_loss=z_loss,
                    experts_A=experts_A,
                    valid_A=valid_A,
                    lang_ids_BT=lang_ids_BT,
                )
        weighted = self.aux_loss_coef * aux_loss + self.z_loss_coef * z_loss
        if torch.is_grad_enabled() and weighted.requires_grad:
            out_BTD = _AttachAuxLoss.apply(out_BTD, weighted, self.aux_loss_scale)
        return out_BTD

    def _accumulate(
        self,
        *,
        counts_E: torch.Tensor,
        num_routed: torch.Tensor,
        num_dropped: torch.Tensor,
        aux_loss: torch.Tensor,
        z_loss: torch.Tensor,
        experts_A: torch.Tensor,
        valid_A: torch.Tensor,
        lang_ids_BT: torch.Tensor | None,
    ) -> None:
        by_lang = None
        num_langs = self.num_tracked_languages
        if num_langs > 0 and lang_ids_BT is not None:
            lang_A = lang_ids_BT.reshape(-1).to(experts_A.device).repeat(self.top_k)
            ok_A = valid_A & (lang_A >= 0) & (lang_A < num_langs)
            index_A = lang_A.clamp(0, num_langs - 1) * self.num_experts + experts_A
            by_lang = torch.zeros(
                num_langs * self.num_experts, dtype=torch.int64, device=experts_A.device
            )
            by_lang = by_lang.scatter_add(0, index_A, ok_A.long()).view(num_langs, -1)
        step = MoEStats(
            tokens_per_expert_E=counts_E.detach(),
            num_routed=num_routed.detach(),
            num_dropped=num_dropped.detach(),
            aux_loss_sum=aux_loss.detach().float(),
            z_loss_sum=z_loss.detach().float(),
            num_forwards=torch.ones((), dtype=torch.int64, device=counts_E.device),
            load_by_lang_LE=by_lang,
        )
        self._stats = step if self._stats is None else self._stats + step

    def _aux_losses(
        self,
        routing: Routing,
        *,
        valid_NK: torch.Tensor,
        mask_N: torch.Tensor | None,
        counts_E: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aux_loss_type == "switch":
            first_N = valid_NK[:, 0].long()
            f_counts_E = torch.zeros_like(counts_E).scatter_add(
                0, routing.experts_NK[:, 0], first_N
            )
        else:
            f_counts_E = counts_E
        probs_NE = routing.probs_NE
        lse2_N = torch.logsumexp(routing.logits_NE, dim=-1).pow(2)
        if mask_N is None:
            real = probs_NE.new_full((), probs_NE.shape[0])
        else:
            probs_NE = torch.where(mask_N[:, None], probs_NE, 0.0)
            lse2_N = torch.where(mask_N, lse2_N, 0.0)
            real = mask_N.sum().to(probs_NE.dtype)
        f_counts_E, probs_E, z_sum, num_real = self.routing_totals(
            f_counts_E, probs_NE.sum(dim=0), lse2_N.sum(), real
        )
        f_E = f_counts_E.float() / f_counts_E.sum().clamp(min=1).float()
        num_real = num_real.clamp(min=1)
        aux_loss = self.num_experts * (f_E * (probs_E / num_real)).sum()
        return aux_loss, z_sum / num_real

    def routing_totals(
        self,
        counts_E: torch.Tensor,
        probs_E: torch.Tensor,
        z_sum: torch.Tensor,
        num_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing statistics the aux and z losses are taken over (the f_i counts per
        expert, router probability sums, squared-logsumexp sum, real tokens as an fp32 scalar
        tensor): this call's own tokens, or with a ``token_split`` the whole split call's."""
        split = self.token_split
        if split is not None:
            return split.routing_totals(counts_E, probs_E, z_sum, num_tokens)
        return counts_E, probs_E, z_sum, num_tokens

    def queue_positions(
        self, experts_A: torch.Tensor, valid_A: torch.Tensor, *, batch: int
    ) -> tuple[torch.Tensor, int]:
        """Each assignment's place in its expert's queue and the token count the capacity is
        computed from: this call's own tokens in slot-major order, or with a ``token_split``
        as the unsplit call queues them."""
        split = self.token_split
        if split is not None:
            return split.queue_positions(
                experts_A, valid_A, batch=batch, top_k=self.top_k, num_experts=self.num_experts
            )
        positions_A = queue_positions(experts_A, valid_A, num_experts=self.num_experts)
        return positions_A, experts_A.numel() // self.top_k

    def _dropless(
        self,
        x_ND: torch.Tensor,
        *,
        experts_A: torch.Tensor,
        tokens_A: torch.Tensor,
        counts_E: torch.Tensor,
    ) -> torch.Tensor:
        # Skipped random second choices still run (gate 0) so that every row lies in a group:
        # grouped_mm leaves rows past the last offset undefined, forward and backward.
        all_counts_E = torch.zeros_like(counts_E).scatter_add(
            0, experts_A, torch.ones_like(experts_A)
        )
        offs_E = all_counts_E.cumsum(0).to(torch.int32)
        order_A = torch.argsort(experts_A, stable=True)
        x_sorted_AD = x_ND[tokens_A[order_A]]
        y_sorted_AD = self.experts(x_sorted_AD, offs_E, experts_A[order_A])
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        return y_sorted_AD[inverse_A]

    def _with_capacity(
        self,
        x_ND: torch.Tensor,
        *,
        experts_A: torch.Tensor,
        tokens_A: torch.Tensor,
        valid_A: torch.Tensor,
        capacity_factor: float,
        batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, dim = x_ND.shape
        # Position of each assignment in its expert's queue, in slot-major (priority) order.
        position_A, capacity_tokens = self.queue_positions(experts_A, valid_A, batch=batch)
        capacity = expert_capacity(
            self.cfg, num_tokens=capacity_tokens, capacity_factor=capacity_factor
        )
        kept_A = valid_A & (position_A < capacity)
        trash = self.num_experts * capacity
        slot_A = torch.where(kept_A, experts_A * capacity + position_A, trash)
        # Row `trash` collects every dropped assignment and is cut off before the experts.
        buffer_SD = x_ND.new_zeros(trash + 1, dim).index_add(0, slot_A, x_ND[tokens_A])
        offs_E = torch.arange(capacity, trash + 1, capacity, device=x_ND.device, dtype=torch.int32)
        row_experts_M = torch.arange(self.num_experts, device=x_ND.device).repeat_interleave(
            capacity
        )
        y_MD = self.experts(buffer_SD[:trash], offs_E, row_experts_M)
        y_AD = torch.cat([y_MD, y_MD.new_zeros(1, dim)])[slot_A]
        return y_AD, kept_A
