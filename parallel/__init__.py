"""Parallelism applied to plain models: mesh, TP/SP, pipeline, expert and data parallel."""
