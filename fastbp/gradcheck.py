"""Gradient check: backpropagation against central finite differences, in float64."""

from __future__ import annotations

import numpy as np

from . import _validate as check


def gradcheck(net, X, Y=None, eps: float = 1e-5, floor: float = 1e-3, max_params: int | None = None,
              seed: int = 0) -> float:
    """Worst relative error between backprop gradients and central differences.

    Checks an MLP (``gradcheck(net, X, Y)``) or any function of graph Tensors
    (``gradcheck(f, inputs)``: ``f`` takes :class:`fastbp.graph.Tensor` arguments and
    returns a scalar Tensor; ``inputs`` is the point to check at, a list or tuple of
    ``f``'s arguments, each a Tensor, an array or a number, or a single one). A function's
    arguments become float64 leaves on their backend (an array's: the active one);
    ``backward()`` gives the analytic gradient of every argument, and each element is
    nudged by ``+- eps`` with ``f`` evaluated under ``graph.no_grad()``.

    A float64 copy of ``net`` on the same backend (so that backend's kernels are
    the ones checked) computes the analytic gradient of the mean cost; each
    parameter ``p`` is then nudged to ``p +- eps`` and ``(C(p+eps) - C(p-eps)) / 2eps``
    compared with it. For every parameter array (each W^l and each b^l) the error
    is ``||analytic - numeric|| / max(||analytic||, ||numeric||, floor * ||numeric_all||)``
    (2-norms, the usual gradient-check measure); the worst array's error is returned.
    The floor keeps an array whose gradient is a vanishing share of the whole (a dead
    relu layer, a saturated output) from dividing the differences' own rounding
    (~1e-16 / eps) by almost nothing; per-component ratios would do that everywhere.

    Parameters
    ----------
    net : MLP, or a function of graph Tensors returning a scalar Tensor
    X : array of shape (n_samples, n_inputs); for a function, its arguments
    Y : targets as :meth:`MLP.loss` accepts them; not given for a function
    eps : float > 0, the finite-difference step
    floor : float > 0, an array's scale is at least this share of the whole gradient's
    max_params : int or None, check a seeded random subset of this many parameters (elements)
    seed : int, seeds that subset

    Returns
    -------
    float, the worst error over the checked parameters.
    """
    from .network import MLP

    seed = check.seed("seed", seed)  # numpy's own error for a bad seed would not name it
    if not isinstance(net, MLP) and callable(net):
        return _gradcheck_function(net, X, Y, eps, floor, max_params, seed)
    if not isinstance(net, MLP):
        raise TypeError(f"net must be a fastbp MLP or a function of graph Tensors. Received: {type(net).__name__}")
    if Y is None:
        raise TypeError("Y is required to check an MLP. Received: Y=None. Expected targets as MLP.loss accepts them")
    eps = check.positive_float("eps", eps)
    floor = check.positive_float("floor", floor)
    max_params = check.positive_int("max_params", max_params, allow_none=True)

    ref = _float64_copy(net)
    Xd, Yd = ref._inputs_targets(X, Y)
    ref._gradients_into(Xd, Yd, "vectorized")
    analytic = ref.backend.to_numpy(ref._grads).copy()

    indices = _subset(ref.spec.n_params, max_params, seed)
    params = ref._params
    numeric = np.full(ref.spec.n_params, np.nan)
    for i in indices:
        i = int(i)
        original = float(params[i])
        params[i] = original + eps
        plus = ref._loss(Xd, Yd)
        params[i] = original - eps
        minus = ref._loss(Xd, Yd)
        params[i] = original
        numeric[i] = (plus - minus) / (2.0 * eps)
    return _worst_error(analytic, numeric, indices, _array_bounds(ref.spec), floor)


def _subset(n: int, max_params, seed: int) -> np.ndarray:
    """All of ``range(n)``, or a seeded sorted random subset of ``max_params`` of them."""
    indices = np.arange(n)
    if max_params is not None and max_params < n:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_params, replace=False))
    return indices


def _worst_error(analytic, numeric, indices, bounds, floor: float) -> float:
    """The worst per-array ``||a - n|| / max(||a||, ||n||, floor * ||n_all||)`` over the checked entries."""
    worst = 0.0
    whole = floor * float(np.linalg.norm(numeric[indices])) or np.finfo(np.float64).tiny
    for start, stop in bounds:
        checked = indices[(indices >= start) & (indices < stop)]
        if checked.size:
            a, n = analytic[checked], numeric[checked]
            scale = max(np.linalg.norm(a), np.linalg.norm(n), whole)
            worst = max(worst, float(np.linalg.norm(a - n) / scale))
    return worst


