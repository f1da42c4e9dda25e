"""Mixture-of-Experts feed-forward: routers, capacity/dropless dispatch, grouped experts.

Routing (``TopKRouter``): fp32 logits ``x W_g^T``, softmax probabilities, top-k experts.
    switch: top-1, gate = softmax probability (unnormalised);
    gshard: top-2, gates renormalised to sum to 1, optionally a random second expert (kept with
            probability min(1, 2 * g2) in training);
    topk:   general top-k, renormalised unless ``moe.normalize_gates`` is false.

Dispatch (``MoE``), assignments in slot-major order (every token's first choice before any
second choice, as in GShard/Switch, so overflow drops second choices first):
    capacity: each expert takes at most C = ceil(capacity_factor * N * k / E) assignments into a
              zero-padded ``[E * C, D]`` buffer; overflow assignments are dropped, i.e. they add
              nothing and the token rides the residual connection. Static shapes, no host sync.
    dropless: assignments sorted by expert, group offsets from a device-side count; no host sync.
Both feed one grouped matrix product over all experts (``torch._grouped_mm`` with int32 end
offsets); where it is missing, the widths are not 16-byte aligned, or on CUDA in a dtype other
than bf16 (its CUDA kernel's only one), a segment loop over the groups is the fallback (it syncs
once to read the group sizes).

Auxiliary losses: ``aux_loss = E * sum_i f_i * P_i`` with f_i the fraction of the N * k routed
assignments that chose expert i (before dropping; sum_i f_i = 1, so a perfect balance gives 1)
and P_i the mean router probability of expert i; ``z_loss = mean_n logsumexp(logits_n)^2``.
Their weighted sum ``aux_loss_coef * aux_loss + z_loss_coef * z_loss`` is attached to the
layer's output by an identity autograd function whose backward adds ``aux_loss_scale`` times
its gradient (Megatron's MoEAuxLossAutoScaler): the trainer's loss and every pipeline schedule
backpropagate it without plumbing. Each layer keeps its last ``MoEMetrics`` (detached tensors,
no host sync) for logging.

Shape legend:
    B batch, T sequence, N tokens (B*T), D model width, E experts, F expert FFN width,
    K top-k slots, A assignments (K*N, slot-major), C expert capacity, M grouped rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        tokens_per_expert_E: routed assignments per expert before dropping (sums to N * K,
            less GShard's randomly skipped second choices).
        dropped_fraction: dropped / routed assignments (0 when dropless).
        aux_loss: load-balancing loss E * sum_i f_i P_i (unweighted).
        z_loss: router z-loss (unweighted).
    """

    tokens_per_expert_E: torch.Tensor
    dropped_fraction: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


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


def gates_normalized(cfg: ModelConfig) -> bool:
    """Whether top-k gates are renormalised: ``moe.normalize_gates`` or the router's default."""
    if cfg.moe.normalize_gates is not None:
        return cfg.moe.normalize_gates
    return cfg.moe.router != "switch"


