"""Shared fixtures of the pytest-benchmark suites: one parameter per backend usable here.

Run with ``make bench-full`` (``pytest benchmarks --benchmark-only --benchmark-autosave``);
compare saved runs with ``pytest-benchmark compare`` or ``--benchmark-compare``.
Every saved run carries the machine description of ``fastbp.bench.machine`` (CPU, BLAS
and its threads, GPU, versions, load) beside pytest-benchmark's own.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp as fb
from fastbp import bench
from fastbp.bench import machine

STATUS = bench.backend_status()
BACKENDS = [name for name, why_not in STATUS.items() if why_not is None]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastbp"] = {"version": fb.__version__, "backend_status": STATUS, **machine.describe()}


def pytest_report_header(config):
    lines = [f"fastbp backends usable here: {BACKENDS}"]
    lines += [f"  {name} unavailable: {why}" for name, why in STATUS.items() if why is not None]
    return lines


class Kit:
    """A backend and what a benchmark needs around it: arrays on its device, warm-up, synchronisation."""

    def __init__(self, backend) -> None:
        self.be = backend
        self._warm: set[str] = set()

    def warm(self, dtype: str) -> None:
        """JIT-compile the backend's kernels for ``dtype`` once (``backend.warmup``), outside any timing."""
        warmup = getattr(self.be, "warmup", None)
        if callable(warmup) and dtype not in self._warm:
            warmup(dtype)
            self._warm.add(dtype)

    def array(self, dtype: str, *shape: int, seed: int = 0):
        """A seeded array of uniform [0, 1) values on the backend's device."""
        return self.be.asarray(np.random.default_rng(seed).random(shape).astype(dtype), dtype)

    def synced(self, fn):
        """``fn`` then a device synchronisation, so a GPU timing covers the work itself, not its launch."""
        be = self.be

        def run():
            fn()
            be.synchronize()

        run()  # warm: thread pools, caches, lazily compiled kernels
        return run


@pytest.fixture(params=BACKENDS, scope="session")
def kit(request) -> Kit:
    with fb.use_backend(request.param) as be:
        return Kit(be)
