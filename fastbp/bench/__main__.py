"""A worker process of ``fastbp bench``: ``python -m fastbp.bench KIND NAME CONFIG.json RESULT.json``."""

import sys

from .runner import _worker_main

sys.exit(_worker_main(sys.argv[1:]))
