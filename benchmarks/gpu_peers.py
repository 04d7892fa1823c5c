#!/usr/bin/env python3
"""fastbp's cupy backend against PyTorch eager CUDA on one GPU, and per-example SGD against the CPU.

Run from the repository root on a machine with an NVIDIA GPU (no install needed; PyTorch and the
numba backend are optional, a missing one is recorded, not fatal)::

    python3 benchmarks/gpu_peers.py                  # full run: a few minutes
    python3 benchmarks/gpu_peers.py --quick          # less data, fewer repeats: about a minute
    python3 benchmarks/gpu_peers.py --tf32           # the same with TF32 tensor cores on both sides

Both sides train the same model on the same data with plain SGD in fp32 (TF32 off unless
``--tf32``): ReLU hidden layers, softmax + cross-entropy, the examples reshuffled on the device
every epoch, the epoch's loss read back once per epoch. Every timed region is bracketed by a
device synchronisation; a warm-up run comes first and is reported apart (kernel compilation,
graph capture, cuBLAS heuristics); figures are medians with quartiles over ``--repeat`` runs.

* ``peak``: the GPU's own GEMM rate, FP32 and TF32 (cupy.matmul, and torch.matmul to cross-check).
* ``mlp``: samples/s for 784-256-256-10 at batch 64 and 256 (bar: fastbp >= 3x torch) and
  4096-4096-4096-10 at batch 4096 (bar: >= 0.95x torch, with the % of the FP32 and TF32 peaks),
  fastbp measured on each captured-step route (FASTBP_CUPY_STEP) and torch eager
  (nn.Sequential, F.cross_entropy, torch.optim.SGD without momentum).
* ``per_example``: batch size 1: fastbp on the GPU, fastbp's numba backend on the CPU, torch eager.

Results (device name, versions, every timing) go to
``benchmarks/results/gpu_peers_<device>[_tf32].json``, and also to ``$OUT`` when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout runs without being installed

from fastbp.bench.timing import flops_per_example, stats  # noqa: E402 - shared with fastbp bench

MLP_CONFIGS = [
    {"sizes": [784, 256, 256, 10], "batch": 64, "n": 65536, "quick_n": 8192, "epochs": 2, "bar": 3.0},
    {"sizes": [784, 256, 256, 10], "batch": 256, "n": 65536, "quick_n": 8192, "epochs": 2, "bar": 3.0},
    {"sizes": [4096, 4096, 4096, 10], "batch": 4096, "n": 32768, "quick_n": 8192, "epochs": 1, "bar": 0.95},
]
PER_EXAMPLE_CONFIGS = [
    {"sizes": [784, 256, 256, 10], "n": 4096, "quick_n": 512},
    {"sizes": [64, 32, 10], "n": 8192, "quick_n": 1024},
]
ROUTES = ("auto", "graph-cublas", "graph-raw", "eager")
LR = 0.01


def timed(fn, sync, repeat: int) -> dict:
    """Warm-up call (reported as ``first_s``), then ``repeat`` synchronised calls."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "seconds": stats(times)}


def section(results: dict, key: str, fn, *args):
    """Runs one part; a failure is recorded with its traceback and the rest goes on."""
    try:
        results[key] = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a benchmark records what broke and carries on
        results[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"[{key}] failed: {type(exc).__name__}: {exc}", flush=True)


def torch_or_none():
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
        return torch, None
    except Exception as exc:  # noqa: BLE001
        return None, f"torch unavailable: {type(exc).__name__}: {exc}"


def set_torch_tf32(torch, on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


# ---------------------------------------------------------------- parts


def machine(be, torch) -> dict:
    record = {"python": platform.python_version(), "platform": platform.platform(), "fastbp_cupy": be.info()}
    try:
        import fastbp.bench.machine as fm

        record["machine"] = fm.describe()
    except Exception as exc:  # noqa: BLE001
        record["machine"] = {"error": f"{type(exc).__name__}: {exc}"}
    if torch is not None:
        record["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0)}
    return record


def gemm_peak(be, torch, n: int, repeat: int) -> dict:
    """FP32 and TF32 GEMM rates on this GPU: the ceilings the big model is measured against."""
    cp = be.xp
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), dtype=cp.float32)
    out = {"n": n, "flop": 2.0 * n ** 3}
    original = be.tf32
    try:
        for label, on in (("fp32", False), ("tf32", True)):
            be.tf32 = be._set_tf32(on)
            if on and not be.tf32:
                out[label] = {"error": "TF32 unsupported on this device"}
                continue
            r = timed(lambda: be.matmul(a, b, c), be.synchronize, repeat)
            r["tflops_best"] = out["flop"] / r["seconds"]["min"] / 1e12
            r["tflops_median"] = out["flop"] / r["seconds"]["median"] / 1e12
            out[label] = r
    finally:
        be.tf32 = be._set_tf32(original)
    if torch is not None:
        ta, tb = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
        for label, on in (("torch_fp32", False), ("torch_tf32", True)):
            set_torch_tf32(torch, on)
            r = timed(lambda: torch.matmul(ta, tb), torch.cuda.synchronize, repeat)
            r["tflops_best"] = out["flop"] / r["seconds"]["min"] / 1e12
            out[label] = r
    return out


