"""A worker process of ``fastbp bench``: ``python -m fastbp.bench KIND NAME CONFIG.json RESULT.json``."""

import sys

from .worker import worker_main

sys.exit(worker_main(sys.argv[1:]))
