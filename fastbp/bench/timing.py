"""Timing helpers shared by ``fastbp bench`` and the scripts in ``benchmarks/``.

FLOPs count only the matrix products, per example and per weight layer of
``in x out``: forward ``2*in*out``, weight gradient ``2*in*out``, and the input
gradient ``2*in*out`` for every layer but the first (the first layer's input
needs no gradient). The ceilings are this machine's own measured GEMM rates: one
large square GEMM (:func:`measure_matmul_peak`), and the very products of one
training step at a workload's shapes (:func:`gemm_at_shapes`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

FLOP_FORMULA = ("per example, per weight layer in x out: forward 2*in*out + weight gradient 2*in*out "
                "+ input gradient 2*in*out (all layers but the first); elementwise work and the "
                "optimizer update are not counted")


def flops_per_example(sizes) -> int:
    """Matrix-product FLOPs of one example's forward and backward pass (see the module docstring)."""
    total = 0
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += 2 * fan_in * fan_out * (3 if layer > 0 else 2)
    return total


def stats(values) -> dict[str, Any]:
    """Median, min, max, quartiles and spread of ``values``, and every value itself."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("stats needs at least one value. Received: an empty sequence")
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(med), "min": float(arr.min()), "max": float(arr.max()), "q1": float(q1),
            "q3": float(q3), "spread_pct": float(100 * (arr.max() - arr.min()) / med) if med else None,
            "n": int(arr.size), "all": arr.tolist()}


def _no_sync() -> None:
    pass


def time_once(fn: Callable[[], Any], sync: Callable[[], None] = _no_sync) -> float:
    """Seconds of one call of ``fn``, with ``sync`` (a device synchronisation) before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], repeat: int, min_time: float) -> dict[str, Any]:
    """Seconds per call of an already warm ``fn``: ``repeat`` timed regions of ``inner`` calls each.

    ``inner`` is chosen from one calibration call so that a region lasts about
    ``min_time`` (short calls are batched, as ``timeit`` does). ``sync`` runs
    before and after every region.
    """
    once = time_once(fn, sync)
    inner = 1 if once >= min_time else max(1, min(100_000, math.ceil(min_time / max(once, 1e-7))))
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return {"inner": inner, "calibration_s": once, "times_s": times, "seconds": stats(times)}


def measure_matmul_peak(dtype: str, n: int, backend=None, repeat: int = 5) -> dict[str, Any]:
    """The machine's own matmul rate: ``n x n @ n x n`` GEMMs, best of ``repeat``.

    With no backend it is ``numpy.matmul`` (NumPy's BLAS), the reference for every
    CPU backend. Given a GPU backend it is that backend's own ``matmul`` kernel on
    the device, so its settings (TF32, say) apply to the reference as to the figures.
    The best is what figures are compared with: a shared machine only slows a GEMM down.
    """
    rng = np.random.default_rng(0)
    host = [rng.random((n, n), dtype=np.dtype(dtype).type) for _ in range(2)]
    if backend is not None:
        a, b = (backend.asarray(h, dtype) for h in host)
        c = backend.empty((n, n), dtype)
        gemm, sync, how = (lambda: backend.matmul(a, b, c)), backend.synchronize, f"{backend.name} backend matmul"
    else:
        a, b, c = host[0], host[1], np.empty((n, n), dtype=dtype)
        gemm, sync, how = (lambda: np.matmul(a, b, out=c)), _no_sync, "numpy.matmul (BLAS)"
    time_once(gemm, sync)  # warm: thread pools spun up, pages touched, kernels loaded
    times = [time_once(gemm, sync) for _ in range(repeat)]
    gflops = [2.0 * n**3 / t / 1e9 for t in times]
    return {"how": f"{how}, {n}x{n} @ {n}x{n} {dtype}", "n": n, "times_s": times, "gflops": gflops,
            "gflops_best": max(gflops), "gflops_median": float(np.median(gflops))}


# ---------------------------------------------------------------------------- GEMMs at a step's shapes
_COMPILED: dict[str, Callable] = {}


def _compiled_products() -> dict[str, Callable] | None:
    """The Numba backend's own GEMM (``numba_kernels.gemm``, on the BLAS library kernels/blas.py
    chose) ``reps`` times in a compiled loop: the BLAS calls of compiled code, no Python between."""
    if _COMPILED:
        return _COMPILED
    try:
        from fastbp.kernels import blas
        from fastbp.kernels import numba_kernels as K

        blas.active()
    except Exception:  # no numba, or no usable BLAS for it
        return None
    _COMPILED.update(
        forward=lambda a, w, z, reps: K.gemm_loop(False, True, a, w, z.dtype.type(0), z, reps),  # Z = A W^T
        weight_gradient=lambda d, a, g, reps, beta=0.0: K.gemm_loop(True, False, d, a, g.dtype.type(beta), g, reps),
        input_gradient=lambda d, w, p, reps: K.gemm_loop(False, False, d, w, p.dtype.type(0), p, reps),  # P = D W
    )
    return _COMPILED