def device_data(cp, n: int, n_in: int, n_out: int, seed: int = 0):
    rs = cp.random.RandomState(seed)
    X = rs.standard_normal((n, n_in), dtype=cp.float32)
    labels = rs.randint(0, n_out, size=n).astype(cp.int64)
    Y = cp.zeros((n, n_out), dtype=cp.float32)
    Y[cp.arange(n), labels] = 1
    return X, Y, labels


def fastbp_fit(fb, be, sizes, X, Y, batch: int, epochs: int, repeat: int, route: str) -> dict:
    """Samples/s of MLP.fit on the cupy backend with one captured-step route."""
    be.step_route = route
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = fb.MLP(sizes, activation="relu", loss="cross_entropy", dtype="float32", seed=0)
        r = timed(lambda: net.fit(X, Y, epochs=epochs, batch_size=batch, lr=LR, shuffle=True, progress=False),
                  be.synchronize, repeat)
    n = int(X.shape[0])
    r["samples_per_s"] = n * epochs / r["seconds"]["median"]
    r["samples_per_s_q1_q3"] = [n * epochs / r["seconds"]["q3"], n * epochs / r["seconds"]["q1"]]
    r["route_used"] = {f"batch {m}": used for (s, m), used in be.last_route.items() if list(s) == list(sizes)}
    r["warnings"] = [str(w.message) for w in caught]
    try:
        r["final_loss"] = float(net.loss(X[:4096], Y[:4096]))
    except Exception as exc:  # noqa: BLE001 - the timing above stands on its own
        r["final_loss"] = f"{type(exc).__name__}: {exc}"
    return r


