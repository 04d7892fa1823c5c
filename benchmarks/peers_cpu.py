"""fastbp against PyTorch, JAX and scikit-learn on this CPU, side by side, in one run.

    python benchmarks/peers_cpu.py [--quick] [--peers torch,jax,sklearn] [--optimizer sgd[,adam,momentum]]
                                   [--workloads NAME,...] [--threads N] [--contended] [--repeat N] [--out FILE]

The workloads of issue 10 (float32, one epoch per timed fit, the same model, data and
optimizer for every library; the optimizers are torch.optim's formulas, see
fastbp/bench/optimizer.py):

  per_example_784_128_10            784-128-10 relu/softmax, batch 1 (per-example SGD)
  tiny_2_8_1_batch1                 2-8-1 sigmoid/log_loss on XOR quadrants, batch 1
  minibatch64_784_256_10            784-256-10 relu/softmax, batch 64
  large_1024_2048_2048_10_batch512  1024-2048-2048-10 relu/softmax, batch 512
  small_64_64_10_batch32            64-64-10 relu/softmax, batch 32

then digits against scikit-learn's MLPClassifier (real data, test accuracy beside the time)
and the JIT cost of fastbp's Numba kernels (fresh processes, cold and cached).

Bars recorded beside the figures: fastbp >= 1.2x the best JAX form on every workload (issue 10;
where a step's GEMMs alone already exceed that budget the bar is the step within 5% of its
measured GEMM time, recorded as ``step_over_gemm``); the PyTorch bars of issue 4 (10x, 100x, 2x,
1x and 85% of SGEMM); with ``--contended`` every library keeps >= 40% of its quiet throughput
(PyTorch's own fraction is the anchor); with ``--optimizer sgd,adam`` fastbp's Adam >= 0.85x its
SGD (issue 9), measured side by side with torch.optim.Adam.

Honesty rules: every library is warmed up before it is timed (JAX's compile is measured apart and
excluded; fastbp's JIT is measured on its own, in fresh processes); the libraries alternate repeat
by repeat, with a pause between runs so an idle thread pool stops spinning; figures are medians
with min/max and every repeat is kept; torch runs with its default threads and with one thread,
JAX in both forms (per-step jit, whole epoch as one lax.scan), and the fastest of each is the one
compared; FLOPs count the matrix products only (fastbp.bench.timing); the ceilings are this
machine's own GEMM rates, a 4096^3 SGEMM at the start and at the end and every product of each
workload's step at its shapes (NumPy's and fastbp's BLAS), and XLA's own 4096^3 SGEMM (JAX brings
its own GEMM kernels, which can be faster than that BLAS). The machine (CPU, cores, BLAS and threads, versions, load before
and after every workload) goes into the JSON.

The machine may be shared: /proc/stat tells how much CPU other processes used during each repeat;
a repeat during which they used more than OTHERS_MAX cores is redone after the machine goes
quiet (at most RETRIES times; not in --quick), and the disturbed attempt is kept in the JSON
under ``discarded_repeats``, never dropped silently.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
try:
    import fastbp as fb
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    import fastbp as fb

from fastbp.bench import machine, peers  # noqa: E402
from fastbp.bench.contention import BusyLoad  # noqa: E402
from fastbp.bench.optimizer import NAMES as OPTIMIZERS  # noqa: E402
from fastbp.bench.optimizer import DEFAULT_MOMENTUM, OptimizerSpec, default_lr, fit_kwargs  # noqa: E402
from fastbp.bench.timing import flops_per_example, gemm_at_shapes, gemm_share, measure_matmul_peak, stats  # noqa: E402

PAUSE_S = 0.3  # between runs of different libraries: OpenBLAS/OpenMP workers spin ~0.1 s when idle (--pause)
OTHERS_MAX = 0.15  # CPU cores' worth of other processes' work during a repeat above which it is redone
RETRIES = 3  # redone at most this many times; a repeat still disturbed then is kept and flagged
JAX_BAR = 1.2
CONTENDED_BAR = 0.40
ADAM_OVER_SGD_BAR = 0.85
PEERS = ("torch", "jax", "sklearn")

WORKLOADS = {
    "per_example_784_128_10": dict(sizes=[784, 128, 10], activation="relu", loss="cross_entropy", batch=1,
                                   lr=0.01, n=3000, n_quick=600, torch_bar=10.0),
    "tiny_2_8_1_batch1": dict(sizes=[2, 8, 1], activation="sigmoid", loss="log_loss", batch=1, lr=0.1,
                              data="xor", n=4000, n_quick=1000, torch_bar=100.0),
    "minibatch64_784_256_10": dict(sizes=[784, 256, 10], activation="relu", loss="cross_entropy", batch=64,
                                   lr=0.01, n=64 * 100, n_quick=64 * 20, torch_bar=2.0),
    "large_1024_2048_2048_10_batch512": dict(sizes=[1024, 2048, 2048, 10], activation="relu",
                                             loss="cross_entropy", batch=512, lr=0.01, n=512 * 16,
                                             n_quick=512 * 2, torch_bar=1.0, sgemm_bar_pct=85.0),
    "small_64_64_10_batch32": dict(sizes=[64, 64, 10], activation="relu", loss="cross_entropy", batch=32,
                                   lr=0.1, n=32 * 42, n_quick=32 * 16, torch_bar=None),
}
PROFILED = ("minibatch64_784_256_10", "large_1024_2048_2048_10_batch512")


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------- the machine, quiet or not
class Guard:
    """Runs a repeat, measures other processes meanwhile, and redoes a disturbed one (when on)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.exclude: tuple[int, ...] = ()  # the deliberate load of --contended is not "other processes"

    def wait(self) -> None:
        if self.enabled:
            machine.wait_for_quiet(OTHERS_MAX, exclude=self.exclude, say=say)

    def run(self, run_once, label: str, discarded: list):
        """``run_once()``, redone while other processes disturbed it; returns ``(result, others_cores)``."""
        for attempt in range(RETRIES + 1):
            with machine.OthersMeter(self.exclude) as meter:
                result = run_once()
            quiet = meter.cores is None or meter.cores < OTHERS_MAX
            if quiet or not self.enabled or attempt == RETRIES:
                return result, meter.cores
            discarded.append({"what": label, "others_cores": meter.cores, "result": result})
            say(f"  ({label}: other processes used {meter.cores:.2f} cores meanwhile; redoing)")
            self.wait()


