"""Pipeline stage layout: which layers each stage holds, and a stage's model.

What to call: ``stage_layer_keys(cfg, num_stages=S)`` (the layer keys of each of ``S`` stages:
``parallel.stage_layers`` when set, else the model's even split,
``pretrain.models.pipeline_stage_layers``) and ``build_stage_model(cfg, stage, num_stages)`` (a
meta-device model pruned to one stage, parameter names kept). The trainer, the dry run
(``pretrain.train.plan``) and the memory planner (``parallel.planner``, through the dry run) all
build stages with these, so they agree on the layout.
"""

from __future__ import annotations

import torch

from pretrain.config import RunConfig
from pretrain.models import build_model, pipeline_stage_layers, prune_to_stage


def stage_layer_keys(cfg: RunConfig, *, num_stages: int) -> list[list[str]]:
    """The ``model.layers`` keys of each of ``num_stages`` stages, in order."""
    if cfg.parallel.stage_layers is None:
        return pipeline_stage_layers(cfg.model, num_stages=num_stages)
    keys, start = [], 0
    for count in cfg.parallel.stage_layers:
        keys.append([str(i) for i in range(start, start + count)])
        start += count
    return keys


def build_stage_model(cfg: RunConfig, stage: int, num_stages: int) -> torch.nn.Module:
    """Stage ``stage`` of ``num_stages`` on the meta device: the whole model when
    ``num_stages == 1``, else its layers plus the embeddings (first stage) and the final norm /
    head / output (last stage)."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    if num_stages > 1:
        keys = stage_layer_keys(cfg, num_stages=num_stages)[stage]
        prune_to_stage(model, layer_keys=keys, first=stage == 0, last=stage == num_stages - 1)
    return model
