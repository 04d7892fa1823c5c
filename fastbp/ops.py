"""The dispatched kernels, public: build your own layers on the array layer.

Each function runs on the active backend (``fb.get_backend()``), takes that
backend's arrays, and writes into ``out`` when given (else allocates it).
Shapes follow the row-major batch convention of ``fastbp.kernels.base``.

Every argument is checked before any kernel runs, so a bad call raises the same
ValueError or TypeError on every backend and changes nothing:

* arrays must be the active backend's (NumPy arrays on numpy/numba, CuPy arrays on
  cupy); read-only inputs may also be nested lists, converted to the call's dtype;
  outputs and arrays updated in place must be writable arrays of that backend;
* every array of one call shares one dtype, float32 or float64;
* shapes must match exactly (no broadcasting); a 1-D input to the row-wise kernels
  (``activation``, ``activation_backward``, ``output_delta``) is one example;
* an output may not overlap an input, since some backends' kernels would read what they
  have already overwritten; the exceptions are ``out`` being the very input array of the
  one-pass elementwise ``hadamard``, and of ``activation`` (computed through a copy then).

>>> import numpy as np, fastbp as fb
>>> a, b = np.ones((2, 3)), np.ones((3, 4))
>>> fb.ops.matmul(a, b).shape
(2, 4)
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _validate as check
from .backend import array_module_name, get_backend
from .kernels.base import ACTIVATIONS, LOSSES, NetSpec, OptimizerState, UpdateRule

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------- argument checks
def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def _is_backend_array(be, x) -> bool:
    if be.xp is np:
        return isinstance(x, np.ndarray)
    return array_module_name(x) == "cupy" and isinstance(x, be.xp.ndarray)


def _array_kind(be) -> str:
    return "numpy.ndarray" if be.xp is np else f"{be.xp.__name__}.ndarray"


class _Call:
    """The checked arguments of one kernel call: one backend, one float dtype."""

    def __init__(self, op: str, **named) -> None:
        self.be = get_backend()
        self.op = op
        # The call's dtype: the first float array given (lists take it on); float64 without one.
        dtype = None
        for name, x in named.items():
            self._reject_foreign(name, x)
            if dtype is None and _is_backend_array(self.be, x) and x.dtype in _FLOATS:
                dtype = x.dtype
        self.dtype = dtype or np.dtype(np.float64)
        self.first = None  # (name, array) that fixed the dtype, for the mismatch message

    def _reject_foreign(self, name, x) -> None:
        if x is None or isinstance(x, (list, tuple)):
            return
        if isinstance(x, np.ma.MaskedArray) or isinstance(x, np.matrix):
            raise TypeError(f"{self.op}: {name} must be a plain array. Received: {_describe(x)}. "
                            f"Expected a {_array_kind(self.be)} ({type(x).__name__} semantics are not kept)")
        if not _is_backend_array(self.be, x):
            hint = ""
            if array_module_name(x) == "cupy":
                hint = "; move it with fb.to_numpy, or run under fb.use_backend('cupy')"
            elif isinstance(x, np.ndarray):
                hint = f"; move it with {self.be.xp.__name__}.asarray"
            raise TypeError(f"{self.op}: {name} must be an array of the active {self.be.name!r} backend. "
                            f"Received: {_describe(x)}. Expected a {_array_kind(self.be)}{hint}")

    def array(self, name, x, *, ndim=(1, 2), writable=False):
        """``x`` checked (or, for a read-only input given as a list, converted)."""
        if x is None:
            raise TypeError(f"{self.op}: {name} must be an array. Received: None. Expected a {_array_kind(self.be)}")
        if isinstance(x, (list, tuple)):
            if writable:
                raise TypeError(f"{self.op}: {name} is written in place, so it must be a {_array_kind(self.be)}. "
                                f"Received: a {type(x).__name__}")
            try:
                host = np.asarray(x, dtype=self.dtype)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{self.op}: {name} could not be read as a {self.dtype} array ({exc}). "
                                 f"Received: a {type(x).__name__}") from None
            x = self.be.asarray(host, self.dtype)
        if x.dtype not in _FLOATS:
            raise TypeError(f"{self.op}: {name} must hold float32 or float64 values. Received: {_describe(x)}. "
                            "Expected dtype float32 or float64")
        if self.first is None:
            self.first = (name, x)
        elif x.dtype != self.first[1].dtype:
            raise TypeError(f"{self.op}: every array must share one dtype. Received: {self.first[0]} of dtype "
                            f"{self.first[1].dtype} and {name} of dtype {x.dtype}. Expected {name} of dtype "
                            f"{self.first[1].dtype}")
        if x.ndim not in ndim:
            want = " or ".join(f"{d}-D" for d in ndim)
            raise ValueError(f"{self.op}: {name} has the wrong number of dimensions. Received: {_describe(x)}. "
                             f"Expected a {want} array")
        if writable and not _writeable(x):
            raise ValueError(f"{self.op}: {name} is read-only. Received: {_describe(x)}. Expected a writable array")
        return x

    def shape(self, name, x, expected: tuple, why: str = "") -> None:
        if tuple(x.shape) != tuple(expected):
            raise ValueError(f"{self.op}: {name} has the wrong shape. Received: {tuple(x.shape)}. "
                             f"Expected {tuple(expected)}{why}")

    def apart(self, out_name, out, *inputs, allow_same=False) -> None:
        """``out`` shares no memory with ``inputs`` (or, when allowed, is exactly one of them)."""
        for name, x in inputs:
            if x is None or (allow_same and _same_view(out, x)):
                continue
            if _may_share_memory(self.be, out, x):
                allowed = f" (or {name} itself)" if allow_same else ""
                raise ValueError(f"{self.op}: {out_name} overlaps {name}. Received: two views of the same memory. "
                                 f"Expected {out_name} apart from {name}{allowed}")

    def scalar(self, name, value) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{self.op}: {name} must be a real number. Received: {name}={value!r} "
                            f"({type(value).__name__}). Expected a finite float")
        if not math.isfinite(value):
            raise ValueError(f"{self.op}: {name} must be finite. Received: {name}={value!r}. Expected a finite float")
        return float(value)


def _writeable(x) -> bool:
    flags = getattr(x, "flags", None)
    return True if flags is None else bool(getattr(flags, "writeable", True))


def _pointer(x) -> int:
    data = x.data
    return int(data.ptr) if hasattr(data, "ptr") else int(x.__array_interface__["data"][0])


def _same_view(a, b) -> bool:
    return a is b or (a.shape == b.shape and a.strides == b.strides and _pointer(a) == _pointer(b))


def _may_share_memory(be, a, b) -> bool:
    if be.xp is np:
        return bool(np.may_share_memory(a, b))
    may = getattr(be.xp, "may_share_memory", None)
    return bool(may(a, b)) if may is not None else False


def _rows(x):
    """A 1-D vector as a batch of one row (a view); 2-D batches unchanged."""
    return x.reshape(1, -1) if x.ndim == 1 else x


# ---------------------------------------------------------------- kernels
def matmul(a, b, out=None, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """``out = alpha * op(a) @ op(b) + beta * out`` (op = transpose when asked).

    a : 2-D, ``op(a)`` of shape (m, k); b : 2-D, ``op(b)`` of shape (k, n);
    out : (m, n), required when ``beta != 0`` (it is accumulated into).
    """
    call = _Call("matmul", a=a, b=b, out=out)
    a, b = call.array("a", a, ndim=(2,)), call.array("b", b, ndim=(2,))
    for name, flag in (("trans_a", trans_a), ("trans_b", trans_b)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"matmul: {name} must be a bool. Received: {name}={flag!r}")
    alpha, beta = call.scalar("alpha", alpha), call.scalar("beta", beta)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k_b, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k_b:
        raise ValueError(f"matmul: inner dimensions differ. Received: op(a) of shape {(m, k)} and op(b) of shape "
                         f"{(k_b, n)} (trans_a={bool(trans_a)}, trans_b={bool(trans_b)}). "
                         f"Expected op(b) with {k} rows")
    if out is None:
        if beta != 0.0:
            raise ValueError(f"matmul: beta={beta!r} accumulates into out, so out must be given. Received: out=None")
        out = call.be.empty((m, n), call.dtype)
    else:
        out = call.array("out", out, ndim=(2,), writable=True)
        call.shape("out", out, (m, n), " (rows of op(a), columns of op(b))")
        call.apart("out", out, ("a", a), ("b", b))
    call.be.matmul(a, b, out, trans_a=bool(trans_a), trans_b=bool(trans_b), alpha=alpha, beta=beta)
    return out


def hadamard(a, b, out=None):
    """``out = a (.) b``, the elementwise product of two arrays of one shape (``out`` may be ``a`` or ``b``)."""
    call = _Call("hadamard", a=a, b=b, out=out)
    a, b = call.array("a", a), call.array("b", b)
    call.shape("b", b, a.shape, " (the shape of a; no broadcasting)")
    if out is None:
        out = call.be.empty(a.shape, call.dtype)
    else:
        out = call.array("out", out, writable=True)
        call.shape("out", out, a.shape, " (the shape of a)")
        call.apart("out", out, ("a", a), ("b", b), allow_same=True)
    call.be.hadamard(a, b, out)
    return out


def outer(x, y, out=None, *, alpha=1.0, accumulate=False):
    """``out (+)= alpha * x y^T`` for ``x`` (m,) and ``y`` (n,); accumulate for ``dW += delta a^T``."""
    call = _Call("outer", x=x, y=y, out=out)
    x, y = call.array("x", x, ndim=(1,)), call.array("y", y, ndim=(1,))
    alpha = call.scalar("alpha", alpha)
    if not isinstance(accumulate, (bool, np.bool_)):
        raise TypeError(f"outer: accumulate must be a bool. Received: accumulate={accumulate!r}")
    if out is None:
        if accumulate:
            raise ValueError("outer: accumulate=True adds into out, so out must be given. Received: out=None")
        out = call.be.empty((x.shape[0], y.shape[0]), call.dtype)
    else:
        out = call.array("out", out, ndim=(2,), writable=True)
        call.shape("out", out, (x.shape[0], y.shape[0]), " (len(x), len(y))")
        call.apart("out", out, ("x", x), ("y", y))
    call.be.outer(x, y, out, alpha=alpha, accumulate=bool(accumulate))
    return out


def add_bias(z, b):
    """``z += b`` on every row of ``z`` (n, k), in place, for ``b`` of shape (k,); returns ``z``."""
    call = _Call("add_bias", z=z, b=b)
    z = call.array("z", z, ndim=(2,), writable=True)
    b = call.array("b", b, ndim=(1,))
    call.shape("b", b, (z.shape[1],), " (one bias per column of z)")
    call.apart("z", z, ("b", b))
    call.be.add_bias(z, b)
    return z


def bias_grad(delta, out=None, *, alpha=1.0):
    """``out = alpha * delta.sum(axis=0)``: the bias gradient of a batch of deltas (n, k) -> (k,)."""
    call = _Call("bias_grad", delta=delta, out=out)
    delta = call.array("delta", delta, ndim=(2,))
    alpha = call.scalar("alpha", alpha)
    if out is None:
        out = call.be.empty((delta.shape[1],), call.dtype)
    else:
        out = call.array("out", out, ndim=(1,), writable=True)
        call.shape("out", out, (delta.shape[1],), " (one entry per column of delta)")
        call.apart("out", out, ("delta", delta))
    call.be.bias_grad(delta, out, alpha=alpha)
    return out


def activation(name, z, out=None):
    """``out = phi(z)`` for ``name`` in sigmoid, relu, tanh, identity, leaky_relu, softmax (row-wise).

    z : (n, k) or one example (k,); ``out`` has z's shape and may be ``z`` itself.
    """
    check.choice("name", name, ACTIVATIONS)
    call = _Call("activation", z=z, out=out)
    z = call.array("z", z)
    if out is None:
        out = call.be.empty(z.shape, call.dtype)
    else:
        out = call.array("out", out, writable=True)
        call.shape("out", out, z.shape, " (the shape of z)")
        call.apart("out", out, ("z", z), allow_same=True)
    if _may_share_memory(call.be, out, z):
        # The kernel contract does not let out alias z (a multi-pass kernel, e.g. leaky_relu's
        # scale-then-max, would read what it already wrote), so in place goes through a copy.
        tmp = call.be.empty(z.shape, call.dtype)
        call.be.activation(name, _rows(z), _rows(tmp))
        out[...] = tmp
    else:
        call.be.activation(name, _rows(z), _rows(out))
    return out


def activation_backward(name, z, a, delta):
    """``delta = phi'(z) (.) delta`` in place (``a = phi(z)``); returns ``delta``.

    z, a, delta : one shape, (n, k) or one example (k,); delta may not overlap z or a.
    """
    check.choice("name", name, ACTIVATIONS)
    call = _Call("activation_backward", z=z, a=a, delta=delta)
    z, a = call.array("z", z), call.array("a", a)
    delta = call.array("delta", delta, writable=True)
    call.shape("a", a, z.shape, " (the shape of z)")
    call.shape("delta", delta, z.shape, " (the shape of z)")
    call.apart("delta", delta, ("z", z), ("a", a))
    call.be.activation_backward(name, _rows(z), _rows(a), _rows(delta))
    return delta


def output_delta(loss, output, z, a, y, delta=None):
    """Fused output layer: returns ``(delta, summed_cost)`` with ``delta = dC/dz`` per example.

    z, a = phi_output(z), y (targets, labels one-hot) : one shape, (n, k) or one example (k,).
    The cost is a Python float on the CPU backends, a device scalar on a GPU one.
    """
    check.choice("loss", loss, LOSSES)
    check.choice("output", output, ACTIVATIONS)
    call = _Call("output_delta", z=z, a=a, y=y, delta=delta)
    z, a, y = call.array("z", z), call.array("a", a), call.array("y", y)
    call.shape("a", a, z.shape, " (the shape of z)")
    call.shape("y", y, z.shape, " (the shape of z)")
    if delta is None:
        delta = call.be.empty(z.shape, call.dtype)
    else:
        delta = call.array("delta", delta, writable=True)
        call.shape("delta", delta, z.shape, " (the shape of z)")
        call.apart("delta", delta, ("z", z), ("a", a), ("y", y))
    total = call.be.output_delta(loss, output, _rows(z), _rows(a), _rows(y), _rows(delta))
    return delta, total


def sgd_update(params, grads, lr):
    """``params -= lr * grads`` in place, for two flat (1-D) buffers of one length; returns ``params``.

    The plain-SGD case of the backend's one update kernel (``Backend.update``); momentum and
    Adam live in :mod:`fastbp.optim`, which keeps their state.
    """
    call = _Call("sgd_update", params=params, grads=grads)
    params = call.array("params", params, ndim=(1,), writable=True)
    grads = call.array("grads", grads, ndim=(1,))
    call.shape("grads", grads, params.shape, " (the shape of params)")
    lr = call.scalar("lr", lr)
    call.apart("params", params, ("grads", grads))
    n = params.shape[0]
    if n == 0:
        return params
    # Plain SGD reads no layer layout; one "layer" of n - 1 inputs and one output spans n values.
    spec = NetSpec((n - 1, 1), "identity", "identity", "mse", params.dtype)
    state = OptimizerState(call.be.zeros((0, n), params.dtype))
    xp = call.be.xp
    # compiled updates walk flat memory: strided views go through contiguous copies
    flat = params if params.flags.c_contiguous else xp.ascontiguousarray(params)
    call.be.update(spec, UpdateRule("sgd", lr=lr), flat, xp.ascontiguousarray(grads), state, 1)
    if flat is not params:
        params[...] = flat
    return params


__all__ = ["matmul", "hadamard", "outer", "add_bias", "bias_grad", "activation", "activation_backward",
           "output_delta", "sgd_update"]
