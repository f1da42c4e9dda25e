"""Rosetta's trainers: models, objectives, the training loop, checkpoints.

What to call: ``python -m pretrain.train --config configs/X.yaml [key=value ...] [--dry-run]``;
from Python ``pretrain.config.load_config`` then ``pretrain.trainer.Trainer(cfg).fit()``.
``pretrain.models.build_model`` builds a plain model of a family; ``pretrain.objectives`` holds
the objectives and their registry.
"""
