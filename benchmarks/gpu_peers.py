#!/usr/bin/env python3
"""fastbp's cupy backend against PyTorch eager CUDA and JAX on one GPU, and per-example SGD against the CPU.

Run from the repository root on a machine with an NVIDIA GPU (no install needed; PyTorch and the
numba backend are optional, a missing one is recorded, not fatal)::

    python3 benchmarks/gpu_peers.py                  # full run: a few minutes
    python3 benchmarks/gpu_peers.py --quick          # less data, fewer repeats: about a minute
    python3 benchmarks/gpu_peers.py --tf32           # the same with TF32 tensor cores on both sides

Every side trains the same model on the same data with the same update rule (``--optimizer``:
plain SGD by default, or momentum / Adam with torch.optim's formulas) in fp32, TF32 off unless
``--tf32`` (fastbp ``FASTBP_TF32``, torch ``torch.backends.cuda.matmul.fp32_precision`` on torch >=
2.9, JAX ``jax_default_matmul_precision``, which otherwise lets XLA use TF32 on its own): ReLU
hidden layers, softmax + cross-entropy, the examples reshuffled on the device every epoch, the
epoch's loss read back once per epoch. Every timed region is bracketed by a
device synchronisation; a warm-up run comes first and is reported apart (kernel compilation,
graph capture, cuBLAS heuristics); figures are medians with quartiles over ``--repeat`` runs.

* ``peak``: the GPU's own GEMM rate, FP32 and TF32 (cupy.matmul, and torch.matmul to cross-check).
* ``mlp``: samples/s for 784-256-256-10 at batch 64 and 256 (bar: fastbp >= 3x torch) and
  4096-4096-4096-10 at batch 4096 (bar: >= 0.95x torch, with the % of the FP32 and TF32 peaks),
  fastbp measured on each captured-step route (FASTBP_CUPY_STEP), torch eager (nn.Sequential,
  F.cross_entropy, torch.optim), and JAX on the GPU in its two best forms: one jitted step per
  batch, and the whole epoch as one jitted ``lax.scan`` (fastbp.bench.peers.jax_throughput; its
  compile time is reported apart).
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


def set_torch_tf32(torch, on: bool) -> str:
    """TF32 on or off for torch's float32 matmuls (and convolutions); returns the API used.

    torch >= 2.9 has ``fp32_precision`` ("tf32" / "ieee") and deprecates the ``allow_tf32``
    flags; mixing the two raises there, so only the new one is touched when it exists.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
        conv = getattr(getattr(torch.backends, "cudnn", None), "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32" if on else "ieee"
        return "fp32_precision"
    matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")
    return "allow_tf32"


def set_jax_tf32(jax, on: bool) -> None:
    """XLA's default float32 matmul precision: TF32 allowed, or full FP32 ("highest")."""
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if on else "highest")


def jax_or_none():
    """jax when it is installed and its default device is a GPU, else (None, why)."""
    try:
        import jax

        device = jax.devices()[0]
        if device.platform not in ("gpu", "cuda"):
            return None, f"jax's default device is {device.platform}, not a GPU (jax[cuda] not installed?)"
        return jax, None
    except Exception as exc:  # noqa: BLE001
        return None, f"jax unavailable: {type(exc).__name__}: {exc}"


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
            be.tf32 = on  # one switch: CuPy's matmul, fastbp's handles and graphs
            if on and not be.tf32:
                out[label] = {"error": "TF32 unsupported on this device"}
                continue
            r = timed(lambda: be.matmul(a, b, c), be.synchronize, repeat)
            r["tflops_best"] = out["flop"] / r["seconds"]["min"] / 1e12
            r["tflops_median"] = out["flop"] / r["seconds"]["median"] / 1e12
            out[label] = r
    finally:
        be.tf32 = original
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


def fastbp_fit(fb, be, sizes, X, Y, batch: int, epochs: int, repeat: int, route: str, spec) -> dict:
    """Samples/s of MLP.fit on the cupy backend with one captured-step route."""
    be.step_route = route
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = fb.MLP(sizes, activation="relu", loss="cross_entropy", dtype="float32", seed=0)
        opt = spec.fastbp()
        r = timed(lambda: net.fit(X, Y, epochs=epochs, batch_size=batch, optimizer=opt, shuffle=True,
                                  progress=False), be.synchronize, repeat)
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


