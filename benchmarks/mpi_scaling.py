"""Data-parallel scaling over MPI: measured on this machine, projected with an alpha-beta model.

    .venv/bin/python benchmarks/mpi_scaling.py [--quick] [--out FILE]

Measured (every MPI rank pinned to one BLAS thread, FASTBP_BACKEND as set, default numba):

* ``fit``: samples/s of ``fit(..., comm=MPI.COMM_WORLD)`` under ``mpiexec -n 1`` and ``-n 2``
  for each workload (same global batch), beside the single-process fit without comm at 1 and at
  2 BLAS threads (the compiled Numba epoch where the backend takes it) -- 1 vs 2 ranks on this
  2-core machine -- with the share of the 2-rank fit spent in the allreduce (waits included).
  ``--repeats`` alternating runs, the best of each kept (the machine is shared).
* ``allreduce``: the in-place ``Allreduce(SUM)`` of a float32 buffer between 2 ranks on loopback
  (shared memory), 4 B to 64 MiB: median latency and bandwidth, and a least-squares fit of
  ``T(m) = a + b m``.
* ``compute``: per-rank time of one step (gather, gradient, allreduce on one rank, update) for a
  share of ``r`` rows of the batch, from ``fit(comm=MPI.COMM_SELF)``.

Projected (a model, not a measurement): for p ranks, the allreduce of m bytes costs
``2 log2(p) alpha + 2 (p-1)/p m beta`` (reduce-scatter + allgather, as MPICH does for large
messages), with alpha = a/2 and beta = b from the 2-rank loopback fit -- shared memory, so a real
network is slower; an assumed 25 Gb/s Ethernet (alpha 10 us, 3.1 GB/s) is projected beside it. A
step on p ranks takes ``t_compute(batch/p) + T_allreduce(p, 4 n_params)``; strong-scaling
efficiency (global batch fixed, where batch >= p) is ``t_compute(batch) / (p * t_step(p))``, and
weak-scaling efficiency (share per rank fixed at batch/2, global batch p * share) is
``t_compute(share) / t_step(p)``. The t_compute curve is measured here down to 1 row per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = {  # name: (sizes, activation, loss, batch, rows)
    "mnist_mlp": ([784, 256, 10], "relu", "cross_entropy", 256, 16384),
    "wide_large_batch": ([784, 1024, 1024, 10], "relu", "cross_entropy", 2048, 16384),
    "out_of_core_mlp": ([128, 64, 10], "relu", "cross_entropy", 256, 65536),
    "tiny_logistic": ([16, 1], "sigmoid", "log_loss", 32, 16384),
}
ASSUMED_NETWORK = {"name": "25 Gb/s Ethernet (assumed)", "alpha_s": 10e-6, "beta_s_per_byte": 1 / 3.125e9}
PROJECT_RANKS = (2, 8, 64, 512)


def _data(sizes, loss, rows):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, sizes[0]), dtype=np.float32)
    if loss == "cross_entropy":
        return X, rng.integers(0, sizes[-1], rows)
    return X, rng.integers(0, 2, (rows, sizes[-1])).astype(np.float32)


def _fit_rate(name, comm, epochs, batch=None, threads=None):
    """Samples/s of the epochs after the first of one fit (the first also holds JIT and checks)."""
    import fastbp as fb
    from fastbp import training

    sizes, activation, loss, default_batch, rows = WORKLOADS[name]
    X, Y = _data(sizes, loss, rows)
    net = fb.MLP(sizes, activation=activation, loss=loss, seed=0)
    stamps = [time.perf_counter()]
    training.fit(net, X, Y, epochs=epochs + 1, batch_size=batch or default_batch, lr=0.01, progress=False, comm=comm,
            threads=threads, callbacks=[lambda e, logs: stamps.append(time.perf_counter())])
    return rows / float(np.median(np.diff(stamps)[1:]))


# ---------------------------------------------------------------- children (one per mpiexec run)
def child_fit(epochs):
    """Samples/s of each workload under this mpiexec, and the share of the fit each rank spent in
    the per-step allreduce (waiting for the slowest rank included): the most of any rank."""
    from mpi4py import MPI

    from fastbp import parallel

    comm = MPI.COMM_WORLD
    spent = [0.0]
    reduce = parallel.Collective.allreduce_gradients

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return reduce(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    parallel.Collective.allreduce_gradients = timed
    out = {}
    for name in WORKLOADS:
        comm.Barrier()
        spent[0], t0 = 0.0, time.perf_counter()
        rate = _fit_rate(name, comm, epochs)
        share = comm.allreduce(spent[0] / (time.perf_counter() - t0), op=MPI.MAX)
        out[name] = {"samples_per_s": rate, "allreduce_share": share}
    return out if comm.Get_rank() == 0 else None


def child_single(epochs):
    """One process, no comm, at 1 and 2 BLAS threads (the Numba epoch where it applies)."""
    return {name: {str(t): _fit_rate(name, None, epochs, threads=t) for t in (1, 2)} for name in WORKLOADS}


def child_compute(epochs):
    """Per-rank step time for shares of r rows: fit(comm=COMM_SELF) with batch_size=r."""
    from mpi4py import MPI

    out = {}
    for name, (sizes, _, _, batch, rows) in WORKLOADS.items():
        curve = {}
        r = batch
        while r >= 1:
            steps = max(64, min(2048, rows // r))
            sub = min(rows, steps * r)
            WORKLOADS[name] = (*WORKLOADS[name][:4], sub)
            curve[str(r)] = r / _fit_rate(name, MPI.COMM_SELF, epochs, batch=r)  # seconds per step
            r //= 4 if r > 4 else 2
        WORKLOADS[name] = (*WORKLOADS[name][:4], rows)
        out[name] = curve
    return out


def child_allreduce(quick):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sizes = [4 << (2 * i) for i in range(13)]  # 4 B .. 64 MiB
    out = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        reps = max(5, min(2000, int(2e8 / max(nbytes, 1)) // (10 if quick else 1)))
        for _ in range(min(reps, 20)):  # warm-up
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        times = []
        for _ in range(reps):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        t = comm.allreduce(float(np.median(times)), op=MPI.MAX)
        out.append({"bytes": nbytes, "median_s": t, "reps": reps, "bandwidth_gb_s": nbytes / t / 1e9})
    library = MPI.Get_library_version().splitlines()[0].strip()
    return {"sizes": out, "mpi": {"library": library, "mpi4py": __import__("mpi4py").__version__}} \
        if comm.Get_rank() == 0 else None


# ---------------------------------------------------------------- the model
def allreduce_s(p, nbytes, alpha, beta):
    return 0.0 if p == 1 else 2 * math.log2(p) * alpha + 2 * (p - 1) / p * nbytes * beta


def project(compute, n_params_of, alpha, beta):
    """Strong and weak scaling efficiency per workload and rank count."""
    result = {}
    for name, curve in compute.items():
        batch = WORKLOADS[name][3]
        rows = sorted(int(r) for r in curve)
        t_of = lambda r: float(np.interp(math.log(r), [math.log(x) for x in rows], [curve[str(x)] for x in rows]))
        nbytes = 4 * n_params_of[name]
        strong, weak = {}, {}
        share = max(1, batch // 2)
        for p in PROJECT_RANKS:
            if batch >= p:
                step = t_of(max(1, batch // p)) + allreduce_s(p, nbytes, alpha, beta)
                strong[str(p)] = t_of(batch) / (p * step)
            weak[str(p)] = t_of(share) / (t_of(share) + allreduce_s(p, nbytes, alpha, beta))
        result[name] = {"allreduce_bytes": nbytes, "strong_efficiency": strong,
                        "weak_efficiency_share": share, "weak_efficiency": weak}
    return result


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def _run(n, mode, args, timeout=1800):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    env.setdefault("FASTBP_BACKEND", "numba")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, __file__, "--child", mode, *args]
    if mode == "single":
        cmd = cmd[3:]  # no mpiexec: a plain process, its BLAS threads set per fit
        env.pop("OPENBLAS_NUM_THREADS"), env.pop("OMP_NUM_THREADS")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repetitions (a smoke run)")
    parser.add_argument("--out", default=str(HERE / "results" / "mpi-scaling-latest.json"))
    parser.add_argument("--child")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating runs of the fit measurements; the best of each is kept")
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        fn = {"fit": lambda: child_fit(args.epochs), "single": lambda: child_single(args.epochs),
              "compute": lambda: child_compute(args.epochs), "allreduce": lambda: child_allreduce(args.quick)}
        result = fn[args.child]()
        if result is not None:
            print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    import fastbp as fb
    from fastbp.bench import machine

    epochs = ["--epochs", "1" if args.quick else str(args.epochs)] + (["--quick"] if args.quick else [])
    record = {"benchmark": "mpi_scaling", "backend": os.environ.get("FASTBP_BACKEND", "numba"),
              "workloads": {k: dict(zip(("sizes", "activation", "loss", "batch", "rows"), v))
                            for k, v in WORKLOADS.items()},
              "machine": {"cpu": machine.cpu_model(), "cpus": machine.cpu_counts(), "versions": machine.versions(),
                          },
              "load_before": machine.load_snapshot("before")}
    print("allreduce, 2 ranks ...", flush=True)
    ar = _run(2, "allreduce", epochs)
    record["machine"]["mpi"], ar = ar["mpi"], ar["sizes"]
    m = np.array([r["bytes"] for r in ar], float)
    t = np.array([r["median_s"] for r in ar])
    a, b = np.linalg.lstsq(np.stack([np.ones_like(m), m], 1), t, rcond=None)[0]
    a = max(a, float(t[0]))  # the intercept from the small messages when the fit undershoots
    record["allreduce_2_ranks"] = {"sizes": ar, "fit": {"a_s": a, "b_s_per_byte": b,
                                                       "alpha_s": a / 2, "beta_s_per_byte": b}}
    for r in ar:
        print(f"  {r['bytes']:>10d} B  {r['median_s'] * 1e6:10.1f} us  {r['bandwidth_gb_s']:7.3f} GB/s")
    print("fit: 1 process (1 and 2 BLAS threads), mpiexec -n 1, mpiexec -n 2 ...", flush=True)
    runs = {"single": [], "one": [], "two": []}
    for _ in range(1 if args.quick else args.repeats):  # alternating, so a burst of load hits all alike
        runs["single"].append(_run(1, "single", epochs))
        runs["one"].append(_run(1, "fit", epochs))
        runs["two"].append(_run(2, "fit", epochs))
    record["fit_runs"] = runs
    best = lambda key, name, pick: max(pick(r[name]) for r in runs[key])
    fits = {}
    for name in WORKLOADS:
        single = {t: best("single", name, lambda x: x[t]) for t in ("1", "2")}
        one, two = best("one", name, lambda x: x["samples_per_s"]), best("two", name, lambda x: x["samples_per_s"])
        fits[name] = {"single_process_1_thread": single["1"], "single_process_2_threads": single["2"],
                      "mpi_1_rank": one, "mpi_2_ranks": two,
                      "allreduce_share_2_ranks": min(r[name]["allreduce_share"] for r in runs["two"]),
                      "speedup_2_ranks_over_1_rank": two / one,
                      "speedup_2_ranks_over_1_process_1_thread": two / single["1"],
                      "ratio_2_ranks_to_1_process_2_threads": two / single["2"]}
        print(f"  {name:18s} samples/s: 1 proc {single['1']:10.0f} (2 thr {single['2']:10.0f})  "
              f"1 rank {one:10.0f}  2 ranks {two:10.0f}  x{two / one:.2f}  "
              f"allreduce {fits[name]['allreduce_share_2_ranks']:.0%}", flush=True)
    record["fit_samples_per_s"] = fits
    print("per-rank compute curve ...", flush=True)
    compute = _run(1, "compute", epochs)
    record["compute_s_per_step"] = compute
    n_params = {name: fb.MLP(WORKLOADS[name][0], loss=WORKLOADS[name][2]).n_params for name in WORKLOADS}
    record["projection"] = {
        "model": "t_step(p) = t_compute(batch/p) + 2 log2(p) alpha + 2 (p-1)/p m beta",
        "loopback_measured_constants": project(compute, n_params, a / 2, b),
        ASSUMED_NETWORK["name"]: project(compute, n_params, ASSUMED_NETWORK["alpha_s"],
                                         ASSUMED_NETWORK["beta_s_per_byte"]),
    }
    record["load_after"] = machine.load_snapshot("after")
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["projection"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
