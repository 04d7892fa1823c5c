"""Two choices in the compiled mini-batch epoch (kernels/numba_kernels.py), measured:

    python benchmarks/batch_step_ab.py [--rounds 8] [--out FILE]

1. The first layer's layout. Its two products (it forms no input delta) as the usual
   ``X @ W.T`` and ``W += -lr D^T X``, or with W held transposed, ``X @ Wt`` and
   ``Wt += -lr X^T D`` (``numba_kernels.gemm`` in a compiled loop, best of 7, on one and on
   two BLAS threads), across shapes: where ``NumbaBackend.FIRST_TRANSPOSED_MAX`` comes from.
2. The softmax + cross-entropy output pass of a batch, row by row (``output_layer`` per row,
   as before) against ``_softmax_rows`` (column-wise, the exps in one flat loop); both give
   the same bits (tests/test_numba_backend.py).
3. Whole fits, float32, relu/softmax, one process, rounds interleaved: the epoch with its
   first layer held transposed against the usual layout (``FIRST_TRANSPOSED_MAX`` = 0), us
   per step, for the rules of the peers benchmark.

Writes benchmarks/results/batch-step-ab-<UTC>.json with the machine described.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from numba import njit  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from fastbp.bench import machine  # noqa: E402
from fastbp.bench.optimizer import OptimizerSpec, fit_kwargs  # noqa: E402
from fastbp.kernels import numba_kernels as K  # noqa: E402
from fastbp.kernels.numba import NumbaBackend  # noqa: E402

F = np.float32
LAYOUT_SHAPES = [(16, 64, 64), (32, 64, 64), (64, 64, 64), (128, 64, 64), (32, 128, 128), (64, 256, 64),
                 (256, 64, 64), (64, 128, 256), (32, 784, 128), (128, 256, 256), (64, 784, 256)]
FITS = [((64, 64, 10), 32), ((64, 128, 10), 64), ((784, 256, 10), 64)]
RULES = ("sgd", "momentum", "adam")


def _gemm_us(trans_a, trans_b, A, B, beta, C) -> float:
    reps = max(50, int(3e7 / (A.size * C.shape[1])))
    K.gemm_loop(trans_a, trans_b, A, B, F(beta), C, 3)
    best = np.inf
    for _ in range(7):
        t = time.perf_counter()
        K.gemm_loop(trans_a, trans_b, A, B, F(beta), C, reps)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def first_layer_layouts(rng) -> list[dict]:
    rows = []
    for threads in (1, 2):
        with threadpool_limits(threads):
            for n, n_in, n_out in LAYOUT_SHAPES:
                X = rng.random((n, n_in), dtype=F)
                W = rng.random((n_out, n_in), dtype=F)
                D = rng.random((n, n_out), dtype=F)
                Z, G, Gt = np.zeros((n, n_out), F), np.zeros((n_out, n_in), F), np.zeros((n_in, n_out), F)
                usual = _gemm_us(False, True, X, W, 0, Z) + _gemm_us(True, False, D, X, 1, G)
                held = _gemm_us(False, False, X, np.ascontiguousarray(W.T), 0, Z) + _gemm_us(True, False, X, D, 1, Gt)
                rows.append({"threads": threads, "n_rows_in_out": [n, n_in, n_out], "multiply_adds": n * n_in * n_out,
                             "usual_us": usual, "transposed_us": held, "transposed_over_usual": held / usual})
                print(f"  layout {threads} thr {n}x{n_in}x{n_out}: usual {usual:.2f} us, transposed {held:.2f} us "
                      f"({held / usual:.2f}x)", flush=True)
    return rows


@njit(cache=False)
def _rows_loop(reps, Z, A, D, Y, n, k, scale):
    total = 0.0
    for _ in range(reps):
        for r in range(n):
            total += K.output_layer(K.CROSS_ENTROPY, K.SOFTMAX, Z, A, D, r * k, k, Y, r, scale)
    return total


@njit(cache=False)
def _batch_loop(reps, Z, A, D, Y, n, k, scale):
    total = 0.0
    for _ in range(reps):
        total += K._softmax_rows(Z, A, D, Y, n, k, scale)
    return total


def softmax_passes(rng, rounds) -> list[dict]:
    rows = []
    for n, k in ((32, 10), (64, 10), (512, 10)):
        Z = rng.standard_normal(n * k).astype(F)
        Y = np.eye(k, dtype=F)[rng.integers(0, k, n)]
        A, D = np.zeros(n * k, F), np.zeros(n * k, F)
        reps = max(100, 640000 // (n * k))
        times = {"row_by_row": [], "column_wise": []}
        for fn in (_rows_loop, _batch_loop):
            fn(2, Z, A, D, Y, n, k, F(1 / n))
        for r in range(rounds):
            for name, fn in ((("row_by_row", _rows_loop), ("column_wise", _batch_loop))[::1 if r % 2 else -1]):
                t = time.perf_counter()
                fn(reps, Z, A, D, Y, n, k, F(1 / n))
                times[name].append((time.perf_counter() - t) / reps * 1e6)
        rows.append({"rows": n, "outputs": k, "us_per_pass": times,
                     "min_us": {v: min(t) for v, t in times.items()}})
        print(f"  softmax {n}x{k}: row by row {min(times['row_by_row']):.2f} us, column-wise "
              f"{min(times['column_wise']):.2f} us", flush=True)
    return rows


def fits(rng, rounds) -> list[dict]:
    rows = []
    for sizes, batch in FITS:
        n = batch * 42
        X = rng.random((n, sizes[0]), dtype=F)
        Y = np.eye(sizes[-1], dtype=F)[rng.integers(0, sizes[-1], n)]
        epochs = max(1, int(2e8 / (n * 3 * sum(a * b for a, b in zip(sizes, sizes[1:])))))
        for rule in RULES:
            spec = OptimizerSpec.make(rule, 0.001 if rule == "adam" else 0.05)
            net = fb.MLP(list(sizes), activation="relu", loss="cross_entropy", dtype="float32", seed=0)
            net.fit(X[:4 * batch], Y[:4 * batch], epochs=1, batch_size=batch, progress=False,
                    **fit_kwargs(net, spec, first=True))
            kwargs = fit_kwargs(net, spec, first=False)
            times = {"usual": [], "first_transposed": []}
            default = NumbaBackend.FIRST_TRANSPOSED_MAX
            try:
                for r in range(2 * rounds):
                    name = ("usual", "first_transposed")[(r + r // 2) % 2]  # ABBA
                    NumbaBackend.FIRST_TRANSPOSED_MAX = default if name == "first_transposed" else 0
                    t = time.perf_counter()
                    net.fit(X, Y, epochs=epochs, batch_size=batch, seed=r, progress=False, **kwargs)
                    times[name].append((time.perf_counter() - t) / (epochs * 42) * 1e6)
            finally:
                NumbaBackend.FIRST_TRANSPOSED_MAX = default
            first = batch * sizes[0] * sizes[1]
            rows.append({"sizes": list(sizes), "batch": batch, "rule": rule, "epochs_per_round": epochs,
                         "first_layer_multiply_adds": first, "chosen": "first_transposed"
                         if NumbaBackend.FORWARD_BLAS_MIN <= first <= default else "usual",
                         "us_per_step": times, "median_us": {v: float(np.median(t)) for v, t in times.items()},
                         "min_us": {v: min(t) for v, t in times.items()}})
            m = rows[-1]["median_us"]
            print(f"  fit {'-'.join(map(str, sizes))} b{batch} {rule}: usual {m['usual']:.1f} us/step, first "
                  f"transposed {m['first_transposed']:.1f} (median of {rounds})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    load = machine.load_snapshot("start")
    with fb.use_backend("numba"):
        record = {"schema": "fastbp-batch-step-ab/1", "command": sys.argv,
                  "source": machine.source_state(str(ROOT)), "machine": machine.describe(),
                  "first_layer_layout": first_layer_layouts(rng), "softmax_output_pass": softmax_passes(rng, args.rounds),
                  "fits": fits(rng, args.rounds)}
    record["load"] = [load, machine.load_snapshot("end")]
    out = args.out or ROOT / "benchmarks" / "results" / (
        "batch-step-ab-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
