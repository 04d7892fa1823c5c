"""The benchmark runner behind ``fastbp bench``.

For every usable backend it measures, on one model (default 784-128-10, sigmoid, MSE):

* one gradient of the mean cost over a batch, with the naive per-example loop
  and with the vectorized pass — same model, same batch — and the speedup;
* training throughput (samples/s) of ``MLP.fit`` across batch sizes, from
  per-example SGD (batch 1) to full-batch gradient descent.

How the timing stays honest:

* every measured call is warmed up first; a backend's JIT compile time is
  reported on its own (``backend.warmup(dtype)`` when the backend has one, else
  the first call minus a steady one), never folded into a median;
* the device is synchronised before and after every timed region;
* each figure is the median over ``repeat`` timed regions, with min, max and
  quartiles; every raw time goes into the JSON record;
* each backend (and each peer library) runs in a fresh worker process, so one
  backend's BLAS or OpenMP thread pool, still spinning after its last call,
  never slows the next one down (on a 2-core machine two spinning pools halve a
  GEMM's speed);
* FLOP rates count only the matrix products, per example and per weight layer
  of ``in x out``: forward ``2*in*out``, weight gradient ``2*in*out``, and the
  input gradient ``2*in*out`` for every layer but the first. They are compared
  with the machine's own measured matmul rate (one large GEMM per dtype,
  measured at the start and at the end of the run; the best is kept).

:func:`run` returns a JSON-ready dict; :mod:`fastbp.bench.report` prints it,
writes it and plots it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import fastbp as fb

from . import machine
from .._validate import FLOAT_DTYPES

SCHEMA = "fastbp-bench/1"
PEERS = ("torch", "sklearn")
DTYPES = FLOAT_DTYPES
FULL = "full"  # a batch-size entry meaning "the whole training set"
FLOP_FORMULA = ("per example, per weight layer in x out: forward 2*in*out + weight gradient 2*in*out "
                "+ input gradient 2*in*out (all layers but the first); elementwise work and the "
                "SGD update are not counted")
_PROGRESS_TAG = "@fastbp-progress"  # a worker's progress lines on its stdout


@dataclass(frozen=True)
class BenchConfig:
    """What ``fastbp bench`` measures. ``batch_sizes`` holds ints and/or ``"full"``."""

    backends: tuple[str, ...] | None = None  # None: every backend usable here
    sizes: tuple[int, ...] = (784, 128, 10)
    activation: str = "sigmoid"
    loss: str = "mse"
    batch_sizes: tuple = (1, 4, 16, 64, 256, 1024, FULL)
    n_samples: int = 4096
    grad_batch: int = 256
    dtype: str = "float32"
    repeat: int = 5
    min_time: float = 0.25  # seconds each timed region lasts at least
    lr: float = 0.05
    seed: int = 0
    peers: tuple[str, ...] = ()
    peak_n: int = 2048  # the reference GEMM is peak_n x peak_n x peak_n
    threads: int | None = None  # cap BLAS/OpenMP (threadpoolctl) and Numba threads; None: library defaults
    isolate: bool = True  # each backend and peer in its own worker process
    quick: bool = False

    def resolved_batch_sizes(self) -> list[int]:
        """The batch sizes as ints (``"full"`` -> ``n_samples``), sorted, without duplicates."""
        return sorted({self.n_samples if b == FULL else int(b) for b in self.batch_sizes})

    @classmethod
    def from_json(cls, record: dict) -> "BenchConfig":
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        for key in ("backends", "sizes", "batch_sizes", "peers"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)


DEFAULT = BenchConfig()
QUICK = BenchConfig(batch_sizes=(1, 32, FULL), n_samples=1024, grad_batch=64, repeat=3, min_time=0.03,
                    peak_n=1024, quick=True)


def flops_per_example(sizes) -> int:
    """Matrix-product FLOPs of one example's forward and backward pass (see the module docstring)."""
    total = 0
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += 2 * fan_in * fan_out * (3 if layer > 0 else 2)
    return total


def backend_status() -> dict[str, str | None]:
    """``fastbp.backend_status()``, or the same asked one backend at a time if it fails as a whole.

    Per backend: None when usable here, else the reason (and fix) it is not.
    """
    try:
        return fb.backend_status()
    except Exception:  # e.g. a backend module that fails to import: ask one by one
        pass
    status: dict[str, str | None] = {}
    for name in fb.BACKEND_NAMES:
        try:
            with fb.use_backend(name):
                pass
            status[name] = None
        except fb.BackendUnavailableError as exc:
            status[name] = f"{exc.reason}. To fix: {exc.fix}"
        except ImportError as exc:
            status[name] = f"its module does not import here ({type(exc).__name__}: {exc})"
        except Exception as exc:
            status[name] = f"failed to start ({type(exc).__name__}: {exc})"
    return status