# ---------------------------------------------------------------------------- data and libraries
def data(kind: str, n: int, sizes, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "xor":  # 2-8-1: the XOR quadrants, one sigmoid output
        X = rng.standard_normal((n, 2)).astype(np.float32)
        return X, (X[:, :1] * X[:, 1:] > 0).astype(np.float32)
    X = rng.random((n, sizes[0]), dtype=np.float32)  # pixel-like inputs in [0, 1)
    Y = np.zeros((n, sizes[-1]), np.float32)
    Y[np.arange(n), rng.integers(0, sizes[-1], n)] = 1
    return X, Y


class Libraries:
    """Each library's timed training of one workload, as ``variant -> run(spec, X, Y, epochs, seed)``."""

    def __init__(self, backend, peer_names, threads) -> None:
        self.backend, self.threads = backend, threads
        self.variants: dict[str, tuple[str, object]] = {"fastbp": ("fastbp", self._fastbp)}
        if "torch" in peer_names:
            if threads is None:
                self.variants["torch_default_threads"] = ("torch", lambda *a: self._torch(None, *a))
                self.variants["torch_1_thread"] = ("torch", lambda *a: self._torch(1, *a))
            else:
                self.variants[f"torch_{threads}_threads"] = ("torch", lambda *a: self._torch(threads, *a))
        if "jax" in peer_names:
            for form in peers.JAX_FORMS:
                self.variants[f"jax_{form}"] = ("jax", lambda *a, form=form: self._jax(form, *a))
        if "sklearn" in peer_names:
            self.variants["sklearn"] = ("sklearn", self._sklearn)

    def _limits(self):
        if self.threads is None:
            return nullcontext()
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.threads)

    def _fastbp(self, cfg, spec, X, Y, epochs, seed) -> dict:
        b = cfg["batch"]
        with self._limits():
            net = fb.MLP(cfg["sizes"], activation=cfg["activation"], loss=cfg["loss"], dtype="float32", seed=seed)
            net.fit(X[:4 * b], Y[:4 * b], epochs=1, batch_size=b, progress=False,  # untimed: workspaces, state
                    **fit_kwargs(net, spec, first=True, threads=self.threads))
            kwargs = fit_kwargs(net, spec, first=False, threads=self.threads)
            t = time.perf_counter()
            hist = net.fit(X, Y, epochs=epochs, batch_size=b, seed=seed, progress=False, **kwargs)
            seconds = time.perf_counter() - t
        return {"samples_per_s": len(X) * epochs / seconds, "seconds": seconds, "final_loss": float(hist[-1]),
                "epochs": epochs, "n_samples": len(X), "backend": self.backend.name}

    def _common(self, cfg, spec, X, Y, epochs, seed) -> dict:
        return dict(sizes=cfg["sizes"], activation=cfg["activation"], loss=cfg["loss"], X=X, Y=Y,
                    batch_size=cfg["batch"], lr=spec.lr, epochs=epochs, dtype="float32", seed=seed,
                    optimizer=spec.name, momentum=spec.momentum if spec.name == "momentum" else DEFAULT_MOMENTUM)

    def _torch(self, threads, cfg, spec, X, Y, epochs, seed) -> dict:
        return peers.torch_throughput(**self._common(cfg, spec, X, Y, epochs, seed), threads=threads)

    def _jax(self, form, cfg, spec, X, Y, epochs, seed) -> dict:
        return peers.jax_throughput(**self._common(cfg, spec, X, Y, epochs, seed), threads=self.threads, form=form)

    def _sklearn(self, cfg, spec, X, Y, epochs, seed) -> dict:
        return peers.sklearn_mlp_fit(**self._common(cfg, spec, X, Y, epochs, seed), threads=self.threads)


