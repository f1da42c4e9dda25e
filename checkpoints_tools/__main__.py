"""``python -m checkpoints_tools``; see :mod:`checkpoints_tools.cli`."""

import sys

from checkpoints_tools.cli import main

sys.exit(main())
