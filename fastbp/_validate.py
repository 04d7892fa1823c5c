"""Argument checks shared by every public entry point.

Each check raises ValueError or TypeError naming the argument, what was
received and what was expected, and runs before anything is modified.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping

import numpy as np

from .backend import array_module_name


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    if shape is not None:
        return f"{type(x).__name__} of shape {tuple(shape)} and dtype {getattr(x, 'dtype', '?')}"
    return f"{x!r} of type {type(x).__name__}"


def choice(name: str, value, options) -> str:
    """``value`` when it is one of ``options`` (strings), else TypeError/ValueError."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str. Received: {name}={value!r} ({type(value).__name__}). "
                        f"Expected one of {list(options)}")
    if value not in options:
        raise ValueError(f"unknown {name}. Received: {name}={value!r}. Expected one of {list(options)}")
    return value


def positive_int(name: str, value, *, minimum: int = 1, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int. Received: {name}={value!r} ({type(value).__name__}). "
                        f"Expected an int >= {minimum}" + (" or None" if allow_none else ""))
    if value < minimum:
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected an int >= {minimum}"
                         + (" or None" if allow_none else ""))
    return int(value)


def positive_float(name: str, value, dtype=None) -> float:
    """A finite float > 0; given a model ``dtype``, also one that stays finite and nonzero
    once cast to it (a float32 lr of 1e-320 would otherwise train with lr = 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Received: {name}={value!r} ({type(value).__name__}). "
                        "Expected a finite float > 0")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected a finite float > 0")
    value = float(value)
    if dtype is not None:
        dtype = np.dtype(dtype)
        info = np.finfo(dtype)
        if value > float(info.max):
            raise ValueError(f"{name} does not fit the model's dtype. Received: {name}={value!r}. "
                             f"Expected at most {float(info.max):.3g} ({dtype.name})")
        if float(dtype.type(value)) == 0.0:
            raise ValueError(f"{name} does not fit the model's dtype: it becomes 0 in {dtype.name}. "
                             f"Received: {name}={value!r}. Expected at least {float(info.smallest_subnormal):.3g} "
                             f"({dtype.name})")
    return value


def seed(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be None or an int >= 0. Received: {name}={value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected None or an int >= 0")
    return int(value)


FLOAT_DTYPES = ("float32", "float64")


def float_dtype(name: str, value) -> np.dtype:
    """float32 or float64 (native byte order), from anything ``np.dtype`` reads as one:
    a name ("float32", "double", "f8", "<f4"), a NumPy type, ``float`` or a dtype."""
    key = None
    if value is not None and not isinstance(value, bool):  # np.dtype(None) would be float64
        try:
            key = np.dtype(value).name
        except (TypeError, ValueError):
            key = None
    if key not in FLOAT_DTYPES:
        raise ValueError(f"unsupported {name}. Received: {name}={value!r}. Expected one of {list(FLOAT_DTYPES)} "
                         "(or a NumPy spelling of them, e.g. 'f4', 'double', np.float64)")
    return np.dtype(key)


def sizes(name: str, value) -> list[int]:
    """Layer sizes ``[n_inputs, n_hidden..., n_outputs]``: an ordered sequence of ints >= 1."""
    if (isinstance(value, (str, bytes, dict, set, frozenset)) or isinstance(value, Mapping)
            or not isinstance(value, Iterable) or not hasattr(value, "__len__")):
        raise TypeError(f"{name} must be a sequence of ints. Received: {name}={value!r} ({type(value).__name__}). "
                        "Expected e.g. [784, 128, 10]")
    if getattr(value, "ndim", 1) != 1:
        raise TypeError(f"{name} must be a flat sequence of ints. Received: {_describe(value)}. "
                        "Expected e.g. [784, 128, 10]")
    values = list(value)
    if len(values) < 2:
        raise ValueError(f"{name} needs at least two entries (inputs, outputs). Received: {name}={values!r}")
    return [positive_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _array_module(x):
    return sys.modules["cupy"] if array_module_name(x) == "cupy" else np


def numeric_array(name: str, x, dtype=None):
    """``x`` as a real-valued numpy or cupy array (cupy stays on its device), checked: numeric
    dtype, not empty, finite — and, given the model's ``dtype``, finite once cast to it."""
    if x is None:
        raise TypeError(f"{name} must be an array. Received: None. Expected an array-like of numbers")
    if isinstance(x, np.ma.MaskedArray):  # np.asarray would drop the mask and keep the masked values
        masked = int(np.ma.count_masked(x))
        if masked:
            raise ValueError(f"{name} is a masked array with masked entries, and fastbp does not read masks. "
                             f"Received: {_describe(x)} with {masked} masked entries. Expected a plain array: "
                             f"fill the masked entries ({name}.filled(value)) or drop their rows")
        x = x.data  # nothing masked: the values are the array
    xp = _array_module(x)
    if xp is np:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged lists and the like
            raise ValueError(f"{name} could not be read as an array ({exc}). Received: {_describe(x)}") from None
    else:
        arr = x
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers. Received: {_describe(arr)}. "
                        "Expected a bool, integer or floating dtype")
    if arr.size == 0:
        raise ValueError(f"{name} is empty. Received: {_describe(arr)}. Expected at least one sample")
    if arr.dtype.kind == "f" and not bool(xp.isfinite(arr).all()):
        raise ValueError(f"{name} contains NaN or Inf. Received: {_describe(arr)}. Expected finite values")
    if dtype is not None and arr.dtype.kind == "f" and arr.dtype.itemsize > np.dtype(dtype).itemsize:
        biggest, limit = float(xp.abs(arr).max()), float(np.finfo(dtype).max)
        if biggest > limit:  # would become Inf in the model's dtype
            raise ValueError(f"{name} does not fit the model's dtype. Received: a value of magnitude {biggest:.3g}. "
                             f"Expected magnitudes up to {limit:.3g} ({np.dtype(dtype).name})")
    return arr


