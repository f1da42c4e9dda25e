"""The training loop: mesh -> model -> parallelize -> loader -> optimizer -> loop.

One step: ``train.grad_accum`` micro-batches (forward, loss, backward), a data-parallel loss
reduction, a NaN/Inf guard (a non-finite step skips its update), gradient clipping over every
mesh axis, AdamW and the LR schedule; every ``logging.every`` steps a metrics line; every
``train.eval_every`` steps a validation loss per language; every ``checkpoint.every`` steps (and
at the end, and on SIGTERM/SIGUSR1) a checkpoint.

Exit codes (``pretrain.train``): 0 done, 2 bad config or input, 3 stopped on too many NaN/Inf
losses in a row, or at a save (periodic, final or on a signal) refused because the loss,
parameters or optimizer state are not finite: nothing non-finite is ever saved
(``EXIT_DIVERGED``), 75 stopped by SIGTERM/SIGUSR1 after checkpointing
(``EXIT_PREEMPTED``; the SLURM script requeues the job, which resumes with ``train.resume=auto``).

Loss normalisation: one rule for every layout. Before the backward, each step counts N, the
predicted tokens (labels other than ``IGNORE_INDEX``) of all its micro-batches on all dp ranks,
from the CPU batches' labels (no device sync) and one all-reduce over ``dp``. Each micro-batch
loss is its summed per-token loss over N, times ``dp`` (the data-parallel engines, FSDP2, HSDP
and DDP, average gradients over ``dp``), so the gradient is that of one process on the
concatenated global batch whatever the split into micro-batches, ranks and pipeline
microbatches, even when their target counts differ (MLM masks, TLM padding). Under tensor
parallel the summed cross-entropy runs inside ``loss_parallel``; under pipeline parallel the
schedule's loss gets N and the ``dp`` factor (``parallel.pipeline.pipeline_step``). The logged
loss is the same token-weighted mean over the step; train loss per language and objective
comes from the same per-token losses under every layout. MoE auxiliary losses reach the
gradient through the layers themselves, per forward, scaled by ``1 / grad_accum`` (times ``1 /
parallel.microbatches`` under pipeline parallel).
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.mesh import ParallelDims
from parallel.parallelize import (
    clip_grad_norm_,
    local_value,
    loss_context,
    parallelize_model,
    reduce_metric,
)
from parallel.pipeline import build_pipeline, pipeline_step
from pretrain.checkpoint import (
    CheckpointManager,
    TrainState,
    check_compatible,
    holds_earlier_run,
    latest_loadable,
    move_run_dir_aside,
    rng_state,
    set_rng_state,
)
from pretrain.config import RunConfig, config_to_dict, config_to_yaml, save_config, starts_afresh
from pretrain.data import (
    build_train_loader,
    build_valid_loaders,
    check_num_languages,
    loader_rank_state,
    loader_resume_state,
)
from pretrain.flops import flops_per_token, mfu, peak_flops
from pretrain.logger import RunLogger
from pretrain.models import (
    build_model,
    param_counts,
    pipeline_stage_layers,
    prune_to_stage,
    tp_plan,
)
from pretrain.models.transformer import is_moe_layer
from pretrain.objectives.losses import IGNORE_INDEX, chunked_cross_entropy
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.plots import plot_run
from pretrain.preemption import EXIT_DIVERGED, EXIT_PREEMPTED, NonFiniteGuard, PreemptionHandler


def device_type(name: str) -> str:
    """The kind of device ``train.device`` names: ``cuda``, or ``cpu`` (``auto``: CUDA when
    this machine has it)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else the CPU."""
    if device_type(name) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device ({name!r}) needs CUDA, and this machine has none")
    rank = dist.get_rank() if dist.is_initialized() else 0
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on the CPU (bf16 matmuls are ~100x slower there)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def non_embedding_params(model: torch.nn.Module, *, active: int) -> int:
    """Active parameters less the lookup tables; a tied output projection still multiplies."""
    tables = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    )
    tied = 0
    if getattr(model, "output", None) is None and getattr(model, "tok_embeddings", None):
        tied = model.tok_embeddings.weight.numel()
    return active - tables + tied


class Trainer:
    """Owns one run's parts; :meth:`fit` runs it. Every rank builds one."""

    def __init__(self, cfg: RunConfig, *, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.run_dir = Path(cfg.train.run_dir)
        self.device = resolve_device(cfg.train.device)
        if cfg.model.attention == "flex" and self.device.type != "cuda":
            raise ValueError(
                f"model.attention (flex) needs a CUDA device to train on (train.device is "
                f"{cfg.train.device!r}, resolved to {self.device.type}): FlexAttention has no CPU "
                "backward; use auto or sdpa"
            )
        self.precision = resolve_precision(cfg.train.precision, self.device)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)

        self.dims = ParallelDims.from_config(cfg.parallel, world_size=world_size)
        self.dims.build_mesh(device_type=self.device.type)
        # The loader first (it reads the manifest and tokenizer, nothing more): the run's
        # language index must fit the model before the model is built.
        self.loader = build_train_loader(
            cfg, dp_rank=self.dims.dp_rank, dp_world_size=self.dims.dp_world_size
        )
        self.languages = list(self.loader.dataset.languages)
        check_num_languages(cfg, self.languages)
        with torch.device("meta"):
            model = build_model(cfg.model)
        counts = param_counts(model)
        self.params_total = counts["params_total"]
        self.params_active = counts["params_active"]
        self.flops_per_token = flops_per_token(
            non_embedding_params(model, active=self.params_active),
            num_layers=cfg.model.num_layers,
            hidden_size=cfg.model.hidden_size,
            seq_len=cfg.data.seq_len,
        )
        self.pipeline = None
        if self.dims.pp > 1:
            self.pipeline, parts, self.pipeline_info = build_pipeline(
                self._build_stage,
                dims=self.dims,
                cfg=cfg.parallel,
                tp_plan=tp_plan(cfg.model),
                seed=cfg.train.seed,
                token_loss_fn=self._token_losses,
                device=self.device,
            )
        else:
            parts = [
                parallelize_model(
                    model,
                    dims=self.dims,
                    cfg=cfg.parallel,
                    tp_plan=tp_plan(cfg.model),
                    seed=cfg.train.seed,
                    device=self.device,
                )
            ]
        self.parts = parts
        self.model = parts[0]
        for part in parts:
            part.train()
        self.optimizers = [
            build_optimizer(part, cfg.optim, device_type=self.device.type) for part in parts
        ]
        self.schedulers = [
            build_scheduler(opt, cfg.optim, total_steps=cfg.train.steps) for opt in self.optimizers
        ]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        # A fused AdamW skips a non-finite step's update on the device: no host sync needed.
        self.sync_free = self.scaler is None and all(
            opt.defaults.get("fused") for opt in self.optimizers
        )
        # Row kinds the loss is reported by: CLM rows, or MLM and TLM rows of an encoder batch.
        self.objective_names = ["clm", "clm"] if cfg.model.family == "decoder" else ["mlm", "tlm"]
        # Loss groups: objective index * languages + language index (``_forward_loss``).
        self.num_groups = len(self.objective_names) * len(self.languages)
        self.state = TrainState(self.parts, self.optimizers, self.schedulers, step=0)
        self.checkpoints = CheckpointManager(
            self.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        peak = peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            override_tflops=cfg.logging.peak_tflops,
        )
        self.peak_flops = peak
        self.guard = NonFiniteGuard(max_consecutive=cfg.train.max_nonfinite_steps)
        # Every MoE layer of the whole model (pipeline stages hold some of them).
        self.moe_layer_names = [
            f"layers.{i}.moe"
            for i in range(cfg.model.num_layers)
            if is_moe_layer(cfg.model, layer=i)
        ]
        for part in self.parts:
            if hasattr(part, "track_moe_languages") and self.moe_layer_names:
                part.track_moe_languages(len(self.languages))
        self.preemption = PreemptionHandler()

    # ------------------------------------------------------------------------------------------

    def _build_stage(self, stage: int, num_stages: int) -> torch.nn.Module:
        """Pipeline stage ``stage`` of ``num_stages`` on the meta device (names kept)."""
        cfg = self.cfg
        with torch.device("meta"):
            model = build_model(cfg.model)
        if cfg.parallel.stage_layers is not None:
            bounds = [0]
            for count in cfg.parallel.stage_layers:
                bounds.append(bounds[-1] + count)
            keys = [str(i) for i in range(bounds[stage], bounds[stage + 1])]
        else:
            keys = pipeline_stage_layers(cfg.model, num_stages=num_stages)[stage]
        prune_to_stage(model, layer_keys=keys, first=stage == 0, last=stage == num_stages - 1)
        return model

    def _token_losses(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Per-token loss ``[B * T]`` (0 where nothing is predicted; labels already shifted for
        CLM). Under tensor parallel the logits are a vocabulary-sharded DTensor and this runs
        inside ``loss_parallel`` (a replicated DTensor comes back)."""
        return F.cross_entropy(
            logits_BTV.flatten(0, 1).float(),
            labels_BT.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )

    def _num_targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predicted tokens of a batch, from its CPU labels (an int64 CPU scalar: no device
        sync); CLM's last position predicts nothing."""
        labels = batch["labels"]
        if self.cfg.model.family == "decoder":
            labels = labels[:, 1:]
        return (labels != IGNORE_INDEX).sum()

    def _target_groups(
        self, batch: dict[str, Any], kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``[B, T]`` int64 loss group of every position's target on the device: objective
        index * languages + language index. Each target token's language (TLM rows hold two)
        and its row's objective (a TLM row mixes languages; the rest are monolingual)."""
        lang_ids = kwargs.get("lang_ids_BT")
        if lang_ids is None:
            lang_ids = self._on_device(batch["lang_ids"])
        tokens_mask = self._on_device(batch["attention_mask"]).bool()
        is_tlm_B = ((lang_ids != lang_ids[:, :1]) & tokens_mask).any(dim=1)
        if self.cfg.model.family == "decoder":
            lang_ids = torch.cat([lang_ids[:, 1:], lang_ids[:, -1:]], dim=1)
        objective_BT = is_tlm_B.long()[:, None].expand_as(lang_ids)
        return objective_BT * len(self.languages) + lang_ids.long()

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the training device. On CUDA the copy goes through pinned memory:
        a copy from pageable memory first waits for the stream's queued work (a hidden host
        sync that would stop the host running ahead of the GPU); from pinned memory it is
        queued like a kernel. The caller's CPU tensor is left as it is."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _shifted_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        # The loader's labels are int32; cross-entropy wants int64 targets: widened on the
        # device, after the copy, so the host moves half the bytes.
        labels = self._on_device(batch["labels"]).long()
        if self.cfg.model.family == "decoder":
            # Position t predicts token t + 1; the last position predicts nothing.
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        return labels

    def _model_kwargs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch's per-token model inputs beside the token ids, on the device: positions,
        document ids (``model.document_masking``), language ids (``model.num_languages``).

        Padding (TLM rows) is masked whatever ``model.document_masking`` says: without
        document masking a padded batch still gets document ids, 0 on every token and -1 on
        padding, so real tokens attend to the whole row but never to padding. (The check
        reads the CPU batch: no device sync.)
        """
        cfg = self.cfg
        # Only what the model takes goes to the device, each tensor once.
        wanted = {"position_ids": "position_ids_BT"}
        if cfg.model.document_masking:
            wanted["doc_ids"] = "document_ids_BT"
        if cfg.model.num_languages or cfg.model.moe.num_experts:
            # Language embeddings, and MoE expert load by language.
            wanted["lang_ids"] = "lang_ids_BT"
        kwargs = {
            arg: self._on_device(batch[key])
            for key, arg in wanted.items()
            if batch.get(key) is not None
        }
        pad_mask = batch.get("attention_mask")
        if "document_ids_BT" not in kwargs and pad_mask is not None and not bool(pad_mask.all()):
            kwargs["document_ids_BT"] = self._on_device(
                torch.where(pad_mask.bool(), 0, -1).to(torch.int32)
            )
        return kwargs

    def _pipeline_loss(
        self,
        batch: dict[str, Any],
        *,
        backward: bool,
        num_targets: torch.Tensor | float,
        grad_scale: float = 1.0,
        groups: bool = False,
    ) -> torch.Tensor:
        """One schedule step over the batch's microbatches (forward only without ``backward``);
        the batch's summed loss over ``num_targets`` on every pp rank (each microbatch's loss
        also times ``grad_scale``: ``parallel.pipeline.pipeline_step``). With ``groups`` the
        per-group loss sums and target counts are ``self.pipeline_info.loss_fn.group_sums_G``
        / ``group_counts_G`` afterwards, on every pp rank.

        Positions, document ids and language ids (:meth:`_model_kwargs`) go to every stage as
        keyword arguments of ``schedule.step``, split into microbatches like the token ids.
        """
        kwargs = self._model_kwargs(batch)
        with self._autocast():
            return pipeline_step(
                self.pipeline,
                info=self.pipeline_info,
                dims=self.dims,
                inputs=self._on_device(batch["input_ids"]),
                targets=self._shifted_labels(batch),
                stage_kwargs=kwargs,
                ignore_index=IGNORE_INDEX,
                backward=backward,
                num_targets=num_targets,
                grad_scale=grad_scale,
                groups_BT=self._target_groups(batch, kwargs) if groups else None,
                num_groups=self.num_groups,
            )

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def _forward_loss(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Summed loss of one micro-batch over its predicted tokens (the caller normalises it)
        and, per (objective, language) group, the loss sums and predicted-token counts as
        ``[groups]`` fp32 device tensors (group = objective index * languages + language
        index: :meth:`_target_groups`).

        Under tensor parallel the logits are vocabulary-sharded and the loss is taken inside
        ``loss_context`` (the caller runs backward inside it too): per-token losses with
        ``reduction="none"`` (a replicated DTensor), summed for the loss and binned per group.
        """
        cfg = self.cfg
        input_ids = self._on_device(batch["input_ids"])
        labels = self._shifted_labels(batch)
        kwargs = self._model_kwargs(batch)
        group_N = self._target_groups(batch, kwargs).flatten()
        labels_N = labels.flatten()
        valid_N = labels_N != IGNORE_INDEX
        zeros_G = torch.zeros(self.num_groups, dtype=torch.float32, device=labels.device)
        with self._autocast():
            if self.dims.tp > 1:
                logits_BTV = self.model(input_ids, **kwargs)
                loss_N = self._token_losses(logits_BTV, labels)
                sums_G = zeros_G.index_add(0, group_N, local_value(loss_N.detach()).float())
                counts_G = zeros_G.index_add(0, group_N, valid_N.float())
                return loss_N.sum(), (sums_G, counts_G)
            hidden_BTD = self.model(input_ids, return_hidden=True, **kwargs)
            weight_VD, bias_V = self.model.output_projection()
        # Sums per (objective, language) from one pass; only positions with a target are
        # projected.
        hidden_ND = hidden_BTD.flatten(0, 1)
        if cfg.model.family == "encoder":
            # MLM predicts ~15% of the positions: project only those (one host sync for the
            # count). CLM predicts nearly every position, so the decoder projects all of them
            # and ignored positions add 0: no sync.
            targets_M = valid_N.nonzero().squeeze(1)
            hidden_ND, labels_N, group_N = (
                hidden_ND[targets_M],
                labels_N[targets_M],
                group_N[targets_M],
            )
            valid_N = valid_N[targets_M]
        with self._autocast():
            sums_G = chunked_cross_entropy(
                hidden_ND,
                labels_N,
                weight_VD,
                bias_V=bias_V,
                chunk_tokens=cfg.objective.loss_chunk_tokens,
                reduction="sum",
                group_N=group_N,
                num_groups=self.num_groups,
            )
        counts_G = zeros_G.index_add(0, group_N, valid_N.float())
        return sums_G.sum(), (sums_G.detach(), counts_G)

    def _step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over the micro-batches.

        Without host syncs when the optimizer is fused and there is no GradScaler
        (``self.sync_free``; CUDA's default): the loss, grad norm and group sums stay device
        tensors, a non-finite loss skips the update on the device (the fused AdamW's
        ``found_inf``), and :meth:`_settle` reads them later. Otherwise the step settles itself.
        """
        accum = len(batches)
        # Each forward's aux loss weighs 1 / (its share of the step's forwards): pipeline
        # microbatches count too (the schedule does not scale gradients).
        forwards = accum * (self.pipeline_info.microbatches if self.pipeline is not None else 1)
        for part in self.parts:
            if hasattr(part, "set_moe_aux_loss_scale"):
                part.set_moe_aux_loss_scale(1.0 / forwards)
        # N: the step's predicted tokens over every micro-batch and dp rank, from the CPU
        # labels and one all-reduce (module docstring). Each micro-batch's summed loss is
        # divided by N and multiplied by dp, which the data-parallel engines divide by.
        dp = self.dims.dp
        num_targets = reduce_metric(
            sum(self._num_targets(batch) for batch in batches), dims=self.dims, op="sum"
        )
        num_targets = num_targets.clamp(min=1)
        inv_targets = self._on_device((1.0 / num_targets.double()).float())
        if self.pipeline is not None:
            num_targets = self._on_device(num_targets.float())
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        group_sums = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        group_counts = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        tokens = 0
        for batch in batches:
            tokens += int(batch["input_ids"].numel())
            if self.pipeline is not None:
                loss_sum += self._pipeline_loss(
                    batch,
                    backward=True,
                    num_targets=num_targets,
                    grad_scale=float(dp),
                    groups=True,
                ).float()
                group_sums += self.pipeline_info.loss_fn.group_sums_G
                group_counts += self.pipeline_info.loss_fn.group_counts_G
                continue
            with loss_context(self.dims):
                loss, groups = self._forward_loss(batch)
                scaled = loss * (inv_targets * dp)
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += local_value(loss).detach().float() * inv_targets
            group_sums += groups[0]
            group_counts += groups[1]
        loss = reduce_metric(loss_sum, dims=self.dims, axis="dp", op="sum")
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        out = {
            "tokens": tokens,
            "group_sums": group_sums,
            "group_counts": group_counts,
        }
        if self.sync_free:
            # Clipping a non-finite step's gradients is harmless: its update is skipped.
            grad_norm = clip_grad_norm_(self.parts, max_norm=max_norm, dims=self.dims)
            found_inf = (~torch.isfinite(loss)).float().reshape(())
            for optimizer in self.optimizers:
                optimizer.grad_scale, optimizer.found_inf = None, found_inf
                optimizer.step()
            out.update(loss=loss, grad_norm=grad_norm, settled=False)
        else:
            loss_value = float(loss)
            finite = self.guard.check(loss_value)
            grad_norm = float("nan")
            if finite:
                grad_norm = float(clip_grad_norm_(self.parts, max_norm=max_norm, dims=self.dims))
                for optimizer in self.optimizers:
                    if self.scaler is not None:
                        self.scaler.step(optimizer)
                    else:
                        optimizer.step()
                if self.scaler is not None:
                    self.scaler.update()
            out.update(loss=loss_value, grad_norm=grad_norm, settled=True)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return out

    def _settle(self, out: dict[str, Any]) -> None:
        """Read a sync-free step's loss and grad norm (waiting for its work) and count it in the
        NaN guard; a step that settled itself is left alone. Steps settle in order."""
        if out["settled"]:
            return
        loss = float(out["loss"])
        out["loss"] = loss
        out["grad_norm"] = float(out["grad_norm"]) if self.guard.check(loss) else float("nan")
        out["settled"] = True

    # ------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        from pretrain.checkpoint import rank_zero_result
        from pretrain.data import read_resume_rank_states

        mode = self.cfg.train.resume
        if mode == "none":
            return
        if mode == "auto":
            # An async save whose write finished before a crash is completed first; rank 0
            # alone checks the candidates (reading each rank file once) and tells the others.
            self.checkpoints.recover()
            path, notes = rank_zero_result(latest_loadable, self.run_dir / "checkpoints")
            self.resume_notes += notes
        else:
            path = Path(mode)
        if path is None:
            return
        if mode != "auto" and not (path / ".metadata").is_file():
            raise ValueError(f"train.resume ({mode!r}) is not a complete checkpoint directory")
        check_compatible(path, config_to_dict(self.cfg)["model"])
        # The optimizer as this run's optim.* built it, before the checkpoint's groups land.
        fresh_groups = [
            [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            for opt in self.optimizers
        ]
        self.checkpoints.load(path, self.state, ranks=[])
        self._apply_optim_config(path, fresh_groups)
        # One loader state per old dp rank (tp/pp/ep peers saved the same one): this dp
        # rank's own when the dp layout is unchanged, else all of them for the loader to
        # re-deal; none for an imported model (import-hf: weights only, data from the start).
        # Each rank reads only the rank files it needs (its own for the RNG, the holders of
        # those loader states) when the checkpoint has a rank index.
        dp = {
            "dp_rank": self.dims.dp_rank,
            "dp_world_size": self.dims.dp_world_size,
            "num_workers": self.cfg.data.num_workers,
        }
        rank_states, index, same_world = read_resume_rank_states(
            path, rank=self.rank, world_size=self.world_size, **dp
        )
        loader_state = loader_resume_state(rank_states, **dp, index=index)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        own = rank_states.get(self.rank)
        if own is not None and same_world:
            set_rng_state(own["rng"])
        self.resumed_from = path

    def _apply_optim_config(self, path: Path, fresh_groups: list[list[dict]]) -> None:
        """Give the resumed optimizers and schedulers this run's ``optim.*``: the checkpoint
        brings the moments, step counts and schedule position, the config every
        hyper-parameter (lr, betas, eps, weight decay, fused) and the schedule itself; a note
        names what differs from the checkpoint's config."""
        import yaml

        before = {
            "optim.lr": self.optimizers[0].param_groups[0].get("initial_lr"),
            "optim.weight_decay": self.optimizers[0].param_groups[0].get("weight_decay"),
        }
        for optimizer, scheduler, groups in zip(self.optimizers, self.schedulers, fresh_groups):
            for group, hyper in zip(optimizer.param_groups, groups):
                group.update(hyper)
                on_device = bool(group.get("fused") or group.get("capturable"))
                for param in group["params"]:
                    state = optimizer.state.get(param, {})
                    if torch.is_tensor(state.get("step")):
                        # Where the (possibly switched) fused/foreach kernel wants the count.
                        device = param.device if on_device else torch.device("cpu")
                        state["step"] = state["step"].to(device=device, dtype=torch.float32)
            scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
            lrs = [
                base * fn(scheduler.last_epoch)
                for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)
            ]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
        saved_cfg = path / "config.yaml"
        ours = config_to_dict(self.cfg)["optim"]
        if saved_cfg.is_file():
            theirs = (yaml.safe_load(saved_cfg.read_text(encoding="utf-8")) or {}).get("optim", {})
            changes = [
                f"optim.{key} {theirs[key]} -> {value}"
                for key, value in ours.items()
                if key in theirs and theirs[key] != value
            ]
        else:
            changes = [
                f"{key} {value} -> {ours[key.split('.')[1]]}"
                for key, value in before.items()
                if value is not None and value != ours[key.split(".")[1]]
            ]
        if changes:
            self.resume_notes.append(
                f"optim.* differs from checkpoint {path}; this run uses its own: "
                + ", ".join(changes)
            )

    @torch.no_grad()
    def _nonfinite_state(self) -> str | None:
        """What holds NaN/Inf on any rank: ``"parameters"``, ``"optimizer state"``, both, or
        None (a collective over every rank: each checks its own shards).

        Checked at every save, not only the last loss: with a finite loss a step's update can
        still write NaN into the weights (a NaN weight decay, a NaN gradient of a finite loss).
        """
        from torch.distributed.tensor import DTensor

        def bad(tensor: torch.Tensor) -> torch.Tensor:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            return (~torch.isfinite(local)).any().float().to(self.device)

        flags = torch.zeros(2, dtype=torch.float32, device=self.device)
        for part in self.parts:
            for param in part.parameters():
                flags[0] += bad(param)
        for optimizer in self.optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value) and value.is_floating_point():
                        flags[1] += bad(value)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        names = [n for n, f in zip(("parameters", "optimizer state"), flags.tolist()) if f > 0]
        return " and ".join(names) or None

    def _save(self, step: int) -> str | None:
        """Checkpoint ``step`` unless the state is not finite (every rank calls it).

        Returns:
            None when saved; else why nothing was saved (the last good checkpoint stays).
        """
        if self.guard.consecutive:
            return f"the loss of step {step} was NaN/Inf"
        bad = self._nonfinite_state()
        if bad is not None:
            return f"the {bad} hold NaN/Inf after step {step}"
        self.state.step = step
        loader_state = loader_rank_state(
            self.loader,
            dp_rank=self.dims.dp_rank,
            dp_world_size=self.dims.dp_world_size,
            num_workers=self.cfg.data.num_workers,
        )
        self.checkpoints.save(
            step,
            self.state,
            rank_state={"rng": rng_state(), **loader_state},
            config_yaml=config_to_yaml(self.cfg),
            index_entry={"dp": loader_state["dp"]},
        )

    def _validate(self) -> dict[str, float]:
        """Mean validation loss per language over ``train.eval_batches`` held-out batches
        (through every pipeline stage, forward only, under pipeline parallel)."""
        valid = build_valid_loaders(
            self.cfg, dp_rank=self.dims.dp_rank, dp_world_size=self.dims.dp_world_size
        )
        if not valid:
            return {}
        for part in self.parts:
            part.eval()
        result = {}
        with torch.no_grad():
            for lang, batches in sorted(valid.items()):
                total = torch.zeros((), dtype=torch.float32, device=self.device)
                count = torch.zeros((), dtype=torch.float32, device=self.device)
                for batch in batches:
                    # Summed losses and target counts: a token-weighted mean per language.
                    if self.pipeline is not None:
                        loss = self._pipeline_loss(batch, backward=False, num_targets=1.0)
                    else:
                        with loss_context(self.dims):
                            loss, _ = self._forward_loss(batch)
                    total += local_value(loss).float()
                    count += self._num_targets(batch).float().to(self.device)
                total = reduce_metric(total, dims=self.dims, axis="dp", op="sum")
                count = reduce_metric(count, dims=self.dims, axis="dp", op="sum")
                result[lang] = float(total / count.clamp(min=1))
        for part in self.parts:
            part.train()
        return result

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def _moe_metrics(self) -> dict[str, Any]:
        """MoE routing over the log window: every micro-batch of every step since the last log
        line, every pipeline stage, every data-parallel rank (the layers' ``MoEStats``, read and
        reset here). Padding is not routed, so it counts nowhere.

        Keys: ``moe_aux_loss`` / ``moe_z_loss`` (mean over layers of each layer's mean
        unweighted loss), ``moe_routed`` (routed assignments, all layers: tokens x top-k x MoE
        layers, less GShard's skipped second choices), ``moe_dropped_fraction`` (dropped /
        routed assignments, all layers),
        ``moe_expert_load`` (share of routed assignments per expert, all layers) and
        ``moe_load_by_lang`` (per layer, per language: the share of that language's routed
        assignments sent to each expert).
        """
        names = self.moe_layer_names
        if not names:
            return {}
        stats = {}
        for part in self.parts:
            if hasattr(part, "moe_stats"):
                stats.update(part.moe_stats(reset=True))
        num_experts = self.cfg.model.moe.num_experts
        num_langs = len(self.languages)
        # One float64 row per layer (a fixed table: every rank reduces the same shape):
        # [tokens per expert (E) | routed, dropped, aux sum, z sum, forwards | by language (L*E)]
        width = num_experts + 5 + num_langs * num_experts
        rows = []
        for name in names:
            layer = stats.get(name)
            if layer is None:  # on another pipeline stage, or no forward in the window
                rows.append(torch.zeros(width, dtype=torch.float64, device=self.device))
                continue
            by_lang = layer.load_by_lang_LE
            if by_lang is None:
                by_lang = torch.zeros(num_langs, num_experts, device=self.device)
            parts = [layer.tokens_per_expert_E, layer.num_routed, layer.num_dropped]
            parts += [layer.aux_loss_sum, layer.z_loss_sum, layer.num_forwards, by_lang]
            rows.append(torch.cat([t.reshape(-1).to(self.device, torch.float64) for t in parts]))
        table = torch.stack(rows).cpu()
        # Ranks with other tokens add up: dp always; tp where each tp rank routes its own chunk
        # (ep_over_tp; the loss sums are then global on every tp rank, and the forward counts
        # add up alike, so their ratio stays the mean); pp holds disjoint layers.
        table = reduce_metric(table, dims=self.dims, axis="dp", op="sum")
        if self.dims.ep_over_tp:
            table = reduce_metric(table, dims=self.dims, axis="tp", op="sum")
        if self.dims.pp > 1:
            table = reduce_metric(table, dims=self.dims, axis="pp", op="sum")
        experts = table[:, :num_experts]
        routed, dropped, aux, z, forwards = table[:, num_experts : num_experts + 5].unbind(1)
        seen = forwards > 0
        if not bool(seen.any()):
            return {}
        load = experts.sum(0)
        by_lang = table[:, num_experts + 5 :].reshape(len(names), num_langs, num_experts)
        load_by_lang = {}
        for index, name in enumerate(names):
            shares = {}
            for lang_index, lang in enumerate(self.languages):
                counts = by_lang[index, lang_index]
                if counts.sum() > 0:
                    shares[lang] = [round(float(x), 4) for x in counts / counts.sum()]
            if shares:
                load_by_lang[name] = shares
        out: dict[str, Any] = {
            "moe_aux_loss": float((aux[seen] / forwards[seen]).mean()),
            "moe_z_loss": float((z[seen] / forwards[seen]).mean()),
            "moe_routed": int(routed.sum()),
            "moe_dropped_fraction": float(dropped.sum() / routed.sum().clamp(min=1)),
            "moe_expert_load": [round(float(x), 4) for x in load / load.sum().clamp(min=1)],
        }
        if load_by_lang:
            out["moe_load_by_lang"] = load_by_lang
        return out

    def fit(self) -> int:
        """Train to ``train.steps``; returns the process exit code."""
        cfg = self.cfg
        self.resumed_from = None
        self.resume_notes: list[str] = []  # corrupt checkpoints passed over, optim.* changes
        self._resume()
        start = self.state.step
        logger = RunLogger(
            self.run_dir,
            rank=self.rank,
            cfg=cfg.logging,
            total_steps=cfg.train.steps,
            start_step=start,
        )
        for note in self.resume_notes:
            logger.info(note)
        if self.resumed_from is not None:
            logger.info(f"resumed from {self.resumed_from} at step {start}")
        logger.info(
            f"model: {self.params_total:,} parameters ({self.params_active:,} active); "
            f"layout {self.dims.degrees()}; device {self.device}; precision {self.precision}"
        )
        self.preemption.install()
        exit_code = 0
        batches = iter(self.loader)
        window_tokens, window_start = 0, time.perf_counter()
        window_sums = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        window_counts = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        window_lang_tokens: dict[str, int] = defaultdict(int)
        pending = None  # the previous step's output, read once this step's work is queued
        saved_step = start  # the step of the newest checkpoint (a resumed one counts)
        try:
            step = start
            last = cfg.train.stop_at or cfg.train.steps
            while step < last:
                micro = [next(batches) for _ in range(cfg.train.grad_accum)]
                for batch in micro:
                    for index, count in enumerate(batch["tokens_per_lang"].tolist()):
                        if count:
                            window_lang_tokens[self.languages[index]] += int(count)
                out = self._step(micro)
                step += 1
                window_tokens += out["tokens"]
                window_sums += out["group_sums"]
                window_counts += out["group_counts"]
                if pending is not None:
                    self._settle(pending)
                    if self.guard.diverged:  # the previous step's loss, read a step late
                        logger.info(self.guard.message(step - 1))
                        exit_code = EXIT_DIVERGED
                        break
                pending = out
                # Never checkpoint inside a run of non-finite losses: the last checkpoint
                # stays one taken after a good step.
                periodic = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                log_now = step % cfg.logging.every == 0 or step == last
                stop = self.preemption.should_stop()
                if periodic or log_now or stop or step == last:
                    self._settle(out)
                if self.guard.diverged:
                    logger.info(self.guard.message(step))
                    exit_code = EXIT_DIVERGED
                    break
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    global_tokens = float(
                        reduce_metric(float(window_tokens), dims=self.dims, op="sum")
                    )
                    tokens_per_s = global_tokens / max(elapsed, 1e-9)
                    metrics: dict[str, Any] = {
                        "loss": out["loss"],
                        "lr": self.schedulers[0].get_last_lr()[0],
                        "grad_norm": out["grad_norm"],
                        "tokens_per_s": tokens_per_s,
                        "memory_gib": self._memory_gib(),
                        "skipped_steps": self.guard.total,
                        # Samples of corrupt shards skipped so far (data.on_bad_shard=skip),
                        # summed over dp ranks; 0 on clean data.
                        "bad_samples": int(
                            reduce_metric(
                                float(self.loader.counters["bad_samples"]),
                                dims=self.dims,
                                op="sum",
                            )
                        ),
                    }
                    if self.peak_flops is not None:
                        metrics["mfu"] = mfu(
                            tokens_per_s / self.world_size,
                            flops_per_token=self.flops_per_token,
                            peak=self.peak_flops,
                        )
                    metrics.update(
                        self._language_metrics(window_sums, window_counts, window_lang_tokens)
                    )
                    metrics.update(self._moe_metrics())
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        valid = self._validate()
                        if valid:
                            metrics["valid_loss_per_lang"] = valid
                            metrics["valid_loss"] = sum(valid.values()) / len(valid)
                    logger.log(metrics, step)
                    window_tokens, window_start = 0, time.perf_counter()
                    window_sums.zero_()
                    window_counts.zero_()
                    window_lang_tokens.clear()
                else:
                    logger.advance(step)
                # No save of non-finite state, ever: a refused save stops the run (exit 3)
                # with the last good checkpoint intact; inside a run of non-finite losses a
                # periodic save waits for a good step.
                refused = None
                if periodic and self.guard.consecutive == 0:
                    refused = self._save(step)
                    saved_step = step if refused is None else saved_step
                if stop and refused is None and saved_step != step:
                    refused = self._save(step)
                if refused is not None:
                    logger.info(f"not saving step {step}: {refused}; stopping with the last good "
                                "checkpoint intact")  # fmt: skip
                    exit_code = EXIT_DIVERGED
                    break
                if stop:
                    self.checkpoints.close()
                    logger.info(f"stop signal received: checkpointed step {step}, exiting")
                    exit_code = EXIT_PREEMPTED
                    break
            else:
                refused = self._save(step) if saved_step != step else None
                if refused is not None:
                    logger.info(f"not saving step {step}: {refused}; stopping with the last good "
                                "checkpoint intact")  # fmt: skip
                    exit_code = EXIT_DIVERGED
                if exit_code == 0 and last < cfg.train.steps:
                    logger.info(
                        f"train.stop_at reached: checkpointed step {step} of {cfg.train.steps}"
                    )
            self.checkpoints.close()
        finally:
            self.preemption.uninstall()
            logger.close()
        if self.rank == 0 and (self.run_dir / "metrics.jsonl").exists():
            written = plot_run(self.run_dir / "metrics.jsonl", self.run_dir)
            if exit_code == 0:
                print(f"loss curves: {', '.join(str(p) for p in written)}")
        return exit_code

    def _language_metrics(
        self,
        group_sums: torch.Tensor,
        group_counts: torch.Tensor,
        lang_tokens: dict[str, int],
    ) -> dict[str, Any]:
        """Train loss per language and per objective, and tokens per language, over the log
        window, summed over dp ranks (a fixed table: every rank reduces the same shape).

        ``group_sums`` / ``group_counts``: loss sums and predicted tokens per (objective index,
        language index) group, as :meth:`_forward_loss` returns them.
        """
        objectives = sorted(set(self.objective_names))
        keys = [(obj, lang) for obj in objectives for lang in self.languages]
        num_langs = len(self.languages)
        rows = torch.zeros(len(keys), 2, dtype=torch.float64)
        sums, counts = group_sums.double().cpu(), group_counts.double().cpu()
        for index, name in enumerate(self.objective_names):
            at = objectives.index(name) * num_langs
            rows[at : at + num_langs, 0] += sums[index * num_langs : (index + 1) * num_langs]
            rows[at : at + num_langs, 1] += counts[index * num_langs : (index + 1) * num_langs]
        lang_rows = torch.tensor(
            [[float(lang_tokens.get(lang, 0)), 0.0] for lang in self.languages],
            dtype=torch.float64,
        )
        table = reduce_metric(torch.cat([rows, lang_rows]), dims=self.dims, axis="dp", op="sum")
        sums = {k: (float(table[i, 0]), float(table[i, 1])) for i, k in enumerate(keys)}
        out: dict[str, Any] = {
            "tokens_per_lang": {
                lang: int(table[len(keys) + i, 0])
                for i, lang in enumerate(self.languages)
                if table[len(keys) + i, 0] > 0
            }
        }
        per_lang, per_objective = {}, {}
        for lang in self.languages:
            loss = sum(sums[(obj, lang)][0] for obj in objectives)
            count = sum(sums[(obj, lang)][1] for obj in objectives)
            if count > 0:
                per_lang[lang] = loss / count
        for obj in objectives:
            loss = sum(sums[(obj, lang)][0] for lang in self.languages)
            count = sum(sums[(obj, lang)][1] for lang in self.languages)
            if count > 0:
                per_objective[obj] = loss / count
        if per_lang:
            out["loss_per_lang"] = per_lang
        if per_objective:
            out["loss_per_objective"] = per_objective
        return out


