"""``python -m data_pipeline train-tokenizer | shard | verify | inspect``."""

import sys

from data_pipeline.cli import main

sys.exit(main())