def features(name: str, x, n_features: int, dtype=None):
    """X of shape (n_samples, n_features)."""
    arr = numeric_array(name, x, dtype)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ValueError(f"{name} has the wrong shape. Received: {_describe(arr)}. "
                         f"Expected shape (n_samples, {n_features})")
    return arr


def targets(name: str, y, *, n_samples: int, n_outputs: int, loss: str, dtype):
    """Y as a float array of shape (n_samples, n_outputs), on the module it came in.

    Integer class labels of shape (n_samples,) become one-hot rows for
    cross_entropy; a 1-D Y is a single column for one-output models.
    """
    arr = numeric_array(name, y, dtype)
    xp = _array_module(arr)
    if arr.ndim == 1 and arr.shape[0] == n_samples and loss == "cross_entropy":
        labels = arr
        if labels.dtype.kind == "f" and not bool((labels == xp.floor(labels)).all()):
            raise ValueError(f"{name} as class labels must be whole numbers. Received: {_describe(labels)}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_outputs:
            raise ValueError(f"{name} has class labels out of range. Received: labels in [{lo}, {hi}]. "
                             f"Expected integers in [0, {n_outputs - 1}] for {n_outputs} outputs")
        onehot = xp.zeros((n_samples, n_outputs), dtype=dtype)
        onehot[xp.arange(n_samples), labels.astype(np.int64)] = 1
        return onehot
    if arr.ndim == 1 and arr.shape[0] == n_samples and n_outputs == 1:
        arr = arr.reshape(n_samples, 1)
    if arr.ndim != 2 or arr.shape != (n_samples, n_outputs):
        expected = f"shape ({n_samples}, {n_outputs})"
        if loss == "cross_entropy":
            expected += f" or integer labels of shape ({n_samples},)"
        elif n_outputs == 1:
            expected += f" or ({n_samples},)"
        raise ValueError(f"{name} has the wrong shape. Received: {_describe(arr)}. Expected {expected}")
    if loss == "log_loss" and (float(arr.min()) < 0 or float(arr.max()) > 1):
        raise ValueError(f"{name} out of range for log_loss. Received: values in "
                         f"[{float(arr.min())}, {float(arr.max())}]. Expected targets in [0, 1]")
    if loss == "cross_entropy" and float(arr.min()) < 0:
        raise ValueError(f"{name} out of range for cross_entropy. Received: a minimum of {float(arr.min())}. "
                         "Expected non-negative targets (one-hot rows or probabilities)")
    return arr