def torch_fit(torch, sizes, X, labels, batch: int, epochs: int, repeat: int) -> dict:
    """Samples/s of the same training in PyTorch eager mode."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    Xt, yt = torch.from_dlpack(X), torch.from_dlpack(labels)
    n = Xt.shape[0]

    def run():
        for _ in range(epochs):
            perm = torch.randperm(n, device="cuda")
            Xs, ys = Xt[perm], yt[perm]
            total = torch.zeros((), device="cuda")
            for start in range(0, n, batch):
                xb, yb = Xs[start:start + batch], ys[start:start + batch]
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * xb.shape[0]
            float(total)  # the epoch's loss, read once, as fastbp does

    r = timed(run, torch.cuda.synchronize, repeat)
    r["samples_per_s"] = n * epochs / r["seconds"]["median"]
    r["samples_per_s_q1_q3"] = [n * epochs / r["seconds"]["q3"], n * epochs / r["seconds"]["q1"]]
    return r


def mlp_configs(fb, be, torch, torch_why, args, peak) -> list:
    cp = be.xp
    rows = []
    for cfg in MLP_CONFIGS:
        sizes, batch = cfg["sizes"], cfg["batch"]
        n = cfg["quick_n"] if args.quick else cfg["n"]
        epochs = 1 if args.quick else cfg["epochs"]
        row = {"sizes": sizes, "batch": batch, "n": n, "epochs_per_run": epochs,
               "flops_per_example": flops_per_example(sizes), "bar_vs_torch": cfg["bar"], "fastbp": {}}
        print(f"== {'-'.join(map(str, sizes))} batch {batch}, n={n}", flush=True)
        X, Y, labels = device_data(cp, n, sizes[0], sizes[-1])
        for route in args.routes:
            section(row["fastbp"], route, fastbp_fit, fb, be, sizes, X, Y, batch, epochs, args.repeat, route)
            r = row["fastbp"][route]
            if "samples_per_s" in r:
                print(f"   fastbp {route:13s} {r['samples_per_s']:12.0f} samples/s  (used {r['route_used']})", flush=True)
        if torch is not None:
            section(row, "torch", torch_fit, torch, sizes, X, labels, batch, epochs, args.repeat)
            if "samples_per_s" in row["torch"]:
                print(f"   torch eager          {row['torch']['samples_per_s']:12.0f} samples/s", flush=True)
        else:
            row["torch"] = {"error": torch_why}
        best = max(((r["samples_per_s"], route) for route, r in row["fastbp"].items() if "samples_per_s" in r),
                   default=None)
        if best is not None:
            row["fastbp_best"] = {"route": best[1], "samples_per_s": best[0]}
            achieved = best[0] * row["flops_per_example"] / 1e12
            row["fastbp_best"]["tflops"] = achieved
            for label in ("fp32", "tf32"):
                ceiling = peak.get(label, {}).get("tflops_best") if isinstance(peak, dict) else None
                if ceiling:
                    row["fastbp_best"][f"pct_of_{label}_peak"] = 100.0 * achieved / ceiling
            if "samples_per_s" in row.get("torch", {}):
                ratio = best[0] / row["torch"]["samples_per_s"]
                row["ratio_vs_torch"] = ratio
                row["meets_bar"] = ratio >= cfg["bar"]
                row["torch"]["tflops"] = row["torch"]["samples_per_s"] * row["flops_per_example"] / 1e12
                print(f"   best fastbp / torch = {ratio:.2f}x (bar {cfg['bar']}x): "
                      f"{'met' if row['meets_bar'] else 'MISSED'}", flush=True)
        del X, Y, labels
        cp.get_default_memory_pool().free_all_blocks()
        rows.append(row)
    return rows


def per_example(fb, be, torch, args) -> list:
    rows = []
    for cfg in PER_EXAMPLE_CONFIGS:
        sizes = cfg["sizes"]
        n = cfg["quick_n"] if args.quick else cfg["n"]
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n, sizes[0])).astype(np.float32)
        labels = rng.integers(0, sizes[-1], n)
        Y = np.eye(sizes[-1], dtype=np.float32)[labels]
        row = {"sizes": sizes, "n": n, "batch": 1}
        print(f"== per-example SGD {'-'.join(map(str, sizes))}, n={n}", flush=True)
        for name in ("cupy", "numba"):
            def run_backend(name=name):
                with fb.use_backend(name) as b:
                    net = fb.MLP(sizes, activation="relu", loss="cross_entropy", dtype="float32", seed=0)
                    Xd, Yd = b.asarray(X), b.asarray(Y)
                    r = timed(lambda: net.fit(Xd, Yd, epochs=1, batch_size=1, lr=LR, shuffle=True, progress=False),
                              b.synchronize, max(2, args.repeat // 2))
                    r["samples_per_s"] = n / r["seconds"]["median"]
                    r["backend_info"] = b.info()
                    return r
            section(row, name, run_backend)
            if "samples_per_s" in row[name]:
                print(f"   fastbp {name:6s} {row[name]['samples_per_s']:12.0f} samples/s", flush=True)
        if torch is not None:
            cp = be.xp
            Xg, lg = cp.asarray(X), cp.asarray(labels)
            section(row, "torch", torch_fit, torch, sizes, Xg, lg, 1, 1, max(2, args.repeat // 2))
            if "samples_per_s" in row["torch"]:
                print(f"   torch eager  {row['torch']['samples_per_s']:12.0f} samples/s", flush=True)
        if "samples_per_s" in row.get("cupy", {}) and "samples_per_s" in row.get("numba", {}):
            ratio = row["cupy"]["samples_per_s"] / row["numba"]["samples_per_s"]
            row["gpu_over_cpu"] = ratio
            row["faster"] = "gpu (cupy)" if ratio > 1 else "cpu (numba)"
            print(f"   GPU / CPU = {ratio:.2f}x: {row['faster']} wins", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="less data and fewer repeats (about a minute)")
    parser.add_argument("--tf32", action="store_true", help="TF32 tensor cores on both sides (FASTBP_TF32=1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per figure (default 5, quick 3)")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"fastbp step routes to time (default {','.join(ROUTES)})")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: peak,mlp,per_example")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_peers_<device>.json)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.environ["FASTBP_TF32"] = "1" if args.tf32 else "0"

    import fastbp as fb

    try:
        be = fb.set_backend("cupy")
    except fb.BackendUnavailableError as exc:
        print(f"gpu_peers: {exc}", file=sys.stderr)
        return 2
    torch, torch_why = torch_or_none()
    if torch is not None:
        set_torch_tf32(torch, args.tf32)
    results = {"benchmark": "gpu_peers", "quick": args.quick, "tf32": args.tf32, "repeat": args.repeat,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lr": LR}
    section(results, "machine", machine, be, torch)
    device = results["machine"].get("fastbp_cupy", {}).get("device", "gpu") if "error" not in results["machine"] else "gpu"
    results["device"] = device
    print(f"device: {device}; torch: {torch.__version__ if torch is not None else torch_why}", flush=True)
    peak = {}
    if "peak" not in skip:
        section(results, "peak", gemm_peak, be, torch, 4096 if args.quick else 8192, args.repeat)
        peak = results["peak"]
        for label in ("fp32", "tf32"):
            if isinstance(peak.get(label), dict) and "tflops_best" in peak[label]:
                print(f"peak {label}: {peak[label]['tflops_best']:.1f} TFLOP/s", flush=True)
        if torch is not None:
            set_torch_tf32(torch, args.tf32)
    if "mlp" not in skip:
        section(results, "mlp", mlp_configs, fb, be, torch, torch_why, args, peak)
    if "per_example" not in skip:
        section(results, "per_example", per_example, fb, be, torch, args)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower() or "gpu"
    name = f"gpu_peers_{slug}{'_tf32' if args.tf32 else ''}{'_quick' if args.quick else ''}.json"
    paths = [Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    text = json.dumps(results, indent=2, default=str)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