def train(cfg: RunConfig, *, rank: int, world_size: int) -> int:
    """Build the run, prepare its directory and train it; returns the process exit code (see
    module docstring).

    Nothing is written before the run is built (a bad input leaves the run directory as it
    was). Then rank 0 moves an earlier run aside (``train.overwrite`` on a fresh start; the
    refusal without it is ``check_run_inputs``'s) and prints and saves the resolved config.
    """
    trainer = Trainer(cfg, rank=rank, world_size=world_size)
    if dist.is_initialized():
        dist.barrier()  # every rank built (and checked) before rank 0 writes
    if rank == 0:
        run_dir = Path(cfg.train.run_dir)
        if cfg.train.overwrite and starts_afresh(cfg.train) and holds_earlier_run(run_dir):
            moved = move_run_dir_aside(run_dir)
            print(f"train.overwrite: moved the earlier run in {run_dir} aside to {moved}")
        print(config_to_yaml(cfg), end="")
        save_config(cfg, run_dir / "config.yaml")
        print(f"resolved config saved to {run_dir / 'config.yaml'}")
    if dist.is_initialized():
        dist.barrier()  # no rank writes into the run directory before it is ready
    code = trainer.fit()
    if rank == 0 and code == 0:
        print(f"run directory: {cfg.train.run_dir}")
    return code if not math.isnan(code) else 1