def _gradcheck_function(f, inputs, Y, eps, floor, max_params, seed) -> float:
    """gradcheck for ``f(*Tensors) -> scalar Tensor`` at ``inputs`` (see :func:`gradcheck`)."""
    from . import graph
    from .backend import to_numpy

    if Y is not None:
        raise TypeError(f"Y is only for an MLP; a function takes all its arguments in X. Received: Y of type "
                        f"{type(Y).__name__}. Expected Y=None")
    eps = check.positive_float("eps", eps)
    floor = check.positive_float("floor", floor)
    max_params = check.positive_int("max_params", max_params, allow_none=True)
    args = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if not args:
        raise ValueError("X holds no arguments. Received: an empty sequence. Expected f's arguments")
    # The point, on the host in float64: a float per scalar argument, an array per array one.
    points, backends = [], []
    for i, value in enumerate(args):
        if isinstance(value, graph.Tensor):
            backends.append(value.backend)
            points.append(value.data if value.backend is None else value.numpy().astype(np.float64))
            continue
        t = graph.Tensor(value)  # validates (finite, numeric) like any leaf
        backends.append(t.backend)
        points.append(t.data if t.backend is None else np.array(to_numpy(t.data), dtype=np.float64))

    def leaves(values):
        return [graph._leaf(v, None) if be is None else graph._leaf(graph._on_backend(be, v, np.float64), be)
                for v, be in zip(values, backends)]

    def value_at(values) -> float:
        with graph.no_grad():
            return _scalar_output(f(*leaves(values)))

    tensors = leaves(points)
    out = f(*tensors)
    _scalar_output(out)
    if not out.requires_grad:
        raise ValueError("f's result does not depend on its arguments. Received: a Tensor with requires_grad "
                         "False. Expected a scalar built from the arguments")
    out.backward()
    sizes = [1 if type(p) is float else p.size for p in points]
    analytic = np.concatenate([np.zeros(n) if t.grad is None else np.asarray(to_numpy(t.grad), np.float64).ravel()
                               for t, n in zip(tensors, sizes)])
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    indices = _subset(int(bounds[-1]), max_params, seed)
    numeric = np.full(int(bounds[-1]), np.nan)
    values = [p if type(p) is float else p.copy() for p in points]  # nudged one element at a time
    for flat in indices:
        k = int(np.searchsorted(bounds, flat, side="right")) - 1
        j = int(flat) - int(bounds[k])
        if type(points[k]) is float:
            values[k] = points[k] + eps
            plus = value_at(values)
            values[k] = points[k] - eps
            minus = value_at(values)
            values[k] = points[k]
        else:
            original = float(points[k].flat[j])
            values[k].flat[j] = original + eps
            plus = value_at(values)
            values[k].flat[j] = original - eps
            minus = value_at(values)
            values[k].flat[j] = original
        numeric[flat] = (plus - minus) / (2.0 * eps)
    return _worst_error(analytic, numeric, indices, list(zip(bounds[:-1], bounds[1:])), floor)


def _scalar_output(out) -> float:
    from . import graph

    if not isinstance(out, graph.Tensor) or out.shape != ():
        got = f"a Tensor of shape {out.shape}" if isinstance(out, graph.Tensor) else type(out).__name__
        raise ValueError(f"f must return a scalar graph.Tensor. Received: {got}. Expected shape () "
                         "(reduce with .sum() or .mean(), or return a loss)")
    return out.item()


def _array_bounds(spec):
    """``(start, stop)`` of every W^l and b^l in the flat buffer."""
    for w_off, b_off, fan_out in zip(spec.w_offsets, spec.b_offsets, spec.sizes[1:]):
        yield w_off, b_off
        yield b_off, b_off + fan_out


def _float64_copy(net):
    """``net``'s architecture and parameters in float64, on ``net``'s backend."""
    from .backend import use_backend
    from .network import MLP

    with use_backend(net.backend.name):
        ref = MLP(net.sizes, activation=net.activation, loss=net.loss_name, output=net.output, dtype="float64")
    ref._params[...] = ref.backend.asarray(net.backend.to_numpy(net._params), np.float64)
    return ref
