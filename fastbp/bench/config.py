"""What ``fastbp bench`` measures (:class:`BenchConfig`) and how its record is written as JSON."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._validate import FLOAT_DTYPES
from .optimizer import NAMES as OPTIMIZERS

SCHEMA = "fastbp-bench/1"
PEERS = ("torch", "jax", "sklearn")
DTYPES = FLOAT_DTYPES
FULL = "full"  # a batch-size entry meaning "the whole training set"


@dataclass(frozen=True)
class BenchConfig:
    """What ``fastbp bench`` measures. ``batch_sizes`` holds ints and/or ``"full"``."""

    backends: tuple[str, ...] | None = None  # None: every backend usable here
    sizes: tuple[int, ...] = (784, 128, 10)
    activation: str = "sigmoid"
    loss: str = "mse"
    batch_sizes: tuple = (1, 4, 16, 64, 256, 1024, FULL)
    n_samples: int = 4096
    grad_batch: int = 256
    dtype: str = "float32"
    repeat: int = 5
    min_time: float = 0.25  # seconds each timed region lasts at least
    lr: float = 0.05
    optimizer: str = "sgd"  # one of optimizer.NAMES, for fastbp and every peer alike
    momentum: float = 0.9  # used by optimizer "momentum"
    seed: int = 0
    peers: tuple[str, ...] = ()
    peak_n: int = 2048  # the reference GEMM is peak_n x peak_n x peak_n
    threads: int | None = None  # cap BLAS/OpenMP (threadpoolctl) and Numba threads; None: library defaults
    isolate: bool = True  # each backend and peer in its own worker process
    contended: bool = False  # run everything again beside one busy-loop process, report the fractions
    quick: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer. Received: optimizer={self.optimizer!r}. "
                             f"Expected one of {list(OPTIMIZERS)}")

    def resolved_batch_sizes(self) -> list[int]:
        """The batch sizes as ints (``"full"`` -> ``n_samples``), sorted, without duplicates."""
        return sorted({self.n_samples if b == FULL else int(b) for b in self.batch_sizes})

    @classmethod
    def from_json(cls, record: dict) -> "BenchConfig":
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        for key in ("backends", "sizes", "batch_sizes", "peers"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)


DEFAULT = BenchConfig()
QUICK = BenchConfig(batch_sizes=(1, 32, FULL), n_samples=1024, grad_batch=64, repeat=3, min_time=0.03,
                    peak_n=1024, quick=True)


def jsonable(value):
    """``value`` with NumPy scalars and arrays as plain Python (what ``json.dump`` takes)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
