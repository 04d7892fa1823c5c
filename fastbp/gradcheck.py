"""Gradient check: backpropagation against central finite differences, in float64."""

from __future__ import annotations

import numpy as np

from . import _validate as check


def gradcheck(net, X, Y, eps: float = 1e-5, floor: float = 1e-3, max_params: int | None = None,
              seed: int = 0) -> float:
    """Worst relative error between backprop gradients and central differences.

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
    net : MLP
    X : array of shape (n_samples, n_inputs)
    Y : targets as :meth:`MLP.loss` accepts them
    eps : float > 0, the finite-difference step
    floor : float > 0, an array's scale is at least this share of the whole gradient's
    max_params : int or None, check a seeded random subset of this many parameters
    seed : int, seeds that subset

    Returns
    -------
    float, the worst error over the checked parameters.
    """
    from .network import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net must be a fastbp MLP. Received: {type(net).__name__}")
    eps = check.positive_float("eps", eps)
    floor = check.positive_float("floor", floor)
    max_params = check.positive_int("max_params", max_params, allow_none=True)

    ref = _float64_copy(net)
    Xd, Yd = ref._inputs_targets(X, Y)
    ref._gradients_into(Xd, Yd, "vectorized")
    analytic = ref.backend.to_numpy(ref._grads).copy()

    indices = np.arange(ref.spec.n_params)
    if max_params is not None and max_params < indices.size:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_params, replace=False))
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
    worst = 0.0
    whole = floor * float(np.linalg.norm(numeric[indices])) or np.finfo(np.float64).tiny
    for start, stop in _array_bounds(ref.spec):
        checked = indices[(indices >= start) & (indices < stop)]
        if checked.size:
            a, n = analytic[checked], numeric[checked]
            scale = max(np.linalg.norm(a), np.linalg.norm(n), whole)
            worst = max(worst, float(np.linalg.norm(a - n) / scale))
    return worst


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
