#!/usr/bin/env python3
"""The probes of ``make gpu-check`` (benchmarks/gpu_check/run.sh), one part per call.

    python3 benchmarks/gpu_check/probe.py env OUTDIR      versions, from package metadata (no GPU needed)
    python3 benchmarks/gpu_check/probe.py device OUTDIR   exit 0: a CUDA device is usable; 3: none (says why)
    python3 benchmarks/gpu_check/probe.py gpu OUTDIR      NVRTC, direct cuBLAS, every step route and rule

Each writes OUTDIR/<part>.json. Within ``gpu``, every check is guarded: a failure is recorded with
its traceback and the rest still runs; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' NumPy reference epoch and cases

NO_DEVICE = 3
DISTRIBUTIONS = ("numpy", "numba", "scipy", "torch", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin",
                 "cupy-cuda12x", "cupy-cuda13x", "cupy", "cuda-pathfinder", "nvidia-cublas-cu12", "nvidia-cublas",
                 "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvrtc", "pytest", "pytest-timeout", "scikit-learn")


def _write(out: str, part: str, record: dict) -> None:
    path = Path(out) / f"{part}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {path}", flush=True)


def env(out: str) -> int:
    import importlib.metadata as md

    record = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
              "root": str(ROOT), "versions": {}}
    for dist in DISTRIBUTIONS:
        try:
            record["versions"][dist] = md.version(dist)
        except md.PackageNotFoundError:
            record["versions"][dist] = None
    for tool in ("nvidia-smi", "nvcc", "compute-sanitizer"):
        record[tool] = shutil.which(tool)
    if record["nvidia-smi"]:
        try:
            record["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=15).stdout.strip()
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            record["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    for key, value in record["versions"].items():
        if value:
            print(f"  {key:24s} {value}")
    _write(out, "env", record)
    return 0


def device(out: str) -> int:
    """fastbp's own answer: the cupy backend is created, or BackendUnavailableError says why not."""
    import fastbp as fb

    record: dict = {}
    try:
        be = fb.set_backend("cupy")
    except fb.BackendUnavailableError as exc:
        record = {"usable": False, "reason": exc.reason, "fix": exc.fix}
        print(f"no device: {exc.reason}\n  to fix: {exc.fix}", flush=True)
        _write(out, "device", record)
        return NO_DEVICE
    record = {"usable": True, "info": be.info()}
    print(f"device: {record['info']['device']} (cc {record['info']['compute_capability']}), CUDA runtime "
          f"{record['info']['cuda_runtime']}, driver {record['info']['cuda_driver']}, cupy {record['info']['cupy']}, "
          f"cublas_direct {record['info']['cublas_direct']} {record['info']['cublas_direct_error'] or ''}", flush=True)
    _write(out, "device", record)
    return 0


# ---------------------------------------------------------------- gpu

# what the routes check trains: the tests' small networks and the benchmark's MNIST-sized one
ROUTE_SPECS = lambda t: (t.SPECS[1], t.SPECS[2], ((784, 256, 256, 10), "relu", "softmax", "cross_entropy"))  # noqa: E731
ROUTE_RULES = ("sgd", "nesterov-wd", "adam", "adamw", "adam-l2")