def expert_capacity(cfg: ModelConfig, *, num_tokens: int) -> int:
    """Assignments each expert accepts: ceil(capacity_factor * N * K / E), at least 1."""
    moe = cfg.moe
    return max(1, math.ceil(moe.capacity_factor * num_tokens * moe.top_k / moe.num_experts))


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

    def gate_weight(self) -> torch.Tensor:
        """``W_g`` ``[E, D]`` as the forward uses it: a local tensor (under tensor parallel the
        weight is a tp-replicated DTensor applied to replicated tokens; ``parallel/`` may wrap
        this, e.g. to sum its gradient over ranks that route different tokens)."""
        weight = self.gate.weight
        return weight.to_local() if isinstance(weight, DTensor) else weight

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
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        num_experts = cfg.moe.num_experts
        ffn = cfg.moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
        dim = cfg.hidden_size
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, ffn))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, dim)) if self.swiglu else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn)) if cfg.bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if cfg.bias else None

    def forward(
        self,
        x_MD: torch.Tensor,
        *,
        offs_E: torch.Tensor,
        row_experts_M: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply expert e to rows ``offs[e-1]:offs[e]``. Returns ``y_MD``.

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
        else:
            h_MF = F.gelu(h_MF)
        y_MD = self.complete_output(grouped_mm(h_MF, w2.transpose(-2, -1), offs_E=offs_E))
        if b2 is not None:
            y_MD = y_MD + b2[row_experts_M]
        return y_MD

    def expert_weights(self) -> tuple[torch.Tensor | None, ...]:
        """``(w1, w2, w3, b1, b2)`` as the forward uses them (expert parallel: this rank's
        local experts)."""
        return self.w1, self.w2, self.w3, self.b1, self.b2

    def complete_output(self, y_MD: torch.Tensor) -> torch.Tensor:
        """The down projection's output before ``b2``: complete here (tensor parallel inside the
        experts sums the partial products of the F shards)."""
        return y_MD


class MoE(nn.Module):
    """Token-choice MoE feed-forward: ``router`` (TopKRouter) and ``experts`` (GroupedExperts).

    ``forward(x_BTD) -> y_BTD`` where dropped assignments contribute zero (the enclosing block's
    residual carries the token). After each forward ``self.metrics`` holds a ``MoEMetrics``.
    ``aux_loss_scale`` (default 1.0) multiplies the auxiliary gradient: set it to the factor the
    trainer applies to its main loss (e.g. 1 / gradient-accumulation steps).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.moe.num_experts
        self.top_k = cfg.moe.top_k
        self.dropless = cfg.moe.dropless
        self.aux_loss_coef = cfg.moe.aux_loss_coef
        self.z_loss_coef = cfg.moe.z_loss_coef
        self.aux_loss_scale = 1.0
        self.router = TopKRouter(cfg)
        self.experts = GroupedExperts(cfg)
        self.metrics: MoEMetrics | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``x_BTD -> y_BTD`` (see the class docstring)."""
        batch, seq, dim = x_BTD.shape
        x_ND = x_BTD.reshape(-1, dim)
        num_tokens = x_ND.shape[0]
        routing = self.router(x_ND)

        # Slot-major flattening: assignment a = k * N + n.
        experts_A = routing.experts_NK.t().reshape(-1)
        gates_A = routing.gates_NK.t().reshape(-1)
        valid_A = routing.valid_NK.t().reshape(-1)
        tokens_A = torch.arange(num_tokens, device=x_ND.device).repeat(self.top_k)
        counts_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_ND.device)
        counts_E = counts_E.scatter_add(0, experts_A, valid_A.long())

        if self.dropless:
            y_AD = self._dropless(x_ND, experts_A=experts_A, tokens_A=tokens_A, counts_E=counts_E)
            dropped_fraction = x_ND.new_zeros((), dtype=torch.float32)
        else:
            y_AD, kept_A = self._with_capacity(
                x_ND, experts_A=experts_A, tokens_A=tokens_A, valid_A=valid_A
            )
            gates_A = gates_A * kept_A
            dropped_fraction = 1.0 - kept_A.sum() / valid_A.sum().clamp(min=1)

        # Sum over slots in a fixed order (deterministic, unlike a scatter-add of k rows).
        weighted_AD = y_AD * gates_A[:, None].to(y_AD.dtype)
        out_ND = weighted_AD.view(self.top_k, num_tokens, dim).sum(dim=0)
        out_BTD = out_ND.view(batch, seq, dim)

        aux_loss, z_loss = self._aux_losses(routing, counts_E=counts_E)
        self.metrics = MoEMetrics(
            tokens_per_expert_E=counts_E.detach(),
            dropped_fraction=dropped_fraction.detach().float(),
            aux_loss=aux_loss.detach(),
            z_loss=z_loss.detach(),
        )
        weighted = self.aux_loss_coef * aux_loss + self.z_loss_coef * z_loss
        if torch.is_grad_enabled() and weighted.requires_grad:
            out_BTD = _AttachAuxLoss.apply(out_BTD, weighted, self.aux_loss_scale)
        return out_BTD

    def _aux_losses(
        self, routing: Routing, *, counts_E: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counts_E, probs_E, z_sum, num_tokens = self._routing_totals(
            counts_E,
            routing.probs_NE.sum(dim=0),
            torch.logsumexp(routing.logits_NE, dim=-1).pow(2).sum(),
            routing.probs_NE.shape[0],
        )
        f_E = counts_E.float() / counts_E.sum().clamp(min=1).float()
        p_E = probs_E / num_tokens
        aux_loss = self.num_experts * (f_E * p_E).sum()
        return aux_loss, z_sum / num_tokens

    def _routing_totals(
        self, counts_E: torch.Tensor, probs_E: torch.Tensor, z_sum: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The routing statistics the aux and z losses are taken over (tokens per expert,
        router probability sums, squared-logsumexp sum, tokens): this layer's own tokens; a
        layer whose tokens are split over ranks sums them (``parallel.expert_parallel``)."""
        return counts_E, probs_E, z_sum, num_tokens

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
        y_sorted_AD = self.experts(x_sorted_AD, offs_E=offs_E, row_experts_M=experts_A[order_A])
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, dim = x_ND.shape
        capacity = expert_capacity(self.cfg, num_tokens=num_tokens)
        # A comparison, not F.one_hot: off CUDA that reads the ids' min and max on the host.
        experts_E = torch.arange(self.num_experts, device=x_ND.device)
        onehot_AE = ((experts_A[:, None] == experts_E) & valid_A[:, None]).long()
        # Position of each assignment in its expert's queue, in slot-major (priority) order.
        position_A = (onehot_AE.cumsum(dim=0) - 1).gather(1, experts_A[:, None]).squeeze(1)
        kept_A = valid_A & (position_A < capacity)
        trash = self.num_experts * capacity
        slot_A = torch.where(kept_A, experts_A * capacity + position_A, trash)
        # Row `trash` collects every dropped assignment and is cut off before the experts.
        buffer_SD = x_ND.new_zeros(trash + 1, dim).index_add(0, slot_A, x_ND[tokens_A])
        offs_E = torch.arange(capacity, trash + 1, capacity, device=x_ND.device, dtype=torch.int32)
        row_experts_M = torch.arange(self.num_experts, device=x_ND.device).repeat_interleave(
            capacity
        )
        y_MD = self.experts(buffer_SD[:trash], offs_E=offs_E, row_experts_M=row_experts_M)
        y_AD = torch.cat([y_MD, y_MD.new_zeros(1, dim)])[slot_A]
        return y_AD, kept_A