def torch_fit(torch, sizes, X, labels, batch: int, epochs: int, repeat: int, spec) -> dict:
    """Samples/s of the same training in PyTorch eager mode."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).cuda()
    opt = spec.torch(torch, model.parameters())
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


def jax_fit(jax, sizes, X, labels, batch: int, epochs: int, repeat: int, spec, form: str) -> dict:
    """Samples/s of the same training in JAX on the GPU (``form``: "jit" or "scan"), ``repeat`` runs."""
    from fastbp.bench.peers import jax_throughput

    runs = [jax_throughput(sizes, "relu", "cross_entropy", X, labels, batch, spec.lr, epochs, optimizer=spec.name,
                           momentum=spec.momentum or 0.9, form=form, seed=0) for _ in range(repeat)]
    rates = [r["samples_per_s"] for r in runs]
    s = stats(rates)
    return {"samples_per_s": s["median"], "samples_per_s_q1_q3": [s["q1"], s["q3"]], "runs": rates,
            "compile_s": runs[0]["compile_s"], "device": runs[0]["device"], "jax": runs[0]["jax"],
            "final_loss": runs[-1]["final_loss"]}


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
            section(row["fastbp"], route, fastbp_fit, fb, be, sizes, X, Y, batch, epochs, args.repeat, route,
                    args.spec)
            r = row["fastbp"][route]
            if "samples_per_s" in r:
                print(f"   fastbp {route:13s} {r['samples_per_s']:12.0f} samples/s  (used {r['route_used']})", flush=True)
        if torch is not None:
            section(row, "torch", torch_fit, torch, sizes, X, labels, batch, epochs, args.repeat, args.spec)
            if "samples_per_s" in row["torch"]:
                print(f"   torch eager          {row['torch']['samples_per_s']:12.0f} samples/s", flush=True)
        else:
            row["torch"] = {"error": torch_why}
        if args.jax is not None:
            Xh, lh = cp.asnumpy(X), cp.asnumpy(labels)
            for form in ("jit", "scan"):
                section(row, f"jax_{form}", jax_fit, args.jax, sizes, Xh, lh, batch, epochs, args.repeat,
                        args.spec, form)
                if "samples_per_s" in row[f"jax_{form}"]:
                    print(f"   jax {form:4s}             {row[f'jax_{form}']['samples_per_s']:12.0f} samples/s",
                          flush=True)
            jax_best = max((row[f"jax_{f}"].get("samples_per_s", 0.0) for f in ("jit", "scan")), default=0.0)
            if jax_best:
                row["jax_best_samples_per_s"] = jax_best
        elif "jax" not in args.skip_set:
            row["jax_jit"] = row["jax_scan"] = {"error": args.jax_why}
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
            if row.get("jax_best_samples_per_s"):
                row["ratio_vs_jax_best"] = best[0] / row["jax_best_samples_per_s"]
                print(f"   best fastbp / best jax = {row['ratio_vs_jax_best']:.2f}x", flush=True)
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
                    opt = args.spec.fastbp()
                    r = timed(lambda: net.fit(Xd, Yd, epochs=1, batch_size=1, optimizer=opt, shuffle=True,
                                              progress=False), b.synchronize, max(2, args.repeat // 2))
                    r["samples_per_s"] = n / r["seconds"]["median"]
                    r["backend_info"] = b.info()
                    return r
            section(row, name, run_backend)
            if "samples_per_s" in row[name]:
                print(f"   fastbp {name:6s} {row[name]['samples_per_s']:12.0f} samples/s", flush=True)
        if torch is not None:
            cp = be.xp
            Xg, lg = cp.asarray(X), cp.asarray(labels)
            section(row, "torch", torch_fit, torch, sizes, Xg, lg, 1, 1, max(2, args.repeat // 2), args.spec)
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
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: peak,mlp,per_example,jax")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "momentum", "adam"),
                        help="update rule on every side (default sgd; momentum 0.9; adam lr 1e-3 unless --lr)")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {LR}, adam 1e-3)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_peers_<device>.json)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    skip = args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.environ["FASTBP_TF32"] = "1" if args.tf32 else "0"
    from fastbp.bench.optimizer import OptimizerSpec, default_lr

    args.spec = OptimizerSpec.make(args.optimizer, args.lr if args.lr is not None else default_lr(args.optimizer, LR))

    import fastbp as fb

    try:
        be = fb.set_backend("cupy")
    except fb.BackendUnavailableError as exc:
        print(f"gpu_peers: {exc}", file=sys.stderr)
        return 2
    torch, torch_why = torch_or_none()
    if torch is not None:
        set_torch_tf32(torch, args.tf32)
    args.jax, args.jax_why = (None, "skipped (--skip jax)") if "jax" in skip else jax_or_none()
    if args.jax is not None:
        set_jax_tf32(args.jax, args.tf32)
    results = {"benchmark": "gpu_peers", "quick": args.quick, "tf32": args.tf32, "repeat": args.repeat,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "optimizer": args.spec.describe(),
               "jax": None if args.jax is None else args.jax.__version__}
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
    opt = "" if args.optimizer == "sgd" else f"_{args.optimizer}"
    name = f"gpu_peers_{slug}{'_tf32' if args.tf32 else ''}{opt}{'_quick' if args.quick else ''}.json"
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
