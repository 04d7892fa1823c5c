"""A/B of the Numba backend's teams (kernels/numba_kernels.py, "update passes on the BLAS
threads"): the same fits with ``NumbaBackend.TEAM_PASSES`` on and off, alternated round by
round in one process, on issue 10's workloads.

    python benchmarks/team_passes_ab.py [--workloads a,b] [--optimizers sgd,momentum,adam]
                                        [--rounds 8] [--threads 2] [--out FILE]

Each (workload, optimizer) trains two networks from the same seed, an epoch each per round,
one with the teams and one without, swapping settings (and order) every round, so neither a
network's memory layout nor a machine that speeds up or slows down mid-way favours one; the
record keeps every round's samples/s, the per-round ratio on/off and its median, the other
processes' CPU use per round, and whether the two networks ended bit-identical (they should:
both saw each setting, and each part runs the one-thread arithmetic; MKL's own GEMMs may still
round differently from one fit to the next).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import fastbp as fb
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    import fastbp as fb

from fastbp.bench import machine  # noqa: E402
from fastbp.kernels.numba import NumbaBackend  # noqa: E402
from peers_cpu import WORKLOADS, data  # noqa: E402

RULES = {"sgd": lambda lr: fb.optim.SGD(lr=lr), "momentum": lambda lr: fb.optim.SGD(lr=lr, momentum=0.9),
         "adam": lambda lr: fb.optim.Adam(lr=1e-3)}


def flat(net) -> np.ndarray:
    return np.concatenate([a.ravel() for part in net.get_params() for a in part])


def ab(name: str, rule: str, rounds: int, threads: int | None) -> dict:
    cfg = WORKLOADS[name]
    X, Y = data(cfg.get("data", "pixels"), cfg["n"], cfg["sizes"])
    b = cfg["batch"]
    nets, runs, others = [], {"on": [], "off": []}, []
    for k in ("on", "off"):
        NumbaBackend.TEAM_PASSES = k == "on"
        net = fb.MLP(cfg["sizes"], activation=cfg["activation"], loss=cfg["loss"], dtype="float32", seed=0)
        net.fit(X[:4 * b], Y[:4 * b], epochs=1, batch_size=b, progress=False, optimizer=RULES[rule](cfg["lr"]),
                threads=threads)  # untimed: compile, workspaces, state
        nets.append(net)
    for r in range(rounds):
        before = machine.cpu_busy_seconds(), machine.own_cpu_seconds(), time.perf_counter()
        # the two networks swap settings every round (and go in the other order), so neither
        # one's memory layout nor a drifting machine favours a setting
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            k = "on" if (r + i) % 2 == 0 else "off"
            NumbaBackend.TEAM_PASSES = k == "on"
            t = time.perf_counter()
            nets[i].fit(X, Y, epochs=1, batch_size=b, progress=False, optimizer=None, threads=threads)
            runs[k].append(len(X) / (time.perf_counter() - t))
        if before[0] is not None:
            wall = time.perf_counter() - before[2]
            others.append(round((machine.cpu_busy_seconds() - before[0] - (machine.own_cpu_seconds() - before[1]))
                                / wall, 3))
    NumbaBackend.TEAM_PASSES = True
    ratios = [a / b for a, b in zip(runs["on"], runs["off"])]
    return {"samples_per_s": {k: [round(v) for v in vs] for k, vs in runs.items()},
            "median_samples_per_s": {k: round(float(np.median(vs))) for k, vs in runs.items()},
            "ratio_on_off_per_round": [round(x, 3) for x in ratios], "ratio_on_off_median": round(float(np.median(ratios)), 3),
            "others_cores_per_round": others, "bit_identical": bool(np.array_equal(flat(nets[0]), flat(nets[1])))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="per_example_784_128_10,minibatch64_784_256_10,large_1024_2048_2048_10_batch512")
    ap.add_argument("--optimizers", default="sgd,momentum,adam")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads held fixed (0: the automatic policy)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    fb.set_backend("numba")
    threads = args.threads or None
    started = dt.datetime.now(dt.timezone.utc)
    rec = {"schema": "fastbp-ab/1", "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "what": "the same fits with NumbaBackend.TEAM_PASSES on and off, alternated round by round in one process",
           "command": "python benchmarks/team_passes_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "source": machine.source_state(str(ROOT)), "machine": machine.describe(),
           "update_passes": fb.backend._create("numba").team_description(), "results": {}}
    for name in args.workloads.split(","):
        for rule in args.optimizers.split(","):
            res = ab(name, rule, args.rounds, threads)
            rec["results"][f"{name}/{rule}"] = res
            print(f"{name} {rule}: on {res['median_samples_per_s']['on']:,} off {res['median_samples_per_s']['off']:,} "
                  f"samples/s, on/off per round {res['ratio_on_off_per_round']} (median {res['ratio_on_off_median']}), "
                  f"bit-identical {res['bit_identical']}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"team-passes-ab-{started:%Y%m%dT%H%M%SZ}.json")
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