def _fastest(names, med) -> str | None:
    names = [n for n in names if n in med]
    return max(names, key=lambda n: med[n]) if names else None


# ---------------------------------------------------------------------------- one workload
def time_variants(libs, cfg, specs, X, Y, repeat, min_s, guard: Guard, label: str) -> dict:
    """Every (variant, optimizer) timed ``repeat`` times, alternating; all repeats kept."""
    keys = [(v, o) for o in specs for v in libs.variants]
    epochs, unavailable, failed = {}, {}, {}
    for v, o in keys:  # warm-up, then a probe epoch that sets the epochs of a timed run
        run = libs.variants[v][1]
        try:
            run(cfg, specs[o], X, Y, 1, 0)
            probe = run(cfg, specs[o], X, Y, 1, 0)
            epochs[(v, o)] = max(1, min(10_000, round(min_s / probe["seconds"])))
        except ImportError as exc:
            unavailable[f"{v}/{o}"] = str(exc)
        except Exception as exc:  # recorded, the other libraries go on
            failed[f"{v}/{o}"] = f"{type(exc).__name__}: {exc}"
    keys = [k for k in keys if k in epochs]
    runs = {k: [] for k in keys}
    raw = {k: [] for k in keys}
    discarded, others = [], []

    def one_repeat(r):
        out = {}
        for v, o in keys:
            time.sleep(PAUSE_S)
            out[(v, o)] = libs.variants[v][1](cfg, specs[o], X, Y, epochs[(v, o)], r)
        return out

    for r in range(repeat):
        out, cores = guard.run(lambda: one_repeat(r), f"{label} repeat {r + 1}", discarded)
        others.append(cores)
        for k, res in out.items():
            runs[k].append(res["samples_per_s"])
            raw[k].append(res)
        say(f"[{label}] repeat {r + 1}/{repeat}: " + ", ".join(f"{v}/{o} {runs[(v, o)][-1]:.4g}" for v, o in keys))
    name = lambda k: f"{k[0]}/{k[1]}"  # noqa: E731
    return {"epochs_per_run": {name(k): e for k, e in epochs.items()},
            "samples_per_s": {name(k): stats(v) for k, v in runs.items()},
            "raw": {name(k): v for k, v in raw.items()}, "others_cores_per_repeat": others,
            "discarded_repeats": [{**d, "result": {name(k): v for k, v in d["result"].items()}} for d in discarded],
            "unavailable": unavailable, "failed": failed}


def compare(libs, cfg, timed: dict, specs) -> dict:
    """Per optimizer: each peer's fastest variant, and fastbp's ratio to it (medians and per repeat)."""
    med = {k: s["median"] for k, s in timed["samples_per_s"].items()}
    out = {}
    for o in specs:
        fb_key = f"fastbp/{o}"
        if fb_key not in med:
            continue
        entry = {"fastbp_samples_per_s": med[fb_key], "peers": {}}
        for peer in PEERS:
            best = _fastest([f"{v}/{o}" for v, (lib, _) in libs.variants.items() if lib == peer], med)
            if best is None:
                continue
            per_repeat = [a / b for a, b in zip(timed["samples_per_s"][fb_key]["all"],
                                                timed["samples_per_s"][best]["all"])]
            entry["peers"][peer] = {"fastest_variant": best, "samples_per_s": med[best],
                                    "ratio_median": med[fb_key] / med[best], "ratio_per_repeat": stats(per_repeat)}
        jax = entry["peers"].get("jax")
        if jax:
            jax["bar"], jax["met"] = JAX_BAR, jax["ratio_median"] >= JAX_BAR
            jax["compile_s"] = {k: timed["raw"][k][0]["compile_s"] for k in timed["raw"] if k.startswith("jax_")
                                and k.endswith(f"/{o}")}
        torch = entry["peers"].get("torch")
        if torch and cfg.get("torch_bar"):
            torch["bar"], torch["met"] = cfg["torch_bar"], torch["ratio_median"] >= cfg["torch_bar"]
        out[o] = entry
    if "sgd" in out and "adam" in out:
        adam = {"fastbp": med["fastbp/adam"] / med["fastbp/sgd"], "bar": ADAM_OVER_SGD_BAR}
        adam["met"] = adam["fastbp"] >= ADAM_OVER_SGD_BAR
        t_sgd, t_adam = out["sgd"]["peers"].get("torch"), out["adam"]["peers"].get("torch")
        if t_sgd and t_adam:
            adam["torch"] = t_adam["samples_per_s"] / t_sgd["samples_per_s"]
        out["adam_over_sgd"] = adam
    return out


