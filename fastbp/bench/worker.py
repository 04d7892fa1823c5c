"""One backend's or one peer library's measurements: what each worker process of ``fastbp bench`` runs.

``python -m fastbp.bench KIND NAME CONFIG.json RESULT.json`` runs :func:`job` in a
fresh process (so one library's thread pools never slow the next one down) and
writes its record; :mod:`fastbp.bench.runner` starts the workers and merges
their records. A failing backend or peer is recorded, never raised.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

import fastbp as fb

from . import machine, peers
from .config import BenchConfig, jsonable
from .optimizer import OptimizerSpec, fit_kwargs
from .report import si
from .timing import flops_per_example, measure_matmul_peak, stats, time_calls, time_once

PROGRESS_TAG = "@fastbp-progress"  # a worker's progress lines on its stdout
# A peer's forms timed side by side; the fastest is the one compared (JAX: per-step jit, and the epoch as a scan).
PEER_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "torch": ({},), "sklearn": ({},), "jax": tuple({"form": f} for f in peers.JAX_FORMS)}
_PEER_FUNCTIONS = {"torch": peers.torch_throughput, "jax": peers.jax_throughput, "sklearn": peers.sklearn_mlp_fit}
# Peers that compile anew for each data shape (and time the compile apart themselves): probed and timed at one n.
_SHAPE_COMPILED = ("jax",)


class LineProgress:
    """A worker's progress, as tagged lines on stdout for the parent's bar."""

    def start(self, what: str) -> None:
        print(f"{PROGRESS_TAG}\tstart\t{what}", flush=True)

    def done(self, note: str | None = None) -> None:
        print(f"{PROGRESS_TAG}\tdone\t{note or ''}", flush=True)


def optimizer_spec(cfg: BenchConfig) -> OptimizerSpec:
    return OptimizerSpec.make(cfg.optimizer, cfg.lr, cfg.momentum)


# ---------------------------------------------------------------------------- data and plans
@dataclass
class _Data:
    X: np.ndarray
    Y: np.ndarray


def _make_data(cfg: BenchConfig) -> _Data:
    """Seeded synthetic data shaped like the model: inputs in [0, 1), one-hot targets."""
    rng = np.random.default_rng(cfg.seed)
    n_in, n_out = cfg.sizes[0], cfg.sizes[-1]
    X = rng.random((cfg.n_samples, n_in)).astype(cfg.dtype)
    Y = np.zeros((cfg.n_samples, n_out), dtype=cfg.dtype)
    Y[np.arange(cfg.n_samples), rng.integers(0, n_out, cfg.n_samples)] = 1
    return _Data(X, Y)


def _plan(cfg: BenchConfig, batch: int, per_sample_s: float) -> tuple[int, int]:
    """``(n, epochs)`` for one timed ``fit`` lasting about ``min_time``: n a multiple of batch, <= n_samples."""
    wanted = cfg.min_time / max(per_sample_s, 1e-9)
    if batch >= cfg.n_samples:
        n = cfg.n_samples
    else:
        n = max(batch, min(cfg.n_samples, int(wanted)) // batch * batch)
    epochs = max(1, min(10_000, round(wanted / n)))
    return n, epochs


def _probe_n(cfg: BenchConfig, batch: int) -> int:
    """Examples in the probe epoch that estimates per-sample time (a multiple of batch)."""
    if batch >= cfg.n_samples:
        return cfg.n_samples
    return min(cfg.n_samples // batch * batch, max(batch, math.ceil(256 / batch) * batch))


# ---------------------------------------------------------------------------- one backend
def _graph_gradients():
    """``fastbp.graph.mlp_gradients`` (the computation-graph engine) where this fastbp has it, else None."""
    try:
        graph = importlib.import_module("fastbp.graph")
    except ImportError:
        return None
    fn = getattr(graph, "mlp_gradients", None)
    return fn if callable(fn) else None


def _bench_backend(be, cfg: BenchConfig, data: _Data, progress) -> dict[str, Any]:
    rec: dict[str, Any] = {"status": "ok", "is_gpu": bool(getattr(be, "is_gpu", False)),
                           "capabilities": {k: bool(getattr(be, k, False))
                                            for k in ("has_compiled_loop", "has_compiled_epoch")}}
    try:
        rec["info"] = be.info()
    except Exception as exc:
        rec["info"] = {"error": f"{type(exc).__name__}: {exc}"}
    rec["blas"] = machine.blas_info()  # the pools this process has now, with their thread counts
    sync = be.synchronize
    fpe = flops_per_example(cfg.sizes)

    # -- the reference matmul rate: the CPU's is measured by the parent; a GPU's here, on the device
    progress.start(f"{be.name}: reference matmul")
    if rec["is_gpu"]:
        rec["matmul_reference"] = be.name
        rec["matmul_peak"] = measure_matmul_peak(cfg.dtype, 4 * cfg.peak_n, backend=be)  # a GPU needs a bigger GEMM
    else:
        rec["matmul_reference"] = "cpu"
    progress.done()

    # -- JIT compile, reported on its own
    progress.start(f"{be.name}: warm-up / JIT compile")
    warmup = getattr(be, "warmup", None)
    if callable(warmup):
        t0 = time.perf_counter()
        reported = warmup(cfg.dtype)
        wall = time.perf_counter() - t0
        rec["jit"] = {"method": "backend.warmup", "seconds": float(reported) if reported is not None else wall,
                      "wall_s": wall}
    progress.done()

    net = fb.MLP(list(cfg.sizes), activation=cfg.activation, loss=cfg.loss, dtype=cfg.dtype, seed=cfg.seed)
    X, Y = be.asarray(data.X, cfg.dtype), be.asarray(data.Y, cfg.dtype)

    # -- one gradient: per-example loop vs vectorized (vs the computation graph), same model and batch
    gb = cfg.grad_batch
    Xg, Yg = X[:gb], Y[:gb]
    grad: dict[str, Any] = {"batch": gb, "flops": fpe * gb}
    calls = {s: (lambda s=s: net.gradients(Xg, Yg, strategy=s)) for s in ("vectorized", "loop")}
    graph_gradients = _graph_gradients()
    if graph_gradients is not None:
        calls["graph"] = lambda: graph_gradients(net, Xg, Yg)
    for strategy, call in calls.items():
        progress.start(f"{be.name}: gradient, {strategy}, batch {gb}")
        first = time_once(call, sync)
        timing = time_calls(call, sync, cfg.repeat, cfg.min_time)
        timing["first_call_s"] = first
        grad[strategy] = timing
        progress.done(f"{timing['seconds']['median'] * 1e3:.3g} ms")
    vec, loop = grad["vectorized"]["seconds"], grad["loop"]["seconds"]
    grad["speedup"] = loop["median"] / vec["median"]
    grad["speedup_range"] = [loop["min"] / vec["max"], loop["max"] / vec["min"]]
    grad["gflops"] = grad["flops"] / vec["median"] / 1e9
    grad["gflops_loop"] = grad["flops"] / loop["median"] / 1e9
    if "graph" in grad:
        grad["graph_vs_vectorized"] = grad["graph"]["seconds"]["median"] / vec["median"]
        grad["gflops_graph"] = grad["flops"] / grad["graph"]["seconds"]["median"] / 1e9
        # the figure only means something if the graph computes the same gradient
        ref, got = calls["vectorized"](), calls["graph"]()
        grad["graph_max_abs_diff_vs_vectorized"] = max(
            float(np.max(np.abs(fb.to_numpy(a) - fb.to_numpy(b)))) for a, b in zip(ref[0] + ref[1], got[0] + got[1]))
    rec["gradient"] = grad
    if "jit" not in rec:
        first = grad["vectorized"]["first_call_s"]
        rec["jit"] = {"method": "first vectorized gradient call minus a steady one",
                      "seconds": max(0.0, first - vec["median"]), "first_call_s": first}

    # -- training throughput across batch sizes
    rows = []
    spec = optimizer_spec(cfg)
    for batch in cfg.resolved_batch_sizes():
        full = batch >= cfg.n_samples
        progress.start(f"{be.name}: training, batch {batch}{' (full)' if full else ''}")
        row: dict[str, Any] = {"batch_size": batch, "full_batch": full, "shuffle": not full}
        try:
            row.update(_bench_training(net, X, Y, batch, cfg, spec, sync, fpe))
            progress.done(f"{si(row['samples_per_s']['median'])} samples/s")
        except Exception as exc:  # a diverged or failing run: recorded, the others go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            progress.done("error")
        rows.append(row)
    rec["training"] = rows
    rec["first_call_excess_s"] = sum(max(0.0, r["first_call_s"] - r["seconds"]["median"])
                                     for r in rows if "first_call_s" in r)
    return rec


def _bench_training(net, X, Y, batch: int, cfg: BenchConfig, spec: OptimizerSpec, sync, fpe: int) -> dict[str, Any]:
    full = batch >= cfg.n_samples
    shuffle = not full  # reshuffling changes nothing for full-batch descent, so it is not paid there
    first_call = [True]  # the first fit sets the optimizer (fresh state); the others continue it

    def fit(n: int, epochs: int) -> None:
        kwargs = fit_kwargs(net, spec, first=first_call[0], threads=cfg.threads)
        first_call[0] = False
        net.fit(X[:n], Y[:n], epochs=epochs, batch_size=None if full else batch, shuffle=shuffle,
                progress=False, **kwargs)

    first = time_once(lambda: fit(batch, 1), sync)  # one step: JIT, workspaces, optimizer state
    n_probe = _probe_n(cfg, batch)
    per_sample = time_once(lambda: fit(n_probe, 1), sync) / n_probe
    n, epochs = _plan(cfg, batch, per_sample)
    times = [time_once(lambda: fit(n, epochs), sync) for _ in range(cfg.repeat)]
    samples = n * epochs
    rates = [samples / t for t in times]
    out: dict[str, Any] = {
        "n": n, "epochs": epochs, "steps_per_region": epochs * (1 if full else n // batch),
        "samples_per_region": samples, "first_call_s": first, "times_s": times,
        "seconds": stats(times), "samples_per_s": stats(rates), "samples_per_s_all": rates,
    }
    out["gflops"] = fpe * out["samples_per_s"]["median"] / 1e9
    return out


# ---------------------------------------------------------------------------- peers
def _variant_name(variant: dict[str, Any]) -> str:
    return ",".join(f"{v}" for v in variant.values()) or "default"


def _bench_peer(peer: str, cfg: BenchConfig, data: _Data, progress) -> dict[str, Any]:
    """A peer library trained on the same model, data, batch sizes and optimizer; not installed is no error.

    Every form of the peer (JAX: ``jit`` and ``scan``) is timed at every batch size; the
    fastest median is the row's figure, and the row says which form it was.
    """
    fn = _PEER_FUNCTIONS[peer]
    variants = PEER_VARIANTS[peer]
    batches = cfg.resolved_batch_sizes()
    rec: dict[str, Any] = {"status": "ok", "function": f"fastbp.bench.peers.{fn.__name__}", "training": [],
                           "variants": [_variant_name(v) for v in variants], "blas": None,
                           "optimizer": optimizer_spec(cfg).describe()}

    def call(n: int, batch: int, epochs: int, variant: dict[str, Any]):
        return fn(sizes=list(cfg.sizes), activation=cfg.activation, loss=cfg.loss, X=data.X[:n], Y=data.Y[:n],
                  batch_size=batch, lr=cfg.lr, epochs=epochs, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads,
                  optimizer=cfg.optimizer, momentum=cfg.momentum, **variant)

    fpe = flops_per_example(cfg.sizes)
    for i, batch in enumerate(batches):
        row: dict[str, Any] = {"batch_size": batch, "full_batch": batch >= cfg.n_samples}
        try:
            figures = {}
            for variant in variants:
                name = _variant_name(variant)
                progress.start(f"peer {peer}{'' if name == 'default' else f' ({name})'}: training, batch {batch}")
                if peer in _SHAPE_COMPILED:  # the probe compiles (timed apart), warms up and measures
                    n = cfg.n_samples if batch >= cfg.n_samples else cfg.n_samples // batch * batch
                    per_sample = 1.0 / call(n, batch, 1, variant)["samples_per_s"]
                    epochs = max(1, min(10_000, round(cfg.min_time / (per_sample * n))))
                else:
                    call(batch, batch, 1, variant)  # warm-up: lazy initialisation, thread pools
                    n_probe = _probe_n(cfg, batch)
                    per_sample = 1.0 / call(n_probe, batch, 1, variant)["samples_per_s"]
                    n, epochs = _plan(cfg, batch, per_sample)
                raw = [call(n, batch, epochs, variant) for _ in range(cfg.repeat)]
                rates = [r["samples_per_s"] for r in raw]
                fig = {"n": n, "epochs": epochs, "samples_per_s": stats(rates), "samples_per_s_all": rates,
                       "raw": [jsonable(r) for r in raw], "gflops": fpe * float(np.median(rates)) / 1e9}
                if "compile_s" in raw[0]:  # measured apart by the peer, never inside the timed epochs
                    fig["compile_s"] = raw[0]["compile_s"]
                figures[name] = fig
            best = max(figures, key=lambda k: figures[k]["samples_per_s"]["median"])
            row.update(figures[best])
            if len(variants) > 1:
                row["form"] = best
                row["variants"] = figures
            progress.done(f"{si(row['samples_per_s']['median'])} samples/s")
        except ImportError as exc:  # the peer library itself is not installed
            for _ in batches[i:]:
                progress.done()
            return {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            progress.done("error")
        rec["training"].append(row)
    rec["blas"] = machine.blas_info()
    if rec["training"] and all("error" in r for r in rec["training"]):
        rec["status"] = "error"
    return rec


# ---------------------------------------------------------------------------- jobs
def job(kind: str, name: str, cfg: BenchConfig, progress) -> dict[str, Any]:
    """One backend's or one peer's measurements, in this process. Never raises for a failed backend."""
    data = _make_data(cfg)
    if kind == "peer":
        limits = thread_limits(cfg.threads)
        try:
            return _bench_peer(name, cfg, data, progress)
        finally:
            restore(limits)
    try:
        with fb.use_backend(name) as be:
            limits = thread_limits(cfg.threads)  # after the backend loaded its libraries, so they are capped
            try:
                _limit_numba_threads(cfg.threads)
                return _bench_backend(be, cfg, data, progress)
            finally:
                restore(limits)
    except fb.BackendUnavailableError as exc:
        return {"status": "unavailable", "reason": f"{exc.reason}. To fix: {exc.fix}"}
    except Exception as exc:  # a broken backend is reported, and the others still run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def worker_main(argv: list[str]) -> int:
    """``python -m fastbp.bench KIND NAME CONFIG.json RESULT.json``: one :func:`job`, its record to RESULT."""
    if len(argv) != 4 or argv[0] not in ("backend", "peer"):
        print("python -m fastbp.bench is the worker process of `fastbp bench`; run `fastbp bench` instead",
              file=sys.stderr)
        return 2
    kind, name, cfg_path, out_path = argv
    with open(cfg_path, encoding="utf-8") as f:
        cfg = BenchConfig.from_json(json.load(f))
    rec = job(kind, name, cfg, LineProgress())
    rec["pid"] = os.getpid()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(jsonable(rec), f)
    return 0


def thread_limits(threads: int | None):
    """Cap BLAS and OpenMP pools (undo with :func:`restore`); None leaves the libraries' defaults."""
    if threads is None:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def restore(limits) -> None:
    if limits is not None:
        limits.restore_original_limits()


def _limit_numba_threads(threads: int | None) -> None:
    numba = sys.modules.get("numba")  # only when a backend has already imported it
    if threads is not None and numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


__all__ = ["job", "worker_main", "thread_limits", "restore", "LineProgress", "PROGRESS_TAG", "PEER_VARIANTS",
           "optimizer_spec"]
