"""Rosetta's data pipeline: tokenizer training, sharding, shard reading, language sampling.

Imports none of Rosetta's other packages, so a data engineer can install and run it alone.
Entry point: ``python -m data_pipeline train-tokenizer | shard | verify | inspect``.

Public API for the loader: ``shard_format.iter_shard_samples`` / ``decode_sample`` (read shards),
``manifest.load_manifest``, ``sampling.language_probabilities``, ``tokenizer.load_tokenizer``.

Where things live (one module per noun):

- ``text_inputs``: the text inputs of the preprocessing jobs (input specs, files, documents);
- ``tokenizer``: tokenizer training and loading; ``shard``: the sharding job (text -> shards);
- ``shard_format``: the shard format, its writer, its readers and the one tar parser;
- ``manifest``: a shard directory's manifest; ``verify``: the ``verify`` command's checks;
- ``config``: the loader's ``DataConfig``; ``loader``: the streaming loader (``build_loader``);
- ``slot_streams``: per-source sample streams dealt to loader slots (dp rank x worker);
- ``sampling``: language probabilities and the global row schedule; ``transforms``: joining,
  packing and masking; ``mix``: the ``mix`` command; ``synthetic``: tiny shards for tests;
- ``cli``: the ``python -m data_pipeline`` commands.
"""