def workload(name, cfg, libs, specs, args, guard: Guard) -> dict:
    n = args.samples or (cfg["n_quick"] if args.quick else cfg["n"])
    n = max(cfg["batch"], n // cfg["batch"] * cfg["batch"])
    X, Y = data(cfg.get("data", "pixels"), n, cfg["sizes"])
    rec = {"config": {k: v for k, v in cfg.items() if k not in ("n", "n_quick")}, "n_samples": n,
           "optimizers": {o: s.describe() for o, s in specs.items()}, "load_before": machine.load_snapshot("before")}
    guard.wait()
    timed = time_variants(libs, cfg, specs, X, Y, args.repeat, args.min_time, guard, name)
    rec.update(timed)
    rec["comparison"] = compare(libs, cfg, timed, specs)
    for o, entry in rec["comparison"].items():
        if o == "adam_over_sgd":
            say(f"[{name}] fastbp adam/sgd = {entry['fastbp']:.2f}x (bar {ADAM_OVER_SGD_BAR})")
            continue
        say(f"[{name}] {o}: " + ", ".join(f"fastbp/{p} ({e['fastest_variant'].split('/')[0]}) = "
                                         f"{e['ratio_median']:.2f}x" for p, e in entry["peers"].items()))
    fpe = flops_per_example(cfg["sizes"])
    rec["gflops"] = {k: fpe * s["median"] / 1e9 for k, s in timed["samples_per_s"].items()}
    time.sleep(PAUSE_S)
    gemm = gemm_at_shapes(cfg["sizes"], cfg["batch"], "float32", min_time=0.005 if args.quick else 0.02)
    rec["gemm_at_shapes"] = gemm
    for o in specs:
        s = timed["samples_per_s"].get(f"fastbp/{o}")
        if s:
            share = gemm_share(gemm, cfg["batch"] / s["median"])
            share["within_5pct_of_gemm"] = share["step_over_gemm"] <= 1.05
            rec.setdefault("fastbp_step_vs_gemm", {})[o] = share
    if cfg.get("sgemm_bar_pct") and "fastbp/sgd" in rec["gflops"]:
        rec["sgemm_bar_pct"] = cfg["sgemm_bar_pct"]
    if args.contended:
        rec["contended"] = contended(name, cfg, libs, specs, X, Y, args, guard, timed)
    rec["load_after"] = machine.load_snapshot("after")
    return rec


def contended(name, cfg, libs, specs, X, Y, args, guard: Guard, quiet: dict) -> dict:
    """The same timed runs beside one busy-loop process; each variant's median as a share of quiet."""
    with BusyLoad(1) as load:
        guard.exclude = load.pids
        try:
            busy = time_variants(libs, cfg, specs, X, Y, args.repeat, args.min_time, guard, f"{name} [contended]")
        finally:
            guard.exclude = ()
    fractions = {k: s["median"] / quiet["samples_per_s"][k]["median"]
                 for k, s in busy["samples_per_s"].items() if k in quiet["samples_per_s"]}
    out = {"load": load.record, **busy, "fraction_of_quiet": fractions, "bar": CONTENDED_BAR}
    for o in specs:
        if f"fastbp/{o}" in fractions:
            torch = _fastest([f"{v}/{o}" for v, (lib, _) in libs.variants.items() if lib == "torch"], fractions)
            out.setdefault("by_optimizer", {})[o] = {
                "fastbp": fractions[f"fastbp/{o}"], "met": fractions[f"fastbp/{o}"] >= CONTENDED_BAR,
                "torch_best_fraction": fractions.get(torch) if torch else None}
    say(f"[{name}] under load, share of quiet: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in fractions.items()))
    return out


def _source_commit() -> dict:
    """The git commit of the fastbp this process imported (an editable install may be another
    checkout than this script's), and whether its tracked files had uncommitted changes (None
    outside git)."""
    where = Path(fb.__file__).resolve().parent.parent

    def git(*cmd):
        try:
            done = subprocess.run(["git", *cmd], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status), "path": str(where)}


# ---------------------------------------------------------------------------- digits against scikit-learn
DIGITS = {  # per optimizer: the bar of its issue (sgd: issue 4; adam: scikit-learn's defaults, issue 9)
    "sgd": dict(batch=32, lr=0.1, epochs=60, quick_epochs=20, bar=8.0, accuracy_tolerance=0.01),
    "adam": dict(batch=200, lr=1e-3, epochs=200, quick_epochs=30, bar=5.0, accuracy_tolerance=0.015),
    "momentum": dict(batch=32, lr=0.01, epochs=60, quick_epochs=20, bar=None, accuracy_tolerance=None),
}


def bar_digits(libs, o, args, guard: Guard) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    cfg = {"sizes": [64, 64, 10], "activation": "relu", "loss": "cross_entropy", **DIGITS[o]}
    epochs = cfg["quick_epochs"] if args.quick else cfg["epochs"]
    spec = OptimizerSpec.make(o, cfg["lr"])
    times, acc = {"fastbp": [], "sklearn": []}, {"fastbp": [], "sklearn": []}
    discarded, others = [], []

    def one_repeat(r):
        time.sleep(PAUSE_S)
        with libs._limits():
            net = fb.MLP(cfg["sizes"], activation="relu", loss="cross_entropy", dtype="float32", seed=r)
            net.fit(Xtr[:400], ytr[:400], epochs=1, batch_size=cfg["batch"], progress=False,  # untimed warm-up
                    **fit_kwargs(net, spec, first=True, threads=libs.threads))
            net = fb.MLP(cfg["sizes"], activation="relu", loss="cross_entropy", dtype="float32", seed=r)
            kwargs = fit_kwargs(net, spec, first=True, threads=libs.threads)
            t = time.perf_counter()
            net.fit(Xtr, ytr, epochs=epochs, batch_size=cfg["batch"], seed=r, progress=False, **kwargs)
            fastbp_s = time.perf_counter() - t
        fastbp_acc = float(np.mean(net.predict(Xte).argmax(axis=1) == yte))
        time.sleep(PAUSE_S)
        res = peers.sklearn_mlp_fit(cfg["sizes"], "relu", "cross_entropy", Xtr, ytr, cfg["batch"], cfg["lr"], epochs,
                                    dtype="float32", seed=r, optimizer=o, X_test=Xte, Y_test=yte, threads=libs.threads)
        return {"fastbp_s": fastbp_s, "fastbp_acc": fastbp_acc, "sklearn_s": res["seconds"],
                "sklearn_acc": res["accuracy"]}

    guard.wait()
    for r in range(args.repeat):
        out, cores = guard.run(lambda: one_repeat(r), f"digits/{o} repeat {r + 1}", discarded)
        others.append(cores)
        for lib in ("fastbp", "sklearn"):
            times[lib].append(out[f"{lib}_s"])
            acc[lib].append(out[f"{lib}_acc"])
        say(f"[digits/{o}] repeat {r + 1}/{args.repeat}: fastbp {times['fastbp'][-1]:.4f}s acc "
            f"{acc['fastbp'][-1]:.4f}; sklearn {times['sklearn'][-1]:.4f}s acc {acc['sklearn'][-1]:.4f}")
    ratio = float(np.median(times["sklearn"]) / np.median(times["fastbp"]))
    gap = float(np.median(acc["fastbp"]) - np.median(acc["sklearn"]))
    rec = {"config": {**cfg, "epochs": epochs}, "optimizer": spec.describe(), "n_train": len(Xtr),
           "n_test": len(Xte), "seconds": {k: stats(v) for k, v in times.items()},
           "test_accuracy": {k: stats(v) for k, v in acc.items()}, "accuracy_gap_fastbp_minus_sklearn": gap,
           "time_ratio_sklearn_over_fastbp": ratio, "bar": cfg["bar"],
           "others_cores_per_repeat": others, "discarded_repeats": discarded}
    if cfg["bar"] is not None:
        rec["met"] = ratio >= cfg["bar"] and gap >= -cfg["accuracy_tolerance"]
    say(f"[digits/{o}] sklearn/fastbp time = {ratio:.1f}x at accuracy {np.median(acc['fastbp']):.4f} vs "
        f"{np.median(acc['sklearn']):.4f}" + (f" (bar {cfg['bar']}x) -> {'met' if rec['met'] else 'MISSED'}"
                                              if "met" in rec else ""))
    return rec


# ---------------------------------------------------------------------------- profiles
def fastbp_profile(cfg, spec, X, Y, threads) -> list[str]:
    """cProfile of one fastbp fit: the top functions by own time."""
    net = fb.MLP(cfg["sizes"], activation=cfg["activation"], loss=cfg["loss"], dtype="float32", seed=0)
    net.fit(X[: 4 * cfg["batch"]], Y[: 4 * cfg["batch"]], epochs=1, batch_size=cfg["batch"], progress=False,
            **fit_kwargs(net, spec, first=True, threads=threads))
    kwargs = fit_kwargs(net, spec, first=False, threads=threads)
    prof = cProfile.Profile()
    prof.enable()
    net.fit(X, Y, epochs=1, batch_size=cfg["batch"], progress=False, **kwargs)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return [line.rstrip() for line in out.getvalue().splitlines() if line.strip()][:30]


def torch_profile(cfg, spec, X, Y, steps=50) -> dict:
    """Where PyTorch's step goes (torch.profiler, default threads): its GEMMs vs the rest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    sizes, batch = cfg["sizes"], cfg["batch"]
    act = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}[cfg["activation"]]
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(fan_in, fan_out)] + ([act()] if i < len(sizes) - 2 else [])
    model = torch.nn.Sequential(*layers)
    opt = spec.torch(torch, model.parameters())
    Xt, yt = torch.from_numpy(X), torch.from_numpy(Y.argmax(axis=1))

    def run(k):
        for i in range(k):
            lo = (i * batch) % (len(X) - batch + 1)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(Xt[lo:lo + batch]), yt[lo:lo + batch]).backward()
            opt.step()

    run(10)
    t = time.perf_counter()
    run(steps)
    step_us = (time.perf_counter() - t) / steps * 1e6
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(steps)
    ops = {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}
    gemm = sum(v for k, v in ops.items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {"step_us_unprofiled": step_us, "profiled_self_cpu_us_per_step": sum(ops.values()),
            "gemm_us_per_step": gemm, "top_ops_us_per_step": {k: v for k, v in top}}


# ---------------------------------------------------------------------------- JIT cost
_JIT_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
import fastbp as fb
t_import = time.perf_counter()
be = fb.set_backend("numba")
t_create = time.perf_counter()
warm = be.warmup("float32") if {warmup!r} else None
t_warm = time.perf_counter()
X = np.random.default_rng(0).random((64, 784), dtype=np.float32)
net = fb.MLP([784, 128, 10], activation="relu", loss="cross_entropy", dtype="float32", seed=0)
net.fit(X, np.arange(64) % 10, epochs=1, batch_size={batch}, lr=0.01, progress=False)
t_fit = time.perf_counter()
print(json.dumps({{"import_s": t_import - t0, "create_s": t_create - t_import, "warmup_s": warm,
                   "first_fit_s": t_fit - t_warm, "process_to_first_fit_s": t_fit - t0}}))
"""

# (label, batch size of the first fit, warmup first): a user's first fit compiles only what its
# path runs; warmup() compiles everything for the dtype up front.
_JIT_CASES = (("first_fit_per_example", 1, False), ("first_fit_batch_32", 32, False), ("warmup_all_float32", 1, True))


def jit_cost() -> dict:
    """Compile time with an empty cache (each case its own fresh process and cache) and start-up
    with the on-disk cache (a second process on the same cache)."""
    result = {}
    for label, batch, warmup in _JIT_CASES:
        with tempfile.TemporaryDirectory(prefix="fastbp-numba-cache-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            for cache_state in ("cold_cache", "warm_cache"):
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", _JIT_PROBE.format(root=str(ROOT), batch=batch,
                                                                             warmup=warmup)],
                                     env=env, capture_output=True, text=True, timeout=600)
                wall = time.perf_counter() - t
                key = f"{label}/{cache_state}"
                if out.returncode != 0:
                    result[key] = {"error": out.stderr[-2000:]}
                    continue
                result[key] = json.loads(out.stdout.strip().splitlines()[-1])
                result[key].update(process_wall_s=wall, announced=[l for l in out.stderr.splitlines()
                                                                   if l.startswith("fastbp: ")])
                say(f"[jit] {key}: process start to first fit {result[key]['process_to_first_fit_s']:.2f}s"
                    + (f" (warmup {result[key]['warmup_s']:.2f}s)" if warmup else ""))
    result["note"] = ("cold_cache: NUMBA_CACHE_DIR empty, so the first fit (or warmup) compiles what it uses; "
                      "warm_cache: a second process loading that cache. float32; float64 compiles separately, "
                      "on first use. 'announced' is what fastbp printed on stderr meanwhile.")
    return result