class _Checks:
    def __init__(self) -> None:
        self.record: dict = {}
        self.failed: list[str] = []

    def run(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
            if caught:
                self.record.setdefault("warnings", {})[name] = [str(w.message)[:500] for w in caught]
            ok = not (isinstance(result, dict) and result.get("failed"))
        except Exception as exc:  # noqa: BLE001 - record and go on
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            ok = False
        self.record[name] = result
        if not ok:
            self.failed.append(name)
        print(f"[{name}] {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s: {str(result)[:400]}",
              flush=True)


def _peers_versions() -> dict:
    out = {}
    try:
        import torch

        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except Exception as exc:  # noqa: BLE001
        out["torch"] = f"{type(exc).__name__}: {exc}"
    try:
        import jax

        out["jax"] = {"version": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    except Exception as exc:  # noqa: BLE001
        out["jax"] = f"{type(exc).__name__}: {exc}"
    return out


def gpu(out: str) -> int:
    import fastbp as fb
    import fastbp.kernels.cupy as kc
    import test_cupy_backend as t

    checks = _Checks()
    be = fb.set_backend("cupy")
    cp = be.xp

    def versions():
        rt = cp.cuda.runtime
        d = {"cupy": cp.__version__, "runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(),
             "info": be.info(), **_peers_versions()}
        try:
            d["nvrtc"] = list(cp.cuda.nvrtc.getVersion())
        except Exception as exc:  # noqa: BLE001
            d["nvrtc"] = f"{type(exc).__name__}: {exc}"
        return d

    def nvrtc():
        d = {}
        for dtype in ("float32", "float64"):  # compiled once per dtype, cached on disk afterwards
            t0 = time.perf_counter()
            table = be._kernels(dtype)
            d[f"{dtype}_s"] = round(time.perf_counter() - t0, 3)
            d[f"{dtype}_kernels"] = len(table)
        try:  # registers and spills, as the driver reports them for the compiled kernels
            k = be._kernels("float32")[kc._gemm_name("float", 0, 1, 64)]
            d["fb_gemm_64_registers"] = k.attributes.get("num_regs")
            d["fb_gemm_64_local_bytes"] = k.attributes.get("local_size_bytes")
        except Exception as exc:  # noqa: BLE001
            d["attributes"] = f"{type(exc).__name__}: {exc}"
        return d

    def cublas_direct():
        ctx = be._ctx()
        blas = be._blas_handles(ctx)
        if blas is None:
            return {"failed": True, "error": be._blas_error}
        res, bad = {}, False
        rng = np.random.default_rng(1)
        for dtype in (np.float32, np.float64):
            for ta, tb in ((0, 0), (0, 1), (1, 0), (1, 1)):
                M, N, K = 70, 45, 37
                A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
                B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
                C0 = rng.standard_normal((M, N)).astype(dtype)
                a, b, c = cp.asarray(A), cp.asarray(B), cp.asarray(C0)
                be.synchronize()
                with ctx.stream:
                    blas.gemm(ta, tb, M, N, K, 0.5, a, A.shape[1], b, B.shape[1], 0.25, c, N)
                ctx.stream.synchronize()
                ref = 0.5 * (A.T if ta else A).astype(np.float64) @ (B.T if tb else B).astype(np.float64) + 0.25 * C0
                err = float(np.abs(cp.asnumpy(c) - ref).max() / np.abs(ref).max())
                res[f"{np.dtype(dtype).name} ta={ta} tb={tb}"] = err
                bad |= err > (1e-12 if dtype == np.float64 else 1e-5)
        res["failed"] = bad
        return res

    def routes():
        """A short train_epoch per route, rule and dtype (and the serial step once, under auto) against
        the NumPy reference epoch."""
        res, bad, refs = {}, False, {}
        cases = [(spec_args, dtype, rule_name) for spec_args in ROUTE_SPECS(t)
                 for dtype in ("float64", "float32") for rule_name in ROUTE_RULES]
        old = be.step_route, be.fork
        try:
            for fork, route_list in ((True, kc.STEP_ROUTES + ("auto",)), (False, ("auto",))):
                be.fork = fork  # a change remakes the thread's graphs, so it changes twice in all
                for spec_args, dtype, rule_name in cases:
                    spec, params, X, Y = t._epoch_case(spec_args, dtype, n=37)
                    rule = t.RULES[rule_name]
                    if (spec, rule_name) not in refs:
                        expected, s_ref = params.copy(), t.new_state(spec, rule)
                        refs[spec, rule_name] = (t.reference_epoch(spec, expected, X, Y, 8, rule, s_ref), expected)
                    ref, expected = refs[spec, rule_name]
                    for route in route_list:
                        key = f"{'-'.join(map(str, spec.sizes))} {dtype} {rule_name} {route} fork={int(fork)}"
                        be.step_route = route
                        try:
                            t0 = time.perf_counter()
                            (ours,), p, state = t._epochs(be, spec, params, X, Y, 8, [rule])
                            first = time.perf_counter() - t0
                            err = float(np.abs(p - expected).max() / max(np.abs(expected).max(), 1e-30))
                            tol = 1e-9 if dtype == "float64" else 2e-3
                            ok = ours[1:] == ref[1:] and err < tol and state.steps == 5
                            res[key] = {"route_used": be.last_route.get((spec.sizes, 8)), "ok": ok,
                                        "param_rel_err": err, "loss": ours[0], "ref_loss": ref[0],
                                        "first_call_s": round(first, 3)}
                        except Exception as exc:  # noqa: BLE001
                            res[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                        bad |= not res[key]["ok"]
        finally:
            be.step_route, be.fork = old
        res["failed"] = bad
        return res

    checks.run("versions", versions)
    checks.run("nvrtc", nvrtc)
    checks.run("cublas_direct", cublas_direct)
    checks.run("routes", routes)
    checks.record["failed"] = checks.failed
    _write(out, "probe", checks.record)
    return 1 if checks.failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parts = {"env": env, "device": device, "gpu": gpu}
    if len(argv) != 2 or argv[0] not in parts:
        print(f"usage: probe.py {{{'|'.join(parts)}}} OUTDIR. Received: {argv}", file=sys.stderr)
        return 2
    os.makedirs(argv[1], exist_ok=True)
    return parts[argv[0]](argv[1])


if __name__ == "__main__":
    sys.exit(main())