def _numpy_products() -> dict[str, Callable]:
    def forward(a, w, z, reps):
        for _ in range(reps):
            np.matmul(a, w.T, out=z)

    def weight_gradient(d, a, g, reps):
        for _ in range(reps):
            np.matmul(d.T, a, out=g)

    def input_gradient(d, w, p, reps):
        for _ in range(reps):
            np.matmul(d, w, out=p)

    return {"forward": forward, "weight_gradient": weight_gradient, "input_gradient": input_gradient}


def gemm_at_shapes(sizes, batch: int, dtype: str = "float32", *, compiled: bool = True,
                   min_time: float = 0.02, repeat: int = 5) -> dict[str, Any]:
    """One training step's matrix products alone, at ``batch`` rows, on this machine's BLAS.

    Per weight layer: forward ``Z = A W^T`` (batch x out x in), weight gradient ``D^T A``
    (out x batch x in) and, above the first layer, input gradient ``D W`` (batch x in x out),
    each timed on its own (median of ``repeat`` regions of about ``min_time`` s). The sum
    is the GEMM time of one step: a step cannot be faster with this BLAS, so
    ``samples_per_s_ceiling`` is the throughput at which a step would be GEMMs only.
    ``compiled`` calls them from a Numba loop (the BLAS fastbp's Numba backend uses, no
    Python between calls); without Numba, or with ``compiled=False``, ``numpy.matmul``.
    """
    products = _compiled_products() if compiled else None
    how = "numba_kernels.gemm in a Numba loop (the Numba backend's BLAS), no Python between calls"
    if products is None:
        products, how = _numpy_products(), "numpy.matmul from Python (NumPy's BLAS)"
    rng = np.random.default_rng(0)
    typ = np.dtype(dtype).type
    total, parts, flops = 0.0, [], 0
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        A = rng.random((batch, fan_in), dtype=typ)
        W = rng.random((fan_out, fan_in), dtype=typ)
        D = rng.random((batch, fan_out), dtype=typ)
        cases = {"forward": (A, W, np.empty((batch, fan_out), typ)), "weight_gradient": (D, A, np.empty_like(W))}
        if layer > 0:
            cases["input_gradient"] = (D, W, np.empty_like(A))
        for name, (x, y, out) in cases.items():
            fn = products[name]
            fn(x, y, out, 2)  # compile, warm the pool
            once = time_once(lambda: fn(x, y, out, 1))
            reps = max(3, int(min_time / max(once, 1e-7)))
            t = float(np.median([time_once(lambda: fn(x, y, out, reps)) for _ in range(repeat)])) / reps
            work = 2 * batch * fan_in * fan_out
            total += t
            flops += work
            parts.append({"layer": layer + 1, "product": name, "m_n_k": _mnk(name, batch, fan_in, fan_out),
                          "us": t * 1e6, "gflops": work / t / 1e9})
    return {"how": f"{how}, {dtype}", "batch": batch, "step_gemm_us": total * 1e6, "flops_per_step": flops,
            "gflops": flops / total / 1e9, "samples_per_s_ceiling": batch / total, "products": parts}


def weight_gradient_by_beta(fan_in: int, fan_out: int, batch: int, betas=(0.0, 1.0, 0.9),
                            min_time: float = 0.02, repeat: int = 5) -> dict[str, float] | None:
    """The weight gradient ``G = D^T A + beta G`` (float32, Numba's BLAS) in microseconds per
    ``beta``, alternating: the momentum step adds its gradient to the velocity with beta = 1
    (kernels/numba_kernels.py ``_momentum_step``) because another beta can cost a pass of its own."""
    products = _compiled_products()
    if products is None:
        return None
    rng = np.random.default_rng(0)
    D = rng.random((batch, fan_out), dtype=np.float32)
    A = rng.random((batch, fan_in), dtype=np.float32)
    G = rng.random((fan_out, fan_in), dtype=np.float32) * np.float32(1e-3)
    fn = products["weight_gradient"]
    times: dict[str, list[float]] = {str(b): [] for b in betas}
    for b in betas:
        fn(D, A, G, 2, b)  # compile, warm the pool
    reps = max(3, int(min_time / max(time_once(lambda: fn(D, A, G, 1, 0.0)), 1e-7)))
    for _ in range(repeat):
        for b in betas:
            G[...] = np.float32(1e-3)  # beta = 1 grows G; start each region alike (no denormals, no overflow)
            times[str(b)].append(time_once(lambda: fn(D, A, G, reps, b)) / reps)
    return {b: float(np.median(t)) * 1e6 for b, t in times.items()}


def _mnk(name: str, batch: int, fan_in: int, fan_out: int) -> list[int]:
    return {"forward": [batch, fan_out, fan_in], "weight_gradient": [fan_out, fan_in, batch],
            "input_gradient": [batch, fan_in, fan_out]}[name]


def gemm_share(gemm: dict[str, Any], step_seconds: float) -> dict[str, Any]:
    """A measured step against its GEMMs alone (``gemm`` from :func:`gemm_at_shapes`)."""
    gemm_s = gemm["step_gemm_us"] / 1e6
    return {"step_us": step_seconds * 1e6, "gemm_us": gemm["step_gemm_us"], "gemm_share_pct": 100 * gemm_s / step_seconds,
            "step_over_gemm": step_seconds / gemm_s}
