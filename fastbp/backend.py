"""The array layer's registry: which backends exist, which one is active, how to pick.

``FASTBP_BACKEND`` is read once, when this module is imported; nothing here
imports numba or cupy until a backend is actually asked for.

Two levels of selection: :func:`set_backend` sets the process default (every
thread sees it), and :func:`use_backend` overrides it for the calling thread
and context only (a :mod:`contextvars` variable), so two threads, or two
asyncio tasks, can each work inside their own ``with fb.use_backend(...)``.
A new thread starts from the process default, not from its creator's scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import BackendUnavailableError

ENV_VAR = "FASTBP_BACKEND"
BACKEND_NAMES = ("numpy", "numba", "cupy")  # also the order `auto` prefers, reversed
VALID_CHOICES = ("auto",) + tuple(sorted(BACKEND_NAMES))
_AUTO_ORDER = ("cupy", "numba", "numpy")

_requested: str = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
_default = None  # the process default Backend; resolved from _requested on first use
# use_backend's override for this thread/context; None = the process default
_scoped: contextvars.ContextVar = contextvars.ContextVar("fastbp_backend", default=None)
_instances: dict = {}  # name -> Backend, created once
_failures: dict[str, BackendUnavailableError] = {}
# Re-entrant: _resolve("auto") calls _load. Held while a backend is created, so two threads
# asking at once get the same instance (a backend's import and JIT setup run once).
_lock = threading.RLock()


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
    backend = _instances.get(name)
    if backend is not None:
        return backend
    with _lock:
        return _create(name)


def _create(name: str):
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


def _process_default():
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = _resolve(_check_name(_requested, source=ENV_VAR))
    return _default


def get_backend():
    """The active backend: the innermost :func:`use_backend` of this thread/context, else
    the process default (``FASTBP_BACKEND``, resolved on first call, or :func:`set_backend`).
    ``.name`` says which."""
    scoped = _scoped.get()
    return _process_default() if scoped is None else scoped


def set_backend(name: str):
    """Make ``name`` ("numpy" | "numba" | "cupy" | "auto") the process default and return it.

    Every thread not inside a :func:`use_backend` block sees it. Called inside such a
    block, it also replaces that block's backend for the rest of the block, so the
    caller sees what it asked for. Raises ValueError for an unknown name and
    BackendUnavailableError, with the reason and the fix, for one that cannot run here;
    then nothing changes. Never falls back silently.
    """
    global _default
    backend = _resolve(_check_name(name, source="name"))
    _default = backend
    if _scoped.get() is not None:
        _scoped.set(backend)
    return backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator:
    """Scoped selection for the calling thread and context only:
    ``with fb.use_backend("numpy"): ...`` restores the previous selection after.

    Other threads keep theirs meanwhile; the process default is untouched.
    """
    backend = _resolve(_check_name(name, source="name"))
    token = _scoped.set(backend)
    try:
        yield backend
    finally:
        _scoped.reset(token)


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
