"""fastbp: fast, clear backpropagation for multilayer perceptrons.

>>> import fastbp as fb
>>> net = fb.MLP([4, 8, 3], activation="relu", loss="cross_entropy", seed=0)

The backend (numpy, numba or cupy) comes from ``FASTBP_BACKEND`` (default
``auto``); importing fastbp imports neither numba nor cupy.
"""

from . import ops, optim
from . import graph  # light: numpy and the registry only; a graph's kernels load with its backend
from .backend import (
    BACKEND_NAMES,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    to_numpy,
    use_backend,
)
from .errors import BackendUnavailableError, TrainingDivergedError
from .gradcheck import gradcheck
from .network import MLP, LogisticRegression
from .training import Callback, EarlyStopping, History

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES", "BackendUnavailableError", "Callback", "EarlyStopping", "History", "LogisticRegression", "MLP",
    "TrainingDivergedError", "available_backends", "backend_status", "get_backend", "gradcheck",
    "ops", "optim", "set_backend", "to_numpy", "use_backend", "__version__",
]
