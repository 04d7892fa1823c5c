"""The benchmark tool behind ``fastbp bench``.

    config      BenchConfig: what a run measures; the JSON record's helpers
    runner      run(): the suite, one fresh worker process per backend and peer, --contended
    worker      what each worker measures: gradients and training of a backend, or a peer library
    timing      FLOP counts, stats, timed regions, GEMM rates (square, and at a step's shapes)
    machine     CPU, BLAS and threads, GPU, versions, load, other processes' CPU use
    peers       the same training on PyTorch, JAX (per-step jit and epoch scan) and scikit-learn
    optimizer   the update rule (SGD, momentum, Adam), spelled for each library
    contention  a busy-loop load beside a run
    report      the printed tables, Markdown, JSON file and plot

``import fastbp`` never imports this package; ``fastbp bench`` and the scripts in
``benchmarks/`` do.
"""

from .config import DEFAULT, DTYPES, FULL, PEERS, QUICK, SCHEMA, BenchConfig, jsonable
from .runner import backend_status, contended_fractions, run, summarize
from .timing import flops_per_example, measure_matmul_peak, stats, time_calls

__all__ = ["BenchConfig", "DEFAULT", "QUICK", "FULL", "PEERS", "DTYPES", "SCHEMA", "run", "summarize",
           "contended_fractions", "flops_per_example", "measure_matmul_peak", "stats", "time_calls",
           "backend_status", "jsonable"]
