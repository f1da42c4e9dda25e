"""DeepSpeed ZeRO as the optional data-parallel engine (``parallel.engine=deepspeed``).

What to call: ``build_engine(model, optimizer, cfg=run_cfg, precision=p, device=d)`` -> the
``deepspeed.DeepSpeedEngine`` around our (materialised, initialised) model and our AdamW;
``DeepSpeedState(engine, scheduler)`` is what the run's checkpoints hold. Imported only when
``parallel.engine=deepspeed`` (the extra ``rosetta[deepspeed]``): the core never imports
DeepSpeed.

Guarantees: ZeRO stage ``parallel.zero_stage`` (1, 2 or 3), with ``parallel.cpu_offload`` the
optimizer state (and under stage 3 the parameters) on the host; our model, loader, loss
normalisation, schedule, precision and logging unchanged. Settings DeepSpeed would otherwise
choose silently are set explicitly: gradient clipping is ``optim.grad_clip`` (DeepSpeed's
default clips at 1.0), the micro-batch and accumulation are the run's, no DeepSpeed scheduler
(ours steps), DeepSpeed's own loss scaling by accumulation is off (the trainer normalises by the
step's global target count, as with the torch engine). A step with non-finite gradients is
skipped by DeepSpeed's ZeRO optimizer (it checks the gradient norm); the trainer's NaN guard
counts it as with the torch engine.

Checkpoints (``DeepSpeedState``): the run's checkpoint directory layout is unchanged
(``step_<N>/`` complete-or-absent, ``rank_<r>.pt``, ``config.yaml``); DCP holds the whole
model's weights under the same ``train.model.*`` names as a torch-engine run (so
``checkpoints_tools export-hf`` reads it as it is), the step and the scheduler, and
``step_<N>/deepspeed/`` DeepSpeed's own ZeRO checkpoint (partitioned optimizer state), written
by ``engine.save_checkpoint`` and read back by ``engine.load_checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

DS_TAG = "zero"
DS_DIR = "deepspeed"


def ds_config(cfg: Any, *, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict of run config ``cfg`` (every value stated, none defaulted)."""
    par = cfg.parallel
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if par.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # Keep our AdamW (its decay groups and hyper-parameters) under offload too.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def host_adamw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's host AdamW (``DeepSpeedCPUAdam``, decoupled weight decay) over the same
    parameter groups and hyper-parameters as ``optimizer``: what ZeRO-Offload steps on the host
    (ZeRO-2 offload does not take a torch optimizer)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    groups = [
        {"params": group["params"], "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups
    ]
    return DeepSpeedCPUAdam(
        groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=True,
    )


def build_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    cfg: Any,
    precision: str,
) -> Any:
    """``deepspeed.initialize`` on our model and optimizer (torch.distributed already up)."""
    import deepspeed

    if "LOCAL_RANK" not in os.environ and dist.is_initialized():
        # A process group started without a launcher (the test harness): one node.
        os.environ["LOCAL_RANK"] = str(dist.get_rank())
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config(cfg, precision=precision),
        dist_init_required=False,
    )
    return engine


def full_model_state(engine: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights under our parameter names (stage 3: gathered to rank 0, the
    other ranks contribute none)."""
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict()
        return dict(gathered or {})
    return {name: tensor.detach() for name, tensor in engine.module.state_dict().items()}


class DeepSpeedState(Stateful):
    """The DCP part of a DeepSpeed run's checkpoint: model weights (for export and inspection),
    step and scheduler; the optimizer partitions go through :meth:`save_engine` /
    :meth:`load_engine` (DeepSpeed's own checkpoint, ``<checkpoint>/deepspeed``)."""

    def __init__(self, engine: Any, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.engine = engine
        self.schedulers = [scheduler]
        self.step = 0
        self.loading = False

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "scheduler": self.schedulers[0].state_dict()}
        if not self.loading:  # the weights come back through DeepSpeed's own checkpoint
            state["model"] = full_model_state(self.engine)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedulers[0].load_state_dict(state_dict["scheduler"])
        self.step = int(state_dict["step"])

    def save_engine(self, directory: Path) -> None:
        """DeepSpeed's checkpoint of the engine into ``directory / deepspeed`` (collective)."""
        self.engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG, save_latest=False)

    def load_engine(self, directory: Path) -> None:
        """Load the engine's weights and optimizer partitions (collective)."""
        path, _ = self.engine.load_checkpoint(
            str(directory / DS_DIR),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ValueError(f"checkpoint {str(directory)!r} holds no DeepSpeed engine state")


def build_ops() -> list[str]:
    """Build (or load from ``$TORCH_EXTENSIONS_DIR``) the C++ ops a run uses on this machine's
    accelerator: the host Adam of ZeRO-Offload, and on the CPU the shared-memory collectives
    DeepSpeed's communication starts with. ``make test`` runs it once (``python -m
    parallel.deepspeed_engine``) so that no run compiles them on first use."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    names = ["CPUAdamBuilder"]
    if accelerator.device_name() == "cpu":
        names.append("ShareMemCommBuilder")
    built = []
    for name in names:
        builder = accelerator.create_op_builder(name)
        if builder is not None:
            builder.load(verbose=False)
            built.append(name)
    return built


if __name__ == "__main__":
    print(f"DeepSpeed ops ready: {', '.join(build_ops())}")
