"""The array layer's registry: which backends exist, which one is active, how to pick.

``FASTBP_BACKEND`` is read once, when this module is imported; nothing here
imports numba or cupy until a backend is actually asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import BackendUnavailableError

ENV_VAR = "FASTBP_BACKEND"
BACKEND_NAMES = ("numpy", "numba", "cupy")  # also the order `auto` prefers, reversed
VALID_CHOICES = ("auto",) + tuple(sorted(BACKEND_NAMES))
_AUTO_ORDER = ("cupy", "numba", "numpy")

_requested: str = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
_active = None  # the Backend in use; resolved from _requested on first use
_instances: dict = {}  # name -> Backend, created once
_failures: dict[str, BackendUnavailableError] = {}


def _check_name(name, *, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str; Received: {name!r} of type {type(name).__name__}. "
                        f"Expected one of {list(VALID_CHOICES)}")
    key = name.strip().lower()
    if key not in VALID_CHOICES:
        raise ValueError(f"unknown backend. Received: {source}={name!r}. Expected one of {list(VALID_CHOICES)}")
    return key


def _kernels_package():
    """``fastbp.kernels``; in a source tree that is not installed, ``kernels/`` beside ``fastbp/``."""
    try:
        return importlib.import_module("fastbp.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "fastbp.kernels":
            raise
    src = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastbp.kernels", src / "__init__.py", submodule_search_locations=[str(src)]
    )
    if spec is None or not src.is_dir():
        raise ImportError("fastbp.kernels is missing: reinstall fastbp (pip install fastbp)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastbp.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules[__package__].kernels = module  # what a normal submodule import does
    return module


def _load(name: str):
    """The backend called ``name``, created on first use, or BackendUnavailableError."""
    if name in _instances:
        return _instances[name]
    if name in _failures:
        raise _failures[name]
    _kernels_package()
    try:
        module = importlib.import_module(f"fastbp.kernels.{name}")
        backend = module.create()
    except ModuleNotFoundError as exc:
        if exc.name != f"fastbp.kernels.{name}":
            raise
        _failures[name] = BackendUnavailableError(name, "this fastbp install has no such kernels module",
                                                  "reinstall fastbp: pip install --force-reinstall fastbp")
        raise _failures[name] from None
    except BackendUnavailableError as exc:
        _failures[name] = exc
        raise
    _instances[name] = backend
    return backend


def _resolve(name: str):
    if name != "auto":
        return _load(name)
    for candidate in _AUTO_ORDER:
        try:
            return _load(candidate)
        except BackendUnavailableError:
            continue
    raise AssertionError("the numpy backend is always available")


def backend_status() -> dict[str, str | None]:
    """For each backend name: None when usable here, else the reason it is not."""
    status = {}
    for name in BACKEND_NAMES:
        try:
            _load(name)
            status[name] = None
        except BackendUnavailableError as exc:
            status[name] = f"{exc.reason}. To fix: {exc.fix}"
    return status


def available_backends() -> list[str]:
    """Names of the backends usable on this machine now, e.g. ``["numpy", "numba"]``."""
    return [name for name, why_not in backend_status().items() if why_not is None]


def get_backend():
    """The active backend (resolving ``FASTBP_BACKEND`` on first call). ``.name`` says which."""
    global _active
    if _active is None:
        _active = _resolve(_check_name(_requested, source=ENV_VAR))
    return _active


def set_backend(name: str):
    """Make ``name`` ("numpy" | "numba" | "cupy" | "auto") the active backend and return it.

    Raises ValueError for an unknown name and BackendUnavailableError, with the
    reason and the fix, for one that cannot run here. Never falls back silently.
    """
    global _active
    _active = _resolve(_check_name(name, source="name"))
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator:
    """Scoped selection: ``with fb.use_backend("numpy"): ...`` restores the previous one after."""
    global _active
    previous = _active
    backend = set_backend(name)
    try:
        yield backend
    finally:
        _active = previous


def array_module_name(x) -> str | None:
    """"cupy" for a CuPy array, "numpy" for a NumPy one, else None — without importing cupy."""
    module = type(x).__module__
    if module.startswith("cupy"):
        return "cupy"
    if isinstance(x, np.ndarray):
        return "numpy"
    return None


_kernels_package()  # light: makes `fastbp.kernels.base` importable even from an uninstalled tree


def to_numpy(array) -> np.ndarray:
    """A NumPy copy (or view) of an array from any backend, or of a list."""
    if array_module_name(array) == "cupy":
        return array.get()
    return np.asarray(array)
