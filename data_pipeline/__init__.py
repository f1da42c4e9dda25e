"""Rosetta's data pipeline: tokenizer training, sharding, shard reading, language sampling.

Imports none of Rosetta's other packages, so a data engineer can install and run it alone.
Entry point: ``python -m data_pipeline train-tokenizer | shard | verify | inspect``.

Public API for the loader: ``shard_format.iter_shard_samples`` / ``decode_sample`` (read shards),
``manifest.load_manifest``, ``sampling.language_probabilities``, ``tokenizer.load_tokenizer``.
"""
