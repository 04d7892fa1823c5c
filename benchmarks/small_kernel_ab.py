"""The per-example kernel of a small one-hidden-layer network (``numba_kernels.shallow_body``)
compiled three ways, in one process, rounds interleaved: with the hidden-unit count a
compile-time constant (LLVM unrolls the loops over the units) and LLVM's SLP vectorizer on, as
kernels/numba.py compiles it (``_SLPCompiled``); the same without SLP (Numba's default:
the unrolled loops stay scalar code); and the count read at run time (the loops stay loops,
which the loop vectorizer takes), SLP on:

    python benchmarks/small_kernel_ab.py [--rounds 9] [--out FILE]

Each (network, optimizer) times one epoch of 4000 shuffled float32 examples per round under
each variant from the same start, and records how far each variant's parameters end from the
first's (float32 rounding where reassociation orders a sum differently; more where the
epoch's training diverges, as 8-32-4 tanh's can). What kernels/numba.py's generated small
kernels choose (``_hidden_count``, ``_SLPCompiled``) comes from this record.

Writes benchmarks/results/small-kernel-ab-<UTC>.json with the machine described.
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
from fastbp.bench import machine  # noqa: E402
from fastbp.kernels.base import OptimizerState, UpdateRule  # noqa: E402
from fastbp.kernels.numba import _SLPCompiled  # noqa: E402

NETS = [((2, 4, 1), "relu", "log_loss"), ((2, 8, 1), "relu", "log_loss"), ((2, 16, 1), "relu", "log_loss"),
        ((4, 16, 3), "relu", "cross_entropy"), ((2, 8, 1), "sigmoid", "log_loss"),
        ((2, 4, 1), "sigmoid", "log_loss"), ((8, 32, 4), "tanh", "cross_entropy")]
RULES = {"sgd": UpdateRule("sgd", lr=0.05), "momentum": UpdateRule("sgd", lr=0.05, momentum=0.9),
         "adam": UpdateRule("adam", lr=0.01)}
N = 4000


def _kernel(n_in, hidden_count, n_out, codes):
    """``shallow_body`` with these sizes (``hidden_count`` a literal or ``"sizes[1]"``)."""
    source = ("import numpy as np\nfrom numba import njit\n"
              "from fastbp.kernels.numba_kernels import _DOT_MATH, shallow_body\n"
              "@njit(error_model='numpy', fastmath=_DOT_MATH)\n"
              "def epoch(sizes, hidden, output, loss, P, X, Y, order, hp, step, S, work):\n"
              f"    return shallow_body({n_in}, {hidden_count}, {n_out}, {', '.join(map(str, codes))}, "
              "P, X, Y, order, hp, step, S, work, np.empty(0, np.int64), np.empty(0, np.uint64), "
              "np.empty(0, np.uint64))\n")
    scope = {}
    exec(source, scope)
    return scope["epoch"]


def _data(sizes, loss, rng):
    X = rng.standard_normal((N, sizes[0])).astype(np.float32)
    if loss == "cross_entropy":
        return X, np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], N)]
    return X, (X[:, :1] * X[:, 1:2] > 0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    load = machine.load_snapshot("start")
    results = {}
    for sizes, act, loss in NETS:
        with fb.use_backend("numba"):
            net = fb.MLP(list(sizes), activation=act, loss=loss, dtype="float32", seed=0)
        spec = net.backend._spec(net.spec)
        rng = np.random.default_rng(0)
        X, Y = _data(sizes, loss, rng)
        order = rng.permutation(N)
        variants = {"constant": _SLPCompiled(_kernel(sizes[0], sizes[1], sizes[2], spec[1:])),
                    "constant_without_slp": _kernel(sizes[0], sizes[1], sizes[2], spec[1:]),
                    "runtime": _SLPCompiled(_kernel(sizes[0], "sizes[1]", sizes[2], spec[1:]))}
        for name, rule in RULES.items():
            def epoch(v):
                p = net._params.copy()
                state = OptimizerState(np.zeros((rule.n_buffers, net.spec.n_params), np.float32))
                t = time.perf_counter()
                variants[v](*spec, p, X, Y, order, rule.hyper(), state.step, state.buffers, np.empty(0, np.float32))
                return (time.perf_counter() - t) / N * 1e9, p
            ends = {v: epoch(v)[1] for v in variants}  # compiles (first rule) or warms, untimed
            ns = {v: [] for v in variants}
            for r in range(args.rounds):
                for v in (variants if r % 2 == 0 else list(variants)[::-1]):
                    ns[v].append(epoch(v)[0])
            key = f"{'-'.join(map(str, sizes))} {act} {loss} {name}"
            best = {v: min(t) for v, t in ns.items()}
            results[key] = {"ns_per_example_best": best, "ns_per_example_repeats": ns,
                            "runtime_speedup_best": best["constant"] / best["runtime"],
                            "slp_speedup_best": best["constant_without_slp"] / best["constant"],
                            # against "constant", per variant; large only where training diverges
                            "max_param_difference": {v: float(np.max(np.abs(ends["constant"] - ends[v])))
                                                     for v in variants if v != "constant"}}
            print(f"{key:38s} constant {best['constant']:6.1f}  without SLP {best['constant_without_slp']:6.1f}  "
                  f"runtime {best['runtime']:6.1f} ns/example", flush=True)
    record = {"what": "small-net per-example kernel: hidden count as a compile-time constant (SLP vectorizer on "
                      "and off) vs read at run time",
              "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "source": machine.source_state(str(ROOT)), "machine": machine.describe(),
              "load": [load, machine.load_snapshot("end")], "rounds": args.rounds, "examples": N,
              "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / (
        "small-kernel-ab-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
