"""The benchmark tool behind ``fastbp bench``: runner, worker processes, report, peers, machine.

``import fastbp`` never imports this package; ``fastbp bench`` and the scripts in
``benchmarks/`` do.
"""

from .runner import (DEFAULT, DTYPES, FULL, PEERS, QUICK, SCHEMA, BenchConfig, backend_status,
                     flops_per_example, measure_matmul_peak, run, summarize, time_calls)
from .runner import _jsonable as jsonable

__all__ = ["BenchConfig", "DEFAULT", "QUICK", "FULL", "PEERS", "DTYPES", "SCHEMA", "run", "summarize",
           "flops_per_example", "measure_matmul_peak", "time_calls", "backend_status", "jsonable"]
