"""The dispatched kernels, public: build your own layers on the array layer.

Each function runs on the active backend (``fb.get_backend()``), takes that
backend's arrays, and writes into ``out`` when given (else allocates it).
Shapes follow the row-major batch convention of ``fastbp.kernels.base``.

>>> import numpy as np, fastbp as fb
>>> a, b = np.ones((2, 3)), np.ones((3, 4))
>>> fb.ops.matmul(a, b).shape
(2, 4)
"""

from __future__ import annotations

from .backend import get_backend


def _out(be, out, shape, like):
    return be.empty(shape, like.dtype) if out is None else out


def matmul(a, b, out=None, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """``out = alpha * op(a) @ op(b) + beta * out`` for 2-D arrays (op = transpose when asked)."""
    be = get_backend()
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if out is None and beta != 0.0:
        raise ValueError(f"beta={beta!r} accumulates into out, so out must be given. Received: out=None")
    out = _out(be, out, (m, n), a)
    be.matmul(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    return out


def hadamard(a, b, out=None):
    """``out = a (.) b``, the elementwise product."""
    be = get_backend()
    out = _out(be, out, a.shape, a)
    be.hadamard(a, b, out)
    return out


def outer(x, y, out=None, *, alpha=1.0, accumulate=False):
    """``out (+)= alpha * x y^T`` for 1-D ``x`` (m,) and ``y`` (n,); accumulate for ``dW += delta a^T``."""
    be = get_backend()
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds into out, so out must be given. Received: out=None")
        out = be.empty((x.shape[0], y.shape[0]), x.dtype)
    be.outer(x, y, out, alpha=alpha, accumulate=accumulate)
    return out


def bias_grad(delta, out=None, *, alpha=1.0):
    """``out = alpha * delta.sum(axis=0)``: the bias gradient of a batch of deltas."""
    be = get_backend()
    out = _out(be, out, (delta.shape[1],), delta)
    be.bias_grad(delta, out, alpha=alpha)
    return out


def activation(name, z, out=None):
    """``out = phi(z)`` for ``name`` in sigmoid, relu, tanh, identity, leaky_relu, softmax (row-wise)."""
    be = get_backend()
    out = _out(be, out, z.shape, z)
    be.activation(name, z, out)
    return out


def activation_backward(name, z, a, delta):
    """``delta = phi'(z) (.) delta`` in place (``a = phi(z)``); returns ``delta``."""
    get_backend().activation_backward(name, z, a, delta)
    return delta


def output_delta(loss, output, z, a, y, delta=None):
    """Fused output layer: returns ``(delta, summed_cost)`` with ``delta = dC/dz`` per example."""
    be = get_backend()
    delta = _out(be, delta, z.shape, z)
    total = be.output_delta(loss, output, z, a, y, delta)
    return delta, total


def sgd_update(params, grads, lr):
    """``params -= lr * grads`` in place."""
    get_backend().sgd_update(params, grads, lr)
    return params


__all__ = ["matmul", "hadamard", "outer", "bias_grad", "activation", "activation_backward",
           "output_delta", "sgd_update"]
