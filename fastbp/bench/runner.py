"""The benchmark runner behind ``fastbp bench``.

For every usable backend it measures, on one model (default 784-128-10, sigmoid, MSE):

* one gradient of the mean cost over a batch, with the naive per-example loop
  and with the vectorized pass — same model, same batch — and the speedup;
* training throughput (samples/s) of ``MLP.fit`` across batch sizes, from
  per-example SGD (batch 1) to full-batch gradient descent, with the optimizer
  asked for (SGD, momentum, Adam), and the same on peer libraries (PyTorch, JAX
  in both its per-step and whole-epoch jitted forms, scikit-learn).

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
writes it and plots it. With ``contended`` everything runs a second time beside a
busy-loop process (:mod:`fastbp.bench.contention`), and each figure under load is
reported as a fraction of its quiet value.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import fastbp as fb

from . import machine, worker
from .config import DEFAULT, DTYPES, FULL, PEERS, QUICK, SCHEMA, BenchConfig, jsonable  # noqa: F401 - re-exported
from .contention import BusyLoad
from .timing import FLOP_FORMULA, flops_per_example, measure_matmul_peak, time_calls  # noqa: F401 - re-exported


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


class _Prefixed:
    """Progress whose step names start with ``prefix`` (the contended pass says so on the bar)."""

    def __init__(self, inner, prefix: str) -> None:
        self._inner, self._prefix = inner, prefix

    def start(self, what: str) -> None:
        self._inner.start(self._prefix + what)

    def done(self, note: str | None = None) -> None:
        self._inner.done(note)


# ---------------------------------------------------------------------------- workers
def _job_in_worker(kind: str, name: str, cfg: BenchConfig, progress: _Progress) -> dict[str, Any]:
    """:func:`worker.job` in a fresh ``python -m fastbp.bench`` process; its progress drives ``progress``."""
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
                    if tag != worker.PROGRESS_TAG:
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


# ---------------------------------------------------------------------------- the suite
def _one_pass(cfg: BenchConfig, names: list[str], job, bar) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every backend in ``names`` and every peer once: ``(backends, peers)`` records."""
    backends = {name: job("backend", name, cfg, bar) for name in names}
    peer_recs = {peer: job("peer", peer, cfg, bar) for peer in cfg.peers}
    return backends, peer_recs