# ---------------------------------------------------------------------------- main
def _list(valid, option):
    def parse(text):
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"Received: {option} {text!r}. Expected a comma-separated list "
                                             f"from {list(valid)}")
        return list(dict.fromkeys(names))
    return parse


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"Received: {text!r}. Expected a positive {kind.__name__}")
        return value
    return parse


def main(argv=None) -> int:
    global PAUSE_S
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller data, 2 repeats, shorter runs, no redo of disturbed repeats (a smoke run)")
    ap.add_argument("--repeat", type=_positive(int), default=None, help="timed repeats per library (5; quick 2)")
    ap.add_argument("--min-time", type=_positive(float), default=None,
                    help="seconds a timed run lasts at least (0.5; quick 0.1)")
    ap.add_argument("--peers", type=_list(PEERS, "--peers"), default=list(PEERS),
                    help=f"peer libraries (default {','.join(PEERS)}; a missing one is recorded, not fatal)")
    ap.add_argument("--optimizer", type=_list(OPTIMIZERS, "--optimizer"), default=["sgd"],
                    help="update rule(s), side by side in one run: sgd, momentum, adam (e.g. sgd,adam)")
    ap.add_argument("--workloads", type=_list(tuple(WORKLOADS), "--workloads"), default=list(WORKLOADS),
                    help="which workloads (default all)")
    ap.add_argument("--threads", type=_positive(int), default=None,
                    help="BLAS/OpenMP threads (threadpoolctl semantics) for every library (default: their own)")
    ap.add_argument("--contended", action="store_true",
                    help="also time every workload beside one busy-loop process; shares of quiet throughput")
    ap.add_argument("--backend", choices=("numba", "numpy"), default="numba", help="fastbp's backend")
    ap.add_argument("--skip-jit", action="store_true", help="skip the fresh-process JIT cost measurement")
    ap.add_argument("--skip-digits", action="store_true", help="skip digits against scikit-learn")
    ap.add_argument("--skip-profiles", action="store_true", help="skip the profiles of the mini-batch workloads")
    ap.add_argument("--sgemm-n", type=_positive(int), default=4096, help="size of the reference SGEMM")
    ap.add_argument("--samples", type=_positive(int), default=None,
                    help="training-set size of every workload (default: each workload's own; a multiple of its batch)")
    ap.add_argument("--pause", type=float, default=PAUSE_S,
                    help=f"seconds between runs of different libraries, so idle thread pools stop spinning "
                         f"(default {PAUSE_S})")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/cpu-peers-<UTC time>.json; -quick- for --quick)")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.min_time = args.min_time or (0.1 if args.quick else 0.5)
    if not 0 <= args.pause <= 10:
        ap.error(f"argument --pause: Received: {args.pause!r}. Expected seconds in [0, 10]")
    PAUSE_S = args.pause
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"cpu-peers-{'quick-' if args.quick else ''}{stamp}.json")
    guard = Guard(enabled=not args.quick)

    record = {"schema": "fastbp-cpu-peers/2", "started_utc": stamp, "command": [sys.executable] + sys.argv,
              "args": vars(args) | {"out": str(out)}, "source": _source_commit(),
              "load": [machine.load_snapshot("start")]}
    backend = fb.set_backend(args.backend)
    if args.threads is not None:
        numba = sys.modules.get("numba")
        if numba is not None:
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    record["jit"] = {"skipped": True} if args.skip_jit or args.backend != "numba" else jit_cost()
    if callable(getattr(backend, "warmup", None)):
        record["jit"]["warmup_this_process_s"] = {"float32": backend.warmup("float32")}
    libs = Libraries(backend, args.peers, args.threads)
    if "torch" in args.peers:
        try:
            import torch  # noqa: F401 - loaded before the machine is described, so its pools are listed
        except ImportError as exc:
            record["torch_unavailable"] = str(exc)
    record["machine"] = machine.describe()
    record["machine"]["fastbp_backend"] = backend.info()
    if "torch" in sys.modules:
        record["machine"]["torch_threads_default"] = sys.modules["torch"].get_num_threads()

    guard.wait()
    record["sgemm_start"], record["sgemm_start_others_cores"] = guard.run(
        lambda: measure_matmul_peak("float32", args.sgemm_n), "sgemm start", [])
    say(f"[sgemm] {record['sgemm_start']['gflops_best']:.1f} GFLOP/s")
    if "jax" in args.peers:  # XLA has its own GEMM kernels: JAX's ceiling, beside NumPy's BLAS
        try:
            record["xla_sgemm"], record["xla_sgemm_others_cores"] = guard.run(
                lambda: peers.jax_matmul_rate(args.sgemm_n, threads=args.threads), "xla sgemm", [])
            say(f"[sgemm] XLA's own: {record['xla_sgemm']['gflops_best']:.1f} GFLOP/s")
        except ImportError as exc:
            record["xla_sgemm"] = {"unavailable": str(exc)}

    specs_for = {name: {o: OptimizerSpec.make(o, default_lr(o, cfg["lr"])) for o in args.optimizer}
                 for name, cfg in WORKLOADS.items()}
    record["workloads"] = {}
    for name in args.workloads:
        record["workloads"][name] = workload(name, WORKLOADS[name], libs, specs_for[name], args, guard)
        record["load"].append(machine.load_snapshot(f"after {name}"))
    if not args.skip_digits:
        record["digits_vs_sklearn"] = {}
        for o in args.optimizer:
            try:
                record["digits_vs_sklearn"][o] = bar_digits(libs, o, args, guard)
            except ImportError as exc:
                record["digits_vs_sklearn"][o] = {"unavailable": str(exc)}
        record["load"].append(machine.load_snapshot("after digits"))

    time.sleep(1.0)
    record["sgemm_end"], record["sgemm_end_others_cores"] = guard.run(
        lambda: measure_matmul_peak("float32", args.sgemm_n), "sgemm end", [])
    time.sleep(1.0)  # NumPy's OpenBLAS workers spin a while after its GEMMs; let them sleep first
    sgemm = max(record["sgemm_start"]["gflops_best"], record["sgemm_end"]["gflops_best"])
    record["sgemm_gflops_reference"] = sgemm
    for name, rec in record["workloads"].items():
        for key, gflops in rec["gflops"].items():
            rec.setdefault("pct_of_sgemm", {})[key] = 100 * gflops / sgemm
        if rec.get("sgemm_bar_pct"):
            rec["met_sgemm_bar"] = rec["pct_of_sgemm"]["fastbp/sgd"] >= rec["sgemm_bar_pct"]
            say(f"[{name}] fastbp {rec['gflops']['fastbp/sgd']:.1f} GFLOP/s = {rec['pct_of_sgemm']['fastbp/sgd']:.1f}% "
                f"of SGEMM {sgemm:.1f} (bar {rec['sgemm_bar_pct']}%)")

    if not args.skip_profiles:  # where the time goes, for the mini-batch workloads and any missed bar
        for name, rec in record["workloads"].items():
            missed = any(not p.get("met", True) for o, e in rec["comparison"].items() if o != "adam_over_sgd"
                         for p in e["peers"].values())
            if name not in PROFILED and not missed:
                continue
            cfg, spec = WORKLOADS[name], next(iter(specs_for[name].values()))
            X, Y = data(cfg.get("data", "pixels"), cfg["n_quick"], cfg["sizes"])
            rec["profile"] = {"cprofile_fit": fastbp_profile(cfg, spec, X, Y, args.threads)}
            if "torch" in sys.modules and cfg["loss"] == "cross_entropy":
                time.sleep(PAUSE_S)
                rec["profile"]["torch"] = torch_profile(cfg, spec, X, Y, steps=50 if cfg["batch"] < 512 else 3)

    record["load"].append(machine.load_snapshot("end"))
    record["summary"] = summary(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=_json_default))
    print(json.dumps(record["summary"], indent=1))
    say(f"wrote {out}")
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def summary(record) -> dict:
    """The headline per workload: fastbp's ratio to each peer's fastest form, the bars, the load shares."""
    out = {}
    for name, rec in record["workloads"].items():
        s = {}
        for o, entry in rec["comparison"].items():
            if o == "adam_over_sgd":
                s["adam_over_sgd"] = entry
                continue
            s[o] = {p: {k: e[k] for k in ("fastest_variant", "ratio_median", "bar", "met") if k in e}
                    for p, e in entry["peers"].items()}
            if o in rec.get("fastbp_step_vs_gemm", {}):
                s[o]["step_over_gemm"] = rec["fastbp_step_vs_gemm"][o]["step_over_gemm"]
        if "met_sgemm_bar" in rec:
            s["pct_of_sgemm"], s["met_sgemm_bar"] = rec["pct_of_sgemm"]["fastbp/sgd"], rec["met_sgemm_bar"]
        if "contended" in rec:
            s["contended"] = rec["contended"].get("by_optimizer")
        out[name] = s
    for o, rec in record.get("digits_vs_sklearn", {}).items():
        out[f"digits_vs_sklearn/{o}"] = {k: rec[k] for k in ("time_ratio_sklearn_over_fastbp",
                                                            "accuracy_gap_fastbp_minus_sklearn", "bar", "met")
                                         if k in rec}
    return out


if __name__ == "__main__":
    sys.exit(main())
