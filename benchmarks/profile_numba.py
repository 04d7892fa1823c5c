"""Where a training step's time goes on the Numba backend, per workload and update rule.

    python benchmarks/profile_numba.py [--workloads a,b] [--optimizers sgd,momentum,adam]
                                       [--repeat 7] [--threads N] [--out FILE]

For each workload (issue 10's five) and each rule: samples/s through ``net.fit`` (the user's
view), the same epoch through ``backend.train_epoch`` alone (the compiled epoch, no fit-loop
Python), the flat optimizer update alone, and the step's matrix products alone (``numba_kernels.gemm`` in
a compiled loop at the step's shapes, on the BLAS fastbp uses, at the BLAS thread count the
step ran). ``gemm_share_pct`` = GEMM time / step time; ``rest_us`` = the step less its GEMMs.

The rules are interleaved repeat by repeat (a process that starts mid-way slows all of them
alike), the best repeat is kept, and every repeat records how many cores' worth of work
other processes did meanwhile (``/proc/stat``), so a reader can tell a quiet figure from a
contended one. ``--threads N`` holds the BLAS threads fixed (``set_threads``) for the steps
and the GEMMs alike; by default the backend chooses (its automatic policy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
try:
    import fastbp as fb
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    import fastbp as fb

from fastbp.kernels.base import OptimizerState, UpdateRule  # noqa: E402

WORKLOADS = {
    "per_example_784_128_10": dict(sizes=[784, 128, 10], act="relu", loss="cross_entropy", batch=1, n=3000),
    "tiny_2_8_1_batch1": dict(sizes=[2, 8, 1], act="sigmoid", loss="log_loss", batch=1, n=40000, data="xor"),
    "minibatch64_784_256_10": dict(sizes=[784, 256, 10], act="relu", loss="cross_entropy", batch=64, n=64 * 100),
    "large_1024_2048_2048_10_batch512": dict(sizes=[1024, 2048, 2048, 10], act="relu", loss="cross_entropy",
                                             batch=512, n=512 * 6),
    "digits_64_64_10_batch32": dict(sizes=[64, 64, 10], act="relu", loss="cross_entropy", batch=32, n=32 * 300),
}
RULES = {"sgd": UpdateRule("sgd", lr=0.01), "momentum": UpdateRule("sgd", lr=0.01, momentum=0.9),
         "adam": UpdateRule("adam", lr=0.001)}


def data(kind: str, n: int, sizes, seed: int = 0):
    """Pixel-like inputs with one-hot labels, or the XOR quadrants for 2-8-1 (as peers_cpu.py)."""
    rng = np.random.default_rng(seed)
    if kind == "xor":
        X = rng.standard_normal((n, 2)).astype(np.float32)
        return X, (X[:, :1] * X[:, 1:] > 0).astype(np.float32)
    X = rng.random((n, sizes[0]), dtype=np.float32)
    Y = np.zeros((n, sizes[-1]), np.float32)
    Y[np.arange(n), rng.integers(0, sizes[-1], n)] = 1
    return X, Y


def _cpu_sample():
    """(wall, busy seconds of all CPUs, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    own = os.times()
    return time.perf_counter(), (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _others(a, b) -> float:
    """CPU cores' worth of other processes' work between two samples."""
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


def best_of(fn, reps: int, inner: int = 1):
    """(best, median) seconds per call of ``fn`` over ``reps`` regions of ``inner`` calls, after one untimed."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return float(np.min(times)), float(np.median(times))


def optimizer(name: str):
    rule = RULES[name]
    return fb.optim.Adam(lr=rule.lr) if rule.kind == "adam" else fb.optim.SGD(lr=rule.lr, momentum=rule.momentum)


def gemm_products(sizes, n: int) -> list[dict]:
    """Each matrix product of one step alone, timed as compiled code calls it."""
    from fastbp.bench.timing import _compiled_products

    compiled = _compiled_products()
    nt, tn, nn = compiled["forward"], compiled["weight_gradient"], compiled["input_gradient"]

    rng = np.random.default_rng(0)
    out = []
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        A = rng.random((n, fan_in), dtype=np.float32)
        W = rng.random((fan_out, fan_in), dtype=np.float32)
        D = rng.random((n, fan_out), dtype=np.float32)
        products = [("forward", nt, A, W, np.empty((n, fan_out), np.float32)),
                    ("weight_gradient", tn, D, A, np.empty_like(W))]
        if layer > 0:
            products.append(("input_gradient", nn, D, W, np.empty_like(A)))
        for name, fn, x, y, o in products:
            fn(x, y, o, 2)
            once = best_of(lambda: fn(x, y, o, 1), 3)[0]
            reps = max(3, int(0.01 / max(once, 1e-7)))
            best, median = best_of(lambda: fn(x, y, o, reps), 7)
            out.append({"layer": layer + 1, "product": name, "n_in_out": [n, fan_in, fan_out],
                        "us_min": best / reps * 1e6, "us_median": median / reps * 1e6,
                        "gflops": 2 * n * fan_in * fan_out / (best / reps) / 1e9})
    return out


def profile(name: str, rules, reps: int, fixed) -> dict:
    cfg = WORKLOADS[name]
    be = fb.get_backend()
    X, Y = data(cfg.get("data", "pixels"), cfg["n"], cfg["sizes"])
    b, n = cfg["batch"], cfg["n"]
    rec = {"config": cfg, "load_start": os.getloadavg()}
    nets, states = {}, {}
    for rn in rules:
        net = fb.MLP(cfg["sizes"], activation=cfg["act"], loss=cfg["loss"], dtype="float32", seed=0)
        net.fit(X[:4 * b], Y[:4 * b], epochs=1, batch_size=b, optimizer=optimizer(rn), progress=False)
        nets[rn] = net
        states[rn] = (net._params.copy(), OptimizerState(np.zeros((RULES[rn].n_buffers, net.spec.n_params),
                                                                   np.float32)))
    spec = nets[rules[0]].spec
    compiled = be.supports_epoch(spec, b, "vectorized", RULES[rules[0]])
    fit_t = {rn: [] for rn in rules}
    epoch_t = {rn: [] for rn in rules}
    others = []
    order = np.random.default_rng(0).permutation(n)  # a shuffled epoch's row order, as fit passes it
    for _ in range(reps):
        start = _cpu_sample()
        for rn in rules:
            net = nets[rn]
            t = time.perf_counter()
            net.fit(X, Y, epochs=1, batch_size=b, progress=False)
            fit_t[rn].append(time.perf_counter() - t)
            if compiled:
                params, state = states[rn]
                t = time.perf_counter()
                be.train_epoch(spec, params, net._grads, X, Y, b, RULES[rn], state, "vectorized", order=order)
                epoch_t[rn].append(time.perf_counter() - t)
        others.append(_others(start, _cpu_sample()))
    rec["others_cores_per_repeat"] = others
    for rn in rules:
        rule = RULES[rn]
        best = min(fit_t[rn])
        r = {"fit_samples_per_s_best": n / best, "fit_samples_per_s_median": n / float(np.median(fit_t[rn]))}
        if compiled:
            step = min(epoch_t[rn])
            r["compiled_epoch_samples_per_s_best"] = n / step
            r["fit_overhead_pct"] = 100 * (best - step) / best
        else:
            step = best
            r["compiled_epoch"] = "not used (the model's per-batch path)"
        r["step_us"] = step / (n / b) * 1e6
        state = OptimizerState(np.zeros((rule.n_buffers, spec.n_params), np.float32))
        params = nets[rn]._params.copy()
        grads = np.random.default_rng(1).standard_normal(spec.n_params).astype(np.float32) * 1e-3
        inner = max(1, int(2e6 / spec.n_params))
        r["update_pass_us"] = best_of(lambda: be.update(spec, rule, params, grads, state, b), max(reps, 5),
                                      inner)[0] * 1e6  # per example the update is fused instead
        rec[rn] = r
        print(f"[{name}] {rn}: fit {r['fit_samples_per_s_best'] / 1e3:.1f}k/s, step {r['step_us']:.2f} us, "
              f"update pass alone {r['update_pass_us']:.2f} us", flush=True)
    if "sgd" in rules:
        rec["fit_ratio_to_sgd"] = {rn: rec[rn]["fit_samples_per_s_best"] / rec["sgd"]["fit_samples_per_s_best"]
                                   for rn in rules}
        print(f"[{name}] fit samples/s over sgd's: "
              + ", ".join(f"{k} {v:.2f}" for k, v in rec["fit_ratio_to_sgd"].items())
              + f"; other processes' cores per repeat up to {max(others):.2f}", flush=True)
    if b > 1:
        default = be._blas.get_num_threads()
        largest = b * max(i * o for i, o in zip(cfg["sizes"][:-1], cfg["sizes"][1:]))
        single = compiled and largest < be.SMALL_GEMM_MAX
        threads = 1 if single else (fixed or be._threads.decide())
        be._blas.set_num_threads(threads)
        try:
            products = gemm_products(cfg["sizes"], b)
        finally:
            be._blas.set_num_threads(default)
        gemm = sum(p["us_min"] for p in products)
        rec["gemm"] = {"products": products, "gemm_us_per_step": gemm, "blas_threads": threads}
        for rn in rules:
            rec[rn]["gemm_share_pct"] = 100 * gemm / rec[rn]["step_us"]
            rec[rn]["rest_us"] = rec[rn]["step_us"] - gemm
        print(f"[{name}] GEMMs alone {gemm:.1f} us a step on {threads} thread(s): "
              + ", ".join(f"{p['product']}{p['layer']} {p['gflops']:.0f} GF/s" for p in products), flush=True)
    rec["blas_threads_policy_after"] = be.info().get("blas_threads_policy")
    rec["load_end"] = os.getloadavg()
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default all)")
    ap.add_argument("--optimizers", default="sgd,momentum,adam", help="comma-separated of " + ",".join(RULES))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="hold BLAS threads fixed (default: automatic)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/profile-<UTC time>.json)")
    args = ap.parse_args(argv)
    names, rules = args.workloads.split(","), args.optimizers.split(",")
    for value, valid, what in ((names, WORKLOADS, "--workloads"), (rules, RULES, "--optimizers")):
        bad = [v for v in value if v not in valid]
        if bad:
            ap.error(f"{what}: unknown {bad}. Expected any of {sorted(valid)}")
    if args.repeat < 1 or (args.threads is not None and args.threads < 1):
        ap.error(f"--repeat and --threads must be >= 1. Received: {args.repeat}, {args.threads}")
    be = fb.get_backend()
    if be.name != "numba":
        ap.error(f"this profiles the Numba backend. Received: FASTBP_BACKEND selects {be.name!r}")
    if args.threads:
        be.set_threads(args.threads)
    from threadpoolctl import threadpool_info

    stamp = dt.datetime.now(dt.timezone.utc)
    res = {"when_utc": stamp.isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "NUMBA_CACHE_DIR")},
           "blas": [{k: p.get(k) for k in ("filepath", "version", "architecture", "num_threads")}
                    for p in threadpool_info()],
           "backend_info": {k: v for k, v in be.info().items() if k != "blas"},
           "blas_threads_fixed": args.threads, "load_start": os.getloadavg(), "workloads": {}}
    for name in names:
        res["workloads"][name] = profile(name, rules, args.repeat, args.threads)
    res["load_end"] = os.getloadavg()
    out = args.out or str(ROOT / "benchmarks" / "results" / f"profile-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