def run(cfg: BenchConfig, *, progress: bool = True, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite described by ``cfg``; returns the JSON-ready record (every raw figure)."""
    t_start = time.perf_counter()
    busy0, own0 = machine.cpu_busy_seconds(), machine.own_cpu_seconds()
    status = backend_status()
    names = list(cfg.backends) if cfg.backends else [n for n, why in status.items() if why is None]
    limits = worker.thread_limits(cfg.threads)  # for the reference GEMM, and so the record shows the caps
    try:
        result: dict[str, Any] = {
            "schema": SCHEMA,
            "fastbp_version": fb.__version__,
            "source": machine.source_state(str(Path(fb.__file__).resolve().parent)),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": argv,
            "config": {**asdict(cfg), "batch_sizes_resolved": cfg.resolved_batch_sizes()},
            "optimizer": worker.optimizer_spec(cfg).describe(),
            "flops": {"per_example": flops_per_example(cfg.sizes), "formula": FLOP_FORMULA},
            "backend_status": status,
            "machine": machine.describe(deep_gpu="cupy" in names),
            "matmul_peak": {},
            "backends": {},
            "peers": {},
        }
        n_batches = len(cfg.resolved_batch_sizes())
        grad_steps = 3 if worker._graph_gradients() is not None else 2
        per_pass = len(names) * (2 + grad_steps + n_batches) + len(cfg.peers) * n_batches
        bar = _Progress(2 + per_pass * (2 if cfg.contended else 1), progress)
        job = _job_in_worker if cfg.isolate else worker.job
        try:
            bar.start("reference matmul (numpy BLAS)")
            peak = measure_matmul_peak(cfg.dtype, cfg.peak_n)
            bar.done(f"{peak['gflops_best']:.0f} GFLOP/s")
            result["backends"], result["peers"] = _one_pass(cfg, names, job, bar)
            if cfg.contended:
                with BusyLoad(1) as load:
                    backends, peer_recs = _one_pass(cfg, names, job, _Prefixed(bar, "[contended] "))
                result["contended"] = {"load": load.record, "backends": backends, "peers": peer_recs}
            for name, why in status.items():
                if name not in result["backends"] and why is not None:
                    result["backends"][name] = {"status": "unavailable", "reason": why}
            bar.start("reference matmul again")
            _merge_peak(peak, measure_matmul_peak(cfg.dtype, cfg.peak_n))
            bar.done()
        finally:
            bar.close()
    finally:
        worker.restore(limits)
    result["matmul_peak"]["cpu"] = peak
    for rec in result["backends"].values():
        if "matmul_peak" in rec:  # a GPU's reference, measured by its worker
            result["matmul_peak"][rec["matmul_reference"]] = rec.pop("matmul_peak")
    _apply_peaks(result)
    if "contended" in result:
        result["contended"]["fractions"] = contended_fractions(result)
    result["machine"]["load_average_end"] = machine.load_average()
    result["summary"] = summarize(result)
    result["elapsed_s"] = time.perf_counter() - t_start
    busy1, own1 = machine.cpu_busy_seconds(), machine.own_cpu_seconds()
    if busy0 is not None and busy1 is not None:
        # What else ran meanwhile: the machine's busy CPU time minus this run's own (workers and the
        # deliberate load of --contended included: they are waited-for children).
        result["machine"]["other_cpu_seconds"] = max(0.0, (busy1 - busy0) - (own1 - own0))
    return result


def contended_fractions(result: dict[str, Any]) -> dict[str, Any]:
    """Each figure under load as a fraction of its quiet value (1.0 = unaffected), per backend and peer.

    Training: contended samples/s over quiet samples/s per batch size (medians), and the
    smallest of them; gradients: quiet time over contended time.
    """
    out: dict[str, Any] = {}
    quiet_all = {**result["backends"], **{f"peer:{p}": r for p, r in result.get("peers", {}).items()}}
    cont = result["contended"]
    busy_all = {**cont["backends"], **{f"peer:{p}": r for p, r in cont.get("peers", {}).items()}}
    for name, quiet in quiet_all.items():
        busy = busy_all.get(name)
        if quiet.get("status") != "ok" or busy is None or busy.get("status") != "ok":
            continue
        entry: dict[str, Any] = {"training": {}}
        busy_rows = {r["batch_size"]: r for r in busy.get("training", []) if "samples_per_s" in r}
        for row in quiet.get("training", []):
            other = busy_rows.get(row["batch_size"])
            if "samples_per_s" in row and other is not None:
                entry["training"][str(row["batch_size"])] = (other["samples_per_s"]["median"]
                                                            / row["samples_per_s"]["median"])
        if entry["training"]:
            entry["min_training"] = min(entry["training"].values())
        for strategy in ("vectorized", "loop", "graph"):
            q, b = (quiet.get("gradient") or {}).get(strategy), (busy.get("gradient") or {}).get(strategy)
            if q and b:
                entry[f"gradient_{strategy}"] = q["seconds"]["median"] / b["seconds"]["median"]
        out[name] = entry
    return out


def _merge_peak(peak: dict[str, Any], again: dict[str, Any]) -> None:
    peak["times_s"] += again["times_s"]
    peak["gflops"] += again["gflops"]
    peak["gflops_best"] = max(peak["gflops"])
    peak["gflops_median"] = float(np.median(peak["gflops"]))
    peak["how"] += "; measured at the start and the end of the run"


def _apply_peaks(result: dict[str, Any]) -> None:
    """``pct_of_matmul`` for every FLOP rate, against its device's best measured GEMM."""
    recs = list(result["backends"].values()) + list(result["peers"].values())
    if "contended" in result:
        recs += list(result["contended"]["backends"].values()) + list(result["contended"]["peers"].values())
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
    fractions = (result.get("contended") or {}).get("fractions", {})
    for name, rec in ran.items():
        s: dict[str, Any] = {}
        if "gradient" in rec:
            g = rec["gradient"]
            s["vectorized_vs_loop"] = g["speedup"]
            s["gradient_gflops"] = g["gflops"]
            s["gradient_pct_of_matmul"] = g.get("pct_of_matmul")
            if "graph_vs_vectorized" in g:
                s["graph_vs_vectorized"] = g["graph_vs_vectorized"]
        if name in fractions and "min_training" in fractions[name]:
            s["contended_min_fraction"] = fractions[name]["min_training"]
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
           "contended_fractions", "flops_per_example", "measure_matmul_peak", "time_calls", "backend_status"]
