"""``python -m fastbp``: the same command line as ``fastbp``."""

import sys

from .cli import main

sys.exit(main())
