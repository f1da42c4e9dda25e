"""Checkpoint tools: DCP helpers, Hugging Face adapters, conversion CLI."""
