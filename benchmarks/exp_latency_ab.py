"""The float32 exp of the kernels (``numba_kernels.exp_nonpositive``: Cephes' degree-6 float32
polynomial) against a candidate with a shorter dependency chain (glibc's expf scheme: a
32-entry table and a cubic, in float64), in one process, rounds interleaved:

    python benchmarks/exp_latency_ab.py [--rounds 15] [--out FILE]

- ``chain``: a hand-written 2-8-1 sigmoid/log-loss SGD loop (per example: 8 hidden sigmoids,
  one output sigmoid, the update), identical but for the exp: the exp sits on the
  example-to-example dependency chain, so its latency sets the speed. Compiled twice: with the
  kernels' fast-math flags (reassoc, contract) and with all of them (``fastmath=True``, which
  the kernels cannot take: nnan lets LLVM drop NaN semantics the divergence checks rely on);
- ``throughput``: one long array through the exp (what a batch's softmax or sigmoid loop sees);
- ``max_ulp``: against float64 ``np.exp`` over 2M points of [-87, 0].

Writes benchmarks/results/exp-latency-ab-<UTC>.json with the machine described.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

ROOT = Path(__file__).resolve().parent.parent
try:
    import fastbp as fb
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    import fastbp as fb
from fastbp.bench import machine  # noqa: E402
from fastbp.kernels import numba_kernels as K  # noqa: E402

F32 = np.float32


@intrinsic
def _float64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.uint64), codegen


@intrinsic
def _float64_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(types.float64), codegen


EXP_MIN = F32(-87.33)
TABLE_BITS = 5
N = 1 << TABLE_BITS
# 2^(i/N) as float64 bits less i << (52 - TABLE_BITS): adding k << (52 - TABLE_BITS) to entry
# k mod N gives 2^(k/N) for any integer k in range
TABLE = (np.array([2.0 ** (i / N) for i in range(N)]).view(np.uint64)
         - (np.arange(N, dtype=np.uint64) << np.uint64(52 - TABLE_BITS)))
INV_LN2_N = 1.4426950408889634 * N
SHIFT = 1.5 * 2.0 ** 52  # z + SHIFT rounds z to an integer held in the low bits
C0, C1, C2 = 0.055504108664821576 / N ** 3, 0.2402265069591007 / N ** 2, 0.6931471805599453 / N


@njit(inline="always", error_model="numpy")
def table_exp(x):
    """The candidate: glibc's expf scheme in float64, e^x = 2^(k/N) 2^(r/N) for z = x N/ln 2
    = k + r, 2^(k/N) from a 32-entry table, 2^(r/N) a cubic; NaN flows through (the index
    stays in range whatever the bits)."""
    xc = EXP_MIN if x < EXP_MIN else (F32(0.0) if x > 0 else x)
    xd = np.float64(xc)
    kd = K._fma(xd, INV_LN2_N, SHIFT)
    ki = _float64_bits(kd)  # k in the low bits (two's complement)
    r = K._fma(xd, INV_LN2_N, -(kd - SHIFT))  # z - k, |r| <= 1/2
    s = _float64_from_bits(TABLE[ki % np.uint64(N)] + (ki << np.uint64(52 - TABLE_BITS)))
    y = K._fma(K._fma(C0, r, C1), r * r, K._fma(C2, r, 1.0))
    return F32(0.0) if x < EXP_MIN else F32(y * s)


def _kernels(exp, fastmath):
    """The chain and the long-array loop compiled with ``exp`` (each its own machine code)."""
    @njit(inline="always", error_model="numpy")
    def sigmoid(x):
        e = exp(-abs(x))
        r = F32(1.0) / (F32(1.0) + e)
        return r if x >= 0 else e * r

    @njit(error_model="numpy", fastmath=fastmath)
    def chain(P, X, Y, lr):
        """One epoch of per-example SGD on a 2-8-1 sigmoid net with a log-loss output."""
        W1, b1, W2, b2 = P[:16].reshape(8, 2), P[16:24], P[24:32], P[32:33]
        a, d = np.empty(8, F32), np.empty(8, F32)
        total = 0.0
        for s in range(X.shape[0]):
            x0, x1 = X[s, 0], X[s, 1]
            for j in range(8):
                a[j] = sigmoid(W1[j, 0] * x0 + W1[j, 1] * x1 + b1[j])
            acc = b2[0]
            for j in range(8):
                acc += W2[j] * a[j]
            o, y = sigmoid(acc), Y[s, 0]
            total += -(y * np.log(max(o, F32(1e-7))) + (1 - y) * np.log(max(1 - o, F32(1e-7))))
            do = o - y
            for j in range(8):
                d[j] = W2[j] * do * a[j] * (F32(1.0) - a[j])
            for j in range(8):
                W2[j] -= lr * do * a[j]
            b2[0] -= lr * do
            for j in range(8):
                W1[j, 0] -= lr * d[j] * x0
                W1[j, 1] -= lr * d[j] * x1
                b1[j] -= lr * d[j]
        return total

    @njit(error_model="numpy")
    def through(x, out):
        for i in range(x.size):
            out[i] = exp(x[i])

    return chain, through


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    names = {0: "cephes_degree6_float32 (exp_nonpositive, kept)", 1: "table32_cubic_float64 (candidate)"}
    flags = {"kernel_flags": {"reassoc", "contract"}, "all_fast_math": True}
    rng = np.random.default_rng(0)
    n = 40_000
    X = rng.standard_normal((n, 2)).astype(F32)
    Y = (X[:, :1] * X[:, 1:] > 0).astype(F32)
    x = -(rng.random(2_000_000) * 87.0).astype(F32)
    out = np.empty_like(x)
    P0 = (rng.standard_normal(33) * 0.5).astype(F32)
    res = {w: {**{f"chain_ns_per_example_{f}": [] for f in flags}, "throughput_ns_per_exp": []} for w in names}
    fns = {w: {f: _kernels(exp, fm) for f, fm in flags.items()} for w, exp in ((0, K.exp_nonpositive), (1, table_exp))}
    for per_flags in fns.values():  # compile, untimed
        for chain, through in per_flags.values():
            chain(P0.copy(), X[:10], Y[:10], F32(0.1))
            through(x[:10], out[:10])
    load = machine.load_snapshot("start")
    for _ in range(args.rounds):
        for w, per_flags in fns.items():
            for f, (chain, _) in per_flags.items():
                P = P0.copy()
                t = time.perf_counter()
                chain(P, X, Y, F32(0.1))
                res[w][f"chain_ns_per_example_{f}"].append((time.perf_counter() - t) / n * 1e9)
            t = time.perf_counter()
            per_flags["kernel_flags"][1](x, out)
            res[w]["throughput_ns_per_exp"].append((time.perf_counter() - t) / x.size * 1e9)
    exact = np.exp(x.astype(np.float64))
    spacing = np.spacing(exact.astype(F32)).astype(np.float64)
    summary = {}
    for w, name in names.items():
        fns[w]["kernel_flags"][1](x, out)
        r = res[w]
        summary[name] = {**{f"{k}_best": min(v) for k, v in r.items()},
                         **{f"{k}_median": float(np.median(v)) for k, v in r.items()},
                         "max_ulp": float((np.abs(out - exact) / spacing).max()), "repeats": r}
    old, new = (summary[names[w]] for w in (0, 1))
    ratios = {f"chain_speedup_{f}_{stat}": old[f"chain_ns_per_example_{f}_{stat}"] / new[f"chain_ns_per_example_{f}_{stat}"]
              for f in flags for stat in ("best", "median")}
    ratios["throughput_time_ratio_best"] = new["throughput_ns_per_exp_best"] / old["throughput_ns_per_exp_best"]
    record = {"what": "float32 exp: latency in a 2-8-1 per-example SGD chain, throughput, accuracy",
              "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine.describe(), "load": [load, machine.load_snapshot("end")],
              "rounds": args.rounds, "results": summary, "candidate_over_kept": ratios}
    for name, r in summary.items():
        print(f"{name}: chain {r['chain_ns_per_example_kernel_flags_best']:.1f} ns/example with the kernels' flags, "
              f"{r['chain_ns_per_example_all_fast_math_best']:.1f} with all fast-math; long array "
              f"{r['throughput_ns_per_exp_best']:.2f} ns/exp; max {r['max_ulp']:.3f} ulp")
    print("candidate over kept:", {k: round(v, 2) for k, v in ratios.items()})
    out_path = args.out or ROOT / "benchmarks" / "results" / (
        "exp-latency-ab-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".json")
    out_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
