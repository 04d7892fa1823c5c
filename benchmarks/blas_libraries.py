"""The Numba backend's GEMMs on each BLAS library it can bind (kernels/blas.py), at the step shapes
of issue 10's mini-batch workloads and at 4096^3, side by side in one run.

    python benchmarks/blas_libraries.py [--repeat 5] [--out FILE]

Each library runs in its own process (the binding is per process, ``FASTBP_BLAS``), the
libraries alternate repeat by repeat, and every repeat is kept; each product is timed as the
compiled epochs call it (``numba_kernels.gemm`` in a compiled loop, ``fastbp.bench.timing
.gemm_at_shapes``) on the BLAS threads the backend would choose on a quiet machine (all cores).
The first layer's weight gradient is also timed as ``C = D^T A + beta C`` for beta 0, 1 and 0.9
(the momentum step's GEMM: a beta other than 0 or 1 can cost a pass of its own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastbp.bench import machine  # noqa: E402
from fastbp.kernels import blas  # noqa: E402

WORKLOADS = {  # name: (sizes, batch), as benchmarks/peers_cpu.py
    "minibatch64_784_256_10": ([784, 256, 10], 64),
    "large_1024_2048_2048_10_batch512": ([1024, 2048, 2048, 10], 512),
    "small_64_64_10_batch32": ([64, 64, 10], 32),
    "digits_64_100_10_batch200": ([64, 100, 10], 200),
}

_CHILD = """
import json, sys
import fastbp as fb
from fastbp.bench.timing import gemm_at_shapes, measure_matmul_peak
from fastbp.kernels import blas
from fastbp.bench.timing import weight_gradient_by_beta
lib = blas.active()
out = {"library": lib.describe(), "workloads": {}}
for name, (sizes, batch) in json.loads(sys.argv[1]).items():
    out["workloads"][name] = gemm_at_shapes(sizes, batch, "float32")
    out["workloads"][name]["weight_gradient1_us_by_beta"] = weight_gradient_by_beta(sizes[0], sizes[1], batch)
peak = measure_matmul_peak("float32", 4096, backend=fb.backend._create("numba"), repeat=3)
out["sgemm_4096_gflops"] = peak["gflops_best"]
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="processes per library, alternating (default 3)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    libraries = ["openblas"] + (["mkl"] if blas.mkl_library() else [])
    started = dt.datetime.now(dt.timezone.utc)
    runs: dict[str, list] = {lib: [] for lib in libraries}
    load = [machine.load_snapshot("start")]
    for r in range(args.repeat):
        for lib in libraries:
            env = dict(os.environ, FASTBP_BLAS=lib)
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(WORKLOADS)], env=env,
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["load_average_after"] = machine.load_average()
            runs[lib].append(rec)
            line = ", ".join(f"{w}: {rec['workloads'][w]['step_gemm_us']:.0f} us" for w in WORKLOADS)
            print(f"[{r + 1}/{args.repeat}] {lib}: SGEMM 4096 {rec['sgemm_4096_gflops']:.0f} GF/s; step GEMMs {line}",
                  flush=True)
    load.append(machine.load_snapshot("end"))
    summary = {}
    for w in WORKLOADS:
        best = {lib: min(r["workloads"][w]["step_gemm_us"] for r in runs[lib]) for lib in libraries}
        summary[w] = {"step_gemm_us_best": best}
        summary[w]["weight_gradient1_us_by_beta_best"] = {
            lib: {b: min(r["workloads"][w]["weight_gradient1_us_by_beta"][b] for r in runs[lib])
                  for b in runs[lib][0]["workloads"][w]["weight_gradient1_us_by_beta"]} for lib in libraries}
        if "mkl" in best:
            summary[w]["openblas_over_mkl"] = best["openblas"] / best["mkl"]
    summary["sgemm_4096_gflops_best"] = {lib: max(r["sgemm_4096_gflops"] for r in runs[lib]) for lib in libraries}
    record = {"schema": "fastbp-blas-libraries/1", "started_utc": started.isoformat(), "command": " ".join(sys.argv),
              "machine": machine.describe(), "load": load, "summary": summary, "runs": runs}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gemm-shapes-{started:%Y%m%dT%H%M%SZ}.json")
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
