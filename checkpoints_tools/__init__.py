"""Checkpoint tools: DCP helpers, Hugging Face adapters, conversion CLI.

What to call: ``python -m checkpoints_tools {inspect, export-hf, import-hf, reshard}``
(:mod:`checkpoints_tools.cli`; exit 0 on success, 2 on a user mistake with one line on stderr),
or the tested functions behind it in :mod:`checkpoints_tools.convert` (``inspect_checkpoint``,
``export_hf``, ``import_hf``, ``reshard``: each writing function leaves its output complete or
absent). Reading a checkpoint without the trainer: :func:`checkpoints_tools.dcp_io
.open_checkpoint`; per-family state-dict adapters: :mod:`checkpoints_tools.adapters`.
"""
