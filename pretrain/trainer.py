"""The training loop: mesh -> model -> parallelize -> loader -> optimizer -> loop.

What to call: ``train(cfg, rank=r, world_size=n)`` (what ``pretrain.train`` runs on every rank),
or ``Trainer(cfg, rank=r, world_size=n).fit()``. Public seams for tools and tests:
``Trainer.train_step(batches)`` (one optimizer step), ``Trainer.forward_loss(batch)`` (one
micro-batch's summed loss and loss groups), ``Trainer.settle(result)``; the collaborators
``self.mix`` (objectives: ``pretrain.objectives``), ``self.checkpoint_policy``
(``pretrain.checkpoint.CheckpointPolicy``), ``self.validator`` (``pretrain.validation``), the
metrics window (``pretrain.metrics``), ``self.preemption`` and ``self.guard``
(``pretrain.preemption``).

One step: ``train.grad_accum`` micro-batches (forward, loss, backward), a data-parallel loss
reduction, a NaN/Inf guard (a non-finite step skips its update), gradient clipping over every
mesh axis, AdamW and the LR schedule; every ``logging.every`` steps a metrics line; every
``train.eval_every`` steps a validation loss per language; every ``checkpoint.every`` steps (and
at the end, and on SIGTERM/SIGUSR1) a checkpoint.

What the model takes is the batch's business (``pretrain.batches.model_inputs``): an
encoder-decoder batch brings its decoder inputs and both sides' document ids, and its labels
sit on the decoder positions; the loop is the same for every family.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.mesh import ParallelDims
from parallel.parallelize import (
    apply_activation_checkpointing,
    clip_grad_norm_,
    local_value,
    loss_context,
    parallelize_model,
    reduce_metric,
)
from parallel.pipeline import build_pipeline, pipeline_step
from pretrain.batches import batch_tokens, model_inputs, target_side, to_device
from pretrain.checkpoint import (
    CheckpointManager,
    CheckpointPolicy,
    TrainState,
    check_compatible,
    holds_earlier_run,
    latest_loadable,
    move_run_dir_aside,
    rng_state,
    set_rng_state,
)
from pretrain.config import (
    RunConfig,
    apply_model_settings,
    config_to_dict,
    config_to_yaml,
    save_config,
    starts_afresh,
)
from pretrain.data import (
    build_train_loader,
    check_num_languages,
    loader_rank_state,
    loader_resume_state,
)
from pretrain.flops import model_flops_per_token, peak_flops
from pretrain.logger import RunLogger
from pretrain.metrics import MetricsWindow
from pretrain.models import build_model, param_counts, tp_plan
from pretrain.objectives import IGNORE_INDEX, ObjectiveMix
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.plots import plot_run
from pretrain.preemption import EXIT_DIVERGED, EXIT_PREEMPTED, NonFiniteGuard, PreemptionHandler
from pretrain.stages import build_stage_model
from pretrain.validation import Validator


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
        self.mix = ObjectiveMix.from_config(cfg)
        apply_model_settings(cfg, self.mix)  # what the objectives need of the model (NSP's head)
        if self.dims.dp > 1:  # contrastive objectives gather their negatives over dp
            self.mix.group = self.dims["dp"].get_group()
        # The loader first (it reads the manifest and tokenizer, nothing more): the run's
        # language index must fit the model before the model is built.
        self.loader = build_train_loader(
            cfg, dp_rank=self.dims.dp_rank, dp_world_size=self.dims.dp_world_size
        )
        self.languages = list(self.loader.dataset.languages)
        check_num_languages(cfg, self.languages)
        # Loss groups: objective index * languages + language index (``ObjectiveMix``).
        self.num_groups = self.mix.num_groups(len(self.languages))
        with torch.device("meta"):
            model = build_model(cfg.model)
        counts = param_counts(model)
        # Every MoE layer of the whole model (pipeline stages hold some of them).
        self.moe_layer_names = list(model.moe_layers())
        self.params_total = counts["params_total"]
        self.params_active = counts["params_active"]
        self.flops_per_token = model_flops_per_token(
            model, seq_len=cfg.data.seq_len, decoder_len=self.loader.dataset.decoder_len
        )
        self.pipeline = None
        self.engine = None  # the DeepSpeed engine (parallel.engine=deepspeed)
        if cfg.parallel.engine == "deepspeed":
            # ZeRO wraps the plain model: materialised and initialised as one process would.
            apply_activation_checkpointing(
                model, mode=cfg.parallel.activation_checkpointing, tp_plan=tp_plan(cfg.model)
            )
            model.to_empty(device=self.device)
            model.init_weights(cfg.train.seed)
            parts = [model]
        elif self.dims.pp > 1:
            self.pipeline, parts, self.pipeline_info = build_pipeline(
                lambda stage, num_stages: build_stage_model(cfg, stage, num_stages),
                dims=self.dims,
                cfg=cfg.parallel,
                tp_plan=tp_plan(cfg.model),
                seed=cfg.train.seed,
                token_loss_fn=self.mix.token_losses,
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
        if cfg.parallel.engine == "deepspeed" and cfg.parallel.cpu_offload:
            from parallel.deepspeed_engine import host_adamw

            self.optimizers = [host_adamw(opt) for opt in self.optimizers]
        self.schedulers = [
            build_scheduler(opt, cfg.optim, total_steps=cfg.train.steps) for opt in self.optimizers
        ]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if cfg.parallel.engine == "deepspeed":
            from parallel.deepspeed_engine import DeepSpeedState, build_engine

            self.engine = build_engine(
                self.model, self.optimizers[0], cfg=cfg, precision=self.precision
            )
            self.model = self.engine  # forward through the engine (ZeRO-3 gathers there)
            self.state = DeepSpeedState(self.engine, self.schedulers[0])
        else:
            self.state = TrainState(self.parts, self.optimizers, self.schedulers, step=0)
        # A fused AdamW skips a non-finite step's update on the device: no host sync needed.
        self.sync_free = (
            self.engine is None
            and self.scaler is None
            and all(opt.defaults.get("fused") for opt in self.optimizers)
        )
        self.checkpoints = CheckpointManager(
            self.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        self.peak_flops = peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            override_tflops=cfg.logging.peak_tflops,
        )
        self.guard = NonFiniteGuard(max_consecutive=cfg.train.max_nonfinite_steps)
        for part in self.parts:
            if hasattr(part, "track_moe_languages") and self.moe_layer_names:
                part.track_moe_languages(len(self.languages))
        self.preemption = PreemptionHandler()
        self.validator = Validator(
            cfg,
            dims=self.dims,
            device=self.device,
            batch_loss=self._valid_loss,
            num_targets=lambda batch: self.mix.num_targets(batch["labels"]),
        )
        self.checkpoint_policy = CheckpointPolicy(cfg.checkpoint.every)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.steps`` (or ``train.stop_at``); returns the process exit code."""
        cfg = self.cfg
        logger = self._open_run()
        step = self.state.step
        last = cfg.train.stop_at or cfg.train.steps
        policy = self.checkpoint_policy
        policy.saved(step)  # a resumed step counts as saved
        window = self._metrics_window()
        batches = iter(self.loader)
        pending = None  # the previous step's result, read once this step's work is queued
        exit_code = None
        self.preemption.install()
        try:
            while step < last:
                micro = [next(batches) for _ in range(cfg.train.grad_accum)]
                out = self.train_step(micro)
                step += 1
                window.add(micro, out)
                if pending is not None:
                    self.settle(pending)
                    if self._diverged(step - 1, logger):  # read a step late
                        exit_code = EXIT_DIVERGED
                        break
                pending = out
                log_now = step % cfg.logging.every == 0 or step == last
                stopping = self.preemption.should_stop()
                ending = stopping or step == last
                if log_now or policy.due(step, ending=ending):
                    self.settle(out)
                if self._diverged(step, logger):
                    exit_code = EXIT_DIVERGED
                    break
                if log_now:
                    self._log(step, out, window, logger)
                else:
                    logger.advance(step)
                # Nothing non-finite is ever saved: a refused save stops the run (exit 3) with
                # the last good checkpoint intact.
                if policy.should_save(step, ending=ending, finite=self.guard.consecutive == 0):
                    refused = self._save(step)
                    if refused is not None:
                        logger.info(f"not saving step {step}: {refused}; stopping with the last "
                                    "good checkpoint intact")  # fmt: skip
                        exit_code = EXIT_DIVERGED
                        break
                    policy.saved(step)
                if stopping:
                    self.checkpoints.close()
                    logger.info(f"stop signal received: checkpointed step {step}, exiting")
                    exit_code = EXIT_PREEMPTED
                    break
            if exit_code is None:
                exit_code = 0
                if last < cfg.train.steps:
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

    def _open_run(self) -> RunLogger:
        """Resume (``train.resume``), open the run's logger and write the header lines."""
        self.resumed_from = None
        self.resume_notes: list[str] = []  # corrupt checkpoints passed over, optim.* changes
        self._resume()
        logger = RunLogger(
            self.run_dir,
            rank=self.rank,
            cfg=self.cfg.logging,
            total_steps=self.cfg.train.steps,
            start_step=self.state.step,
        )
        for note in self.resume_notes:
            logger.info(note)
        if self.resumed_from is not None:
            logger.info(f"resumed from {self.resumed_from} at step {self.state.step}")
        logger.info(
            f"model: {self.params_total:,} parameters ({self.params_active:,} active); "
            f"layout {self.dims.degrees()}; device {self.device}; precision {self.precision}"
        )
        return logger

    def _metrics_window(self) -> MetricsWindow:
        return MetricsWindow(
            dims=self.dims,
            mix=self.mix,
            languages=self.languages,
            moe_layer_names=self.moe_layer_names,
            num_experts=self.cfg.model.moe.num_experts,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
            device=self.device,
        )

    def _diverged(self, step: int, logger: RunLogger) -> bool:
        """Whether the guard has seen too many non-finite losses in a row (logged once)."""
        if self.guard.diverged:
            logger.info(self.guard.message(step))
        return self.guard.diverged

    def _log(self, step: int, out: dict[str, Any], window: MetricsWindow, logger: RunLogger):
        """The metrics line of ``step`` (a collective: every rank logs at the same steps), with
        the validation loss when due; the next window starts after it."""
        counters, data = self.loader.counters, self.loader.dataset
        metrics = window.read(
            out,
            lr=self.schedulers[0].get_last_lr()[0],
            skipped_steps=self.guard.total,
            bad_samples=counters["bad_samples"],
            parts=self.parts,
            # real vs synthetic pair tokens, when the run reads pair rows
            pair_tokens=counters["pair_tokens"] if data.tlm_share > 0 else None,
            synthetic_pairs=data.synthetic_pairs,
        )
        if self.validator.due(step):
            metrics.update(self.validator.run(self.parts))
        logger.log(metrics, step)
        window.reset()

    # -- one step --------------------------------------------------------------------------

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def _target_groups(
        self, batch: dict[str, Any], kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``[B, T]`` loss group of every position's target, on the device."""
        lang_ids_cpu, tokens_mask_cpu, pair_rows = target_side(batch)
        lang_ids = kwargs.get("lang_ids_BT")  # the model's input already copied, if it is one
        if lang_ids is None:
            lang_ids = to_device(lang_ids_cpu, self.device)
        tokens_mask = to_device(tokens_mask_cpu, self.device)
        if pair_rows is not None:
            pair_rows = to_device(pair_rows, self.device)
        row_transform = batch.get("row_transform")
        if row_transform is not None:
            row_transform = to_device(row_transform, self.device)
        return self.mix.target_groups(
            lang_ids,
            tokens_mask,
            num_languages=len(self.languages),
            pair_rows_B=pair_rows,
            row_transform_B=row_transform,
        )

    def logits_at(
        self, batch: dict[str, Any], input_ids_BT: torch.Tensor, where_BT: torch.Tensor
    ) -> torch.Tensor:
        """The model's fp32 logits ``[N, V]`` at the True positions of ``where_BT`` for
        ``input_ids_BT`` with the batch's other model inputs: no grad, the model in eval mode
        (no dropout, no MoE load statistics). An objective's own pass before its loss
        (``ObjectiveMix.prepare``: BTMLM); not under pipeline parallel."""
        kwargs = model_inputs(batch, self.cfg.model, self.device)
        input_ids = to_device(input_ids_BT, self.device)
        where = to_device(where_BT, self.device)
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                if self.dims.tp > 1 or self.engine is not None:
                    logits_BTV = local_value(self.model(input_ids, **kwargs))
                    return logits_BTV[where].float()
                hidden_BTD = self.model(input_ids, return_hidden=True, **kwargs)
                weight_VD, bias_V = self.model.output_projection()
                return torch.nn.functional.linear(hidden_BTD[where], weight_VD, bias_V).float()
        finally:
            self.model.train(training)

    def forward_loss(
        self, batch: dict[str, Any], *, row_scale: torch.Tensor | float | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Summed loss of one micro-batch over its predicted tokens (the caller normalises it)
        and, per loss group (``ObjectiveMix.target_groups``), the loss sums and predicted-token
        counts as ``[groups]`` fp32 device tensors.

        A loss beside the token loss (``ObjectiveMix.row_loss``: NSP / SOP's over rows,
        ELECTRA's discriminator over real tokens) is added summed, times ``row_scale``: the
        step's targets over its rows (tokens), so that the caller's division by the targets
        makes it their mean (None: this batch's own ratio).

        Under tensor parallel the logits are vocabulary-sharded and the loss is taken inside
        ``loss_context`` (the caller runs backward inside it too). An objective with a step
        before its loss takes it first (``ObjectiveMix.prepare``)."""
        batch = self.mix.prepare(batch, self.logits_at)
        loss, (sums_G, counts_G), scored = self._token_loss(batch)
        if scored is not None:
            if row_scale is None:
                targets = self.mix.num_targets(batch["labels"]).clamp(min=1)
                row_scale = float(targets) / max(int(self.mix.num_rows(batch)), 1)
            row_loss = self.mix.row_loss(scored, batch, sums_G, counts_G)
            # under TP the token loss is a replicated DTensor (loss_parallel): add the plain
            # row loss to its full value, so that each part's backward takes its own path
            loss = local_value(loss) + row_loss * row_scale
        return loss, (sums_G, counts_G)

    def _token_loss(self, batch: dict[str, Any]):
        """``(summed token loss, (sums_G, counts_G), what ``ObjectiveMix.row_loss`` scores or
        None)``."""
        input_ids = to_device(batch["input_ids"], self.device)
        labels = self.mix.targets(to_device(batch["labels"], self.device))
        kwargs = model_inputs(batch, self.cfg.model, self.device)
        groups = self._target_groups(batch, kwargs)
        kwargs.update(self.mix.model_options(batch, self.device))
        # SpanBERT: the span-boundary outputs follow the main ones, with their own targets
        labels, groups = self.mix.extend_targets(labels, groups, batch, num_groups=self.num_groups)
        with self._autocast():
            if self.dims.tp > 1 or self.engine is not None:
                # Whole logits: vocabulary-sharded under TP; under DeepSpeed the projection
                # runs inside the engine's forward (ZeRO-3 gathers its weight only there).
                logits_BTV, scored = self.mix.split_outputs(self.model(input_ids, **kwargs))
                loss, sums_G, counts_G = self.mix.loss_from_logits(
                    logits_BTV, labels, groups, num_groups=self.num_groups, local=local_value
                )
                return loss, (sums_G, counts_G), scored
            outputs = self.model(input_ids, return_hidden=True, **kwargs)
            hidden_BTD, scored = self.mix.split_outputs(outputs)
            weight_VD, bias_V = self.model.output_projection()
        loss, sums_G, counts_G = self.mix.loss(
            hidden_BTD,
            weight_VD,
            bias_V,
            labels,
            groups,
            num_groups=self.num_groups,
            autocast=self._autocast,
        )
        return loss, (sums_G, counts_G), scored

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
        / ``group_counts_G`` afterwards, on every pp rank. The model inputs beside the token ids
        go to every stage as keyword arguments of ``schedule.step``."""
        kwargs = model_inputs(batch, self.cfg.model, self.device)
        with self._autocast():
            return pipeline_step(
                self.pipeline,
                info=self.pipeline_info,
                dims=self.dims,
                inputs=to_device(batch["input_ids"], self.device),
                targets=self.mix.targets(to_device(batch["labels"], self.device)),
                stage_kwargs=kwargs,
                ignore_index=IGNORE_INDEX,
                backward=backward,
                num_targets=num_targets,
                grad_scale=grad_scale,
                groups_BT=self._target_groups(batch, kwargs) if groups else None,
                num_groups=self.num_groups,
            )

    def _valid_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """A held-out batch's summed loss, forward only (``Validator``)."""
        if self.pipeline is not None:
            return self._pipeline_loss(batch, backward=False, num_targets=1.0)
        with loss_context(self.dims):
            return self.forward_loss(batch)[0]

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over the micro-batches ``batches``.

        Returns ``{"loss", "grad_norm", "tokens", "group_sums", "group_counts", "settled"}``.
        Without host syncs when the optimizer is fused and there is no GradScaler
        (``self.sync_free``; CUDA's default): the loss, grad norm and group sums stay device
        tensors, a non-finite loss skips the update on the device (the fused AdamW's
        ``found_inf``), and :meth:`settle` reads them later. Otherwise the step settles itself.
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
            sum(self.mix.num_targets(batch["labels"]) for batch in batches),
            dims=self.dims,
            op="sum",
        )
        num_targets = num_targets.clamp(min=1)
        inv_targets = to_device((1.0 / num_targets.double()).float(), self.device)
        row_scale = None  # NSP / SOP / ELECTRA: the step's targets over its rows (tokens)
        if self.mix.scores_rows:
            rows = reduce_metric(
                sum(self.mix.num_rows(batch) for batch in batches), dims=self.dims, op="sum"
            )
            row_scale = to_device((num_targets.double() / rows.clamp(min=1)).float(), self.device)
        if self.pipeline is not None:
            num_targets = to_device(num_targets.float(), self.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        group_sums = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        group_counts = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        tokens = 0
        for batch in batches:
            tokens += batch_tokens(batch)
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
                # the row scale only where an objective scores rows (NSP, SOP, ELECTRA)
                scale = {} if row_scale is None else {"row_scale": row_scale}
                loss, groups = self.forward_loss(batch, **scale)
                scaled = loss * (inv_targets * dp)
                if self.engine is not None:
                    # DeepSpeed averages over dp, as the torch engines do; it steps (and clips
                    # at optim.grad_clip) at the last micro-batch of the step.
                    self.engine.backward(scaled, scale_wrt_gas=False)
                    self.engine.step()
                else:
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
        out = {"tokens": tokens, "group_sums": group_sums, "group_counts": group_counts}
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
            if self.engine is not None:
                # DeepSpeed stepped already; it skips a step whose gradient norm is not finite.
                norm = self.engine.get_global_grad_norm()
                grad_norm = float(norm) if finite and norm is not None else float("nan")
            elif finite:
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
            if self.engine is None:  # DeepSpeed clears its own (ZeRO-Offload keeps buffers)
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return out

    def settle(self, out: dict[str, Any]) -> None:
        """Read a sync-free step's loss and grad norm (waiting for its work) and count it in the
        NaN guard; a step that settled itself is left alone. Steps settle in order."""
        if out["settled"]:
            return
        loss = float(out["loss"])
        out["loss"] = loss
        out["grad_norm"] = float(out["grad_norm"]) if self.guard.check(loss) else float("nan")
        out["settled"] = True

    # -- resume and save -------------------------------------------------------------------

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
        if self.engine is not None:
            # DCP brings the step and scheduler; DeepSpeed its weights and optimizer partitions.
            self.state.loading = True
            self.checkpoints.load(path, self.state, ranks=[])
            self.state.loading = False
            self.state.load_engine(path)
        else:
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
            write_extra=self.state.save_engine if self.engine is not None else None,
        )


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