# ---------------------------------------------------------------------------- timing
def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(med), "min": float(arr.min()), "max": float(arr.max()),
            "q1": float(q1), "q3": float(q3)}


def _time_once(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
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
    once = _time_once(fn, sync)
    inner = 1 if once >= min_time else max(1, min(100_000, math.ceil(min_time / max(once, 1e-7))))
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return {"inner": inner, "calibration_s": once, "times_s": times, "seconds": _stats(times)}


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
        gemm, sync, how = (lambda: np.matmul(a, b, out=c)), (lambda: None), "numpy.matmul (BLAS)"
    _time_once(gemm, sync)  # warm: thread pools spun up, pages touched, kernels loaded
    times = [_time_once(gemm, sync) for _ in range(repeat)]
    gflops = [2.0 * n**3 / t / 1e9 for t in times]
    return {"how": f"{how}, {n}x{n} @ {n}x{n} {dtype}", "n": n, "times_s": times, "gflops": gflops,
            "gflops_best": max(gflops), "gflops_median": float(np.median(gflops))}


# ---------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar on stderr saying what runs now; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            # On a terminal the bar redraws as each step starts; in a log, at most every 10 s.
            self._live = sys.stderr.isatty()
            self._bar = tqdm(total=total, file=sys.stderr, unit="step", desc="fastbp bench", leave=False,
                             dynamic_ncols=True, mininterval=0.1 if self._live else 10.0)

    def start(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(what, refresh=self._live)

    def done(self, note: str | None = None) -> None:
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _LineProgress:
    """A worker's progress, as tagged lines on stdout for the parent's bar."""

    def start(self, what: str) -> None:
        print(f"{_PROGRESS_TAG}\tstart\t{what}", flush=True)

    def done(self, note: str | None = None) -> None:
        print(f"{_PROGRESS_TAG}\tdone\t{note or ''}", flush=True)


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


def _si(x: float | None) -> str:
    """3 significant digits with a k/M/G suffix: 3.12k, 48.2k, 1.23M."""
    if x is None or not math.isfinite(x):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


# ---------------------------------------------------------------------------- one backend
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

    # -- one gradient: per-example loop vs vectorized, same model and batch
    gb = cfg.grad_batch
    Xg, Yg = X[:gb], Y[:gb]
    grad: dict[str, Any] = {"batch": gb, "flops": fpe * gb}
    for strategy in ("vectorized", "loop"):
        progress.start(f"{be.name}: gradient, {strategy}, batch {gb}")
        call = lambda s=strategy: net.gradients(Xg, Yg, strategy=s)  # noqa: E731
        first = _time_once(call, sync)
        timing = time_calls(call, sync, cfg.repeat, cfg.min_time)
        timing["first_call_s"] = first
        grad[strategy] = timing
        progress.done(f"{timing['seconds']['median'] * 1e3:.3g} ms")
    vec, loop = grad["vectorized"]["seconds"], grad["loop"]["seconds"]
    grad["speedup"] = loop["median"] / vec["median"]
    grad["speedup_range"] = [loop["min"] / vec["max"], loop["max"] / vec["min"]]
    grad["gflops"] = grad["flops"] / vec["median"] / 1e9
    grad["gflops_loop"] = grad["flops"] / loop["median"] / 1e9
    rec["gradient"] = grad
    if "jit" not in rec:
        first = grad["vectorized"]["first_call_s"]
        rec["jit"] = {"method": "first vectorized gradient call minus a steady one",
                      "seconds": max(0.0, first - vec["median"]), "first_call_s": first}

    # -- training throughput across batch sizes
    rows = []
    for batch in cfg.resolved_batch_sizes():
        full = batch >= cfg.n_samples
        progress.start(f"{be.name}: training, batch {batch}{' (full)' if full else ''}")
        row: dict[str, Any] = {"batch_size": batch, "full_batch": full, "shuffle": not full}
        try:
            row.update(_bench_training(net, X, Y, batch, cfg, sync, fpe))
            progress.done(f"{_si(row['samples_per_s']['median'])} samples/s")
        except Exception as exc:  # a diverged or failing run: recorded, the others go on
            row["error"] = f"{type(exc).__name__}: {exc}"
            progress.done("error")
        rows.append(row)
    rec["training"] = rows
    rec["first_call_excess_s"] = sum(max(0.0, r["first_call_s"] - r["seconds"]["median"])
                                     for r in rows if "first_call_s" in r)
    return rec


def _bench_training(net, X, Y, batch: int, cfg: BenchConfig, sync, fpe: int) -> dict[str, Any]:
    full = batch >= cfg.n_samples
    shuffle = not full  # reshuffling changes nothing for full-batch descent, so it is not paid there

    def fit(n: int, epochs: int) -> None:
        net.fit(X[:n], Y[:n], epochs=epochs, batch_size=None if full else batch, lr=cfg.lr,
                shuffle=shuffle, progress=False)

    first = _time_once(lambda: fit(batch, 1), sync)  # one step: JIT, workspaces
    n_probe = _probe_n(cfg, batch)
    per_sample = _time_once(lambda: fit(n_probe, 1), sync) / n_probe
    n, epochs = _plan(cfg, batch, per_sample)
    times = [_time_once(lambda: fit(n, epochs), sync) for _ in range(cfg.repeat)]
    samples = n * epochs
    rates = [samples / t for t in times]
    out: dict[str, Any] = {
        "n": n, "epochs": epochs, "steps_per_region": epochs * (1 if full else n // batch),
        "samples_per_region": samples, "first_call_s": first, "times_s": times,
        "seconds": _stats(times), "samples_per_s": _stats(rates), "samples_per_s_all": rates,
    }
    out["gflops"] = fpe * out["samples_per_s"]["median"] / 1e9
    return out


# ---------------------------------------------------------------------------- peers
_PEER_FUNCTIONS = {"torch": "torch_sgd_throughput", "sklearn": "sklearn_mlp_fit"}


def _peer_module():
    try:
        return importlib.import_module("fastbp.bench.peers"), None
    except ModuleNotFoundError as exc:
        if exc.name == "fastbp.bench.peers":
            return None, "fastbp.bench.peers is not part of this fastbp install"
        return None, f"fastbp.bench.peers needs a module that is missing: {exc}"
    except Exception as exc:
        return None, f"fastbp.bench.peers failed to import: {type(exc).__name__}: {exc}"


def _call_with_known_kwargs(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its signature accepts (peers differ in what they take)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _peer_rate(result) -> float:
    """samples/s from a peer function's result dict."""
    if isinstance(result, dict):
        for key in ("samples_per_s", "samples_per_second", "throughput"):
            if result.get(key) is not None:
                return float(result[key])
        if result.get("seconds") and result.get("samples"):
            return float(result["samples"]) / float(result["seconds"])
    raise TypeError(f"peer result has no samples_per_s. Received: {result!r}")


def _bench_peer(peer: str, cfg: BenchConfig, data: _Data, progress) -> dict[str, Any]:
    """A peer library trained on the same model, data, batch sizes and lr; unavailable is not an error."""
    fn_name = _PEER_FUNCTIONS[peer]
    batches = cfg.resolved_batch_sizes()
    module, why_not = _peer_module()
    fn = getattr(module, fn_name, None) if module is not None else None
    if fn is None:
        for _ in batches:
            progress.done()
        return {"status": "unavailable", "reason": why_not or f"fastbp.bench.peers has no {fn_name}()"}
    rec: dict[str, Any] = {"status": "ok", "function": f"fastbp.bench.peers.{fn_name}", "training": [],
                           "blas": None}

    def call(n: int, batch: int, epochs: int):
        return _call_with_known_kwargs(
            fn, sizes=list(cfg.sizes), activation=cfg.activation, loss=cfg.loss, X=data.X[:n], Y=data.Y[:n],
            batch_size=batch, lr=cfg.lr, epochs=epochs, dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)

    fpe = flops_per_example(cfg.sizes)
    for i, batch in enumerate(batches):
        progress.start(f"peer {peer}: training, batch {batch}")
        row: dict[str, Any] = {"batch_size": batch, "full_batch": batch >= cfg.n_samples}
        try:
            call(batch, batch, 1)  # warm-up
            n_probe = _probe_n(cfg, batch)
            per_sample = 1.0 / _peer_rate(call(n_probe, batch, 1))
            n, epochs = _plan(cfg, batch, per_sample)
            raw = [call(n, batch, epochs) for _ in range(cfg.repeat)]
            rates = [_peer_rate(r) for r in raw]
            row.update({"n": n, "epochs": epochs, "samples_per_s": _stats(rates), "samples_per_s_all": rates,
                        "raw": [_jsonable(r) for r in raw], "gflops": fpe * float(np.median(rates)) / 1e9})
            progress.done(f"{_si(row['samples_per_s']['median'])} samples/s")
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


# ---------------------------------------------------------------------------- jobs and workers
def _job(kind: str, name: str, cfg: BenchConfig, progress) -> dict[str, Any]:
    """One backend's or one peer's measurements, in this process. Never raises for a failed backend."""
    data = _make_data(cfg)
    if kind == "peer":
        limits = _thread_limits(cfg.threads)
        try:
            return _bench_peer(name, cfg, data, progress)
        finally:
            _restore(limits)
    try:
        with fb.use_backend(name) as be:
            limits = _thread_limits(cfg.threads)  # after the backend loaded its libraries, so they are capped
            try:
                _limit_numba_threads(cfg.threads)
                return _bench_backend(be, cfg, data, progress)
            finally:
                _restore(limits)
    except fb.BackendUnavailableError as exc:
        return {"status": "unavailable", "reason": f"{exc.reason}. To fix: {exc.fix}"}
    except Exception as exc:  # a broken backend is reported, and the others still run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _job_in_worker(kind: str, name: str, cfg: BenchConfig, progress: _Progress) -> dict[str, Any]:
    """:func:`_job` in a fresh ``python -m fastbp.bench`` process; its progress drives ``progress``."""
    with tempfile.TemporaryDirectory(prefix="fastbp-bench-") as tmp:
        cfg_path, out_path, err_path = (os.path.join(tmp, f) for f in ("config.json", "result.json", "stderr"))
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(asdict(cfg), f)
        env = dict(os.environ)
        root = str(Path(fb.__file__).resolve().parent.parent)  # this fastbp, installed or not
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(err_path, "w", encoding="utf-8") as err:
            proc = subprocess.Popen([sys.executable, "-m", "fastbp.bench", kind, name, cfg_path, out_path],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            try:
                for line in proc.stdout:
                    tag, _, rest = line.rstrip("\n").partition("\t")
                    if tag != _PROGRESS_TAG:
                        continue
                    event, _, text = rest.partition("\t")
                    (progress.start if event == "start" else progress.done)(text or None)
                code = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        with open(err_path, encoding="utf-8", errors="replace") as f:
            stderr = f.read()
        if code != 0 or not os.path.exists(out_path):
            return {"status": "error", "error": f"worker process exited with status {code}",
                    "stderr_tail": stderr[-4000:]}
        with open(out_path, encoding="utf-8") as f:
            rec = json.load(f)
    if stderr.strip():
        rec["worker_stderr"] = stderr[-4000:]  # warnings the worker printed: kept, not hidden
    return rec


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("backend", "peer"):
        print("python -m fastbp.bench is the worker process of `fastbp bench`; run `fastbp bench` instead",
              file=sys.stderr)
        return 2
    kind, name, cfg_path, out_path = argv
    with open(cfg_path, encoding="utf-8") as f:
        cfg = BenchConfig.from_json(json.load(f))
    rec = _job(kind, name, cfg, _LineProgress())
    rec["pid"] = os.getpid()
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(rec), f)
    return 0


def _thread_limits(threads: int | None):
    """Cap BLAS and OpenMP pools (undo with :func:`_restore`); None leaves the libraries' defaults."""
    if threads is None:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def _restore(limits) -> None:
    if limits is not None:
        limits.restore_original_limits()


def _limit_numba_threads(threads: int | None) -> None:
    numba = sys.modules.get("numba")  # only when a backend has already imported it
    if threads is not None and numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# ---------------------------------------------------------------------------- the suite
def run(cfg: BenchConfig, *, progress: bool = True, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite described by ``cfg``; returns the JSON-ready record (every raw figure)."""
    t_start = time.perf_counter()
    busy0, own0 = machine.cpu_busy_seconds(), machine.own_cpu_seconds()
    status = backend_status()
    names = list(cfg.backends) if cfg.backends else [n for n, why in status.items() if why is None]
    limits = _thread_limits(cfg.threads)  # for the reference GEMM, and so the record shows the caps
    try:
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "fastbp_version": fb.__version__,
            "source": machine.source_state(str(Path(fb.__file__).resolve().parent)),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": argv,
            "config": {**asdict(cfg), "batch_sizes_resolved": cfg.resolved_batch_sizes()},
            "flops": {"per_example": flops_per_example(cfg.sizes), "formula": FLOP_FORMULA},
            "backend_status": status,
            "machine": machine.describe(deep_gpu="cupy" in names),
            "matmul_peak": {},
            "backends": {},
            "peers": {},
        }
        n_batches = len(cfg.resolved_batch_sizes())
        bar = _Progress(2 + len(names) * (4 + n_batches) + len(cfg.peers) * n_batches, progress)
        job = _job_in_worker if cfg.isolate else _job
        try:
            bar.start("reference matmul (numpy BLAS)")
            peak = measure_matmul_peak(cfg.dtype, cfg.peak_n)
            bar.done(f"{peak['gflops_best']:.0f} GFLOP/s")
            for name in names:
                result["backends"][name] = job("backend", name, cfg, bar)
            for name, why in status.items():
                if name not in result["backends"] and why is not None:
                    result["backends"][name] = {"status": "unavailable", "reason": why}
            for peer in cfg.peers:
                result["peers"][peer] = job("peer", peer, cfg, bar)
            bar.start("reference matmul again")
            _merge_peak(peak, measure_matmul_peak(cfg.dtype, cfg.peak_n))
            bar.done()
        finally:
            bar.close()
    finally:
        _restore(limits)
    result["matmul_peak"]["cpu"] = peak
    for rec in result["backends"].values():
        if "matmul_peak" in rec:  # a GPU's reference, measured by its worker
            result["matmul_peak"][rec["matmul_reference"]] = rec.pop("matmul_peak")
    _apply_peaks(result)
    result["machine"]["load_average_end"] = machine.load_average()
    result["summary"] = summarize(result)
    result["elapsed_s"] = time.perf_counter() - t_start
    busy1, own1 = machine.cpu_busy_seconds(), machine.own_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        # What else ran meanwhile: the machine's busy CPU time minus this run's own (workers included).
        result["machine"]["other_cpu_seconds"] = max(0.0, (busy1 - busy0) - (own1 - own0))
    return result


def _merge_peak(peak: dict[str, Any], again: dict[str, Any]) -> None:
    peak["times_s"] += again["times_s"]
    peak["gflops"] += again["gflops"]
    peak["gflops_best"] = max(peak["gflops"])
    peak["gflops_median"] = float(np.median(peak["gflops"]))
    peak["how"] += "; measured at the start and the end of the run"


def _apply_peaks(result: dict[str, Any]) -> None:
    """``pct_of_matmul`` for every FLOP rate, against its device's best measured GEMM."""
    recs = list(result["backends"].values()) + list(result["peers"].values())
    for rec in recs:
        peak = result["matmul_peak"].get(rec.get("matmul_reference", "cpu"))
        if peak is None:
            continue
        for fig in [rec.get("gradient") or {}] + rec.get("training", []):
            if "gflops" in fig:
                fig["pct_of_matmul"] = 100.0 * fig["gflops"] / peak["gflops_best"]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline speedups (ratios of medians) per backend and peer: across strategies, batch sizes, backends."""
    ran = {n: r for n, r in result["backends"].items() if r.get("status") == "ok"}
    ran.update({f"peer:{p}": r for p, r in result.get("peers", {}).items() if r.get("status") == "ok"})
    summary: dict[str, Any] = {}

    def rate(rec, batch):
        for row in rec.get("training", []):
            if row["batch_size"] == batch and "samples_per_s" in row:
                return row["samples_per_s"]["median"]
        return None

    def best(rec):
        rows = [r for r in rec.get("training", []) if "samples_per_s" in r]
        if not rows:
            return None, None
        top = max(rows, key=lambda r: r["samples_per_s"]["median"])
        return top["batch_size"], top["samples_per_s"]["median"]

    base = ran.get("numpy")
    for name, rec in ran.items():
        s: dict[str, Any] = {}
        if "gradient" in rec:
            g = rec["gradient"]
            s["vectorized_vs_loop"] = g["speedup"]
            s["gradient_gflops"] = g["gflops"]
            s["gradient_pct_of_matmul"] = g.get("pct_of_matmul")
        sgd = rate(rec, 1)
        b_best, r_best = best(rec)
        s["per_example_sgd_samples_per_s"] = sgd
        s["best_batch"], s["best_samples_per_s"] = b_best, r_best
        if sgd and r_best:
            s["best_batch_vs_per_example_sgd"] = r_best / sgd
        if base is not None and rec is not base:
            if "gradient" in rec and "gradient" in base:
                for strategy in ("vectorized", "loop"):
                    s[f"vs_numpy_gradient_{strategy}"] = (base["gradient"][strategy]["seconds"]["median"]
                                                          / rec["gradient"][strategy]["seconds"]["median"])
            base_sgd, (_, base_best) = rate(base, 1), best(base)
            if sgd and base_sgd:
                s["vs_numpy_per_example_sgd"] = sgd / base_sgd
            if r_best and base_best:
                s["vs_numpy_best"] = r_best / base_best
        summary[name] = s
    return summary


__all__ = ["BenchConfig", "DEFAULT", "QUICK", "FULL", "PEERS", "DTYPES", "SCHEMA", "run", "summarize",
           "flops_per_example", "measure_matmul_peak", "time_calls", "backend_status"]

