"""Out-of-core fit: memory growth and throughput on a 1.4 GB np.memmap against the in-memory fit.

    .venv/bin/python benchmarks/out_of_core.py [--rows 3000000] [--epochs 3] [--repeats 2] [--out FILE]
    .venv/bin/python benchmarks/out_of_core.py --memory-limit-mb 768 --out FILE   # root: in a cgroup

The issue's workload: 3M x 128 float32 inputs (1.4 GiB on disk, in /tmp), int16 class labels,
shuffled, batch 256, an MLP [128, 64, 10] (relu, cross_entropy, float32). Each configuration runs
in a fresh process, so its memory is its own:

* ``memmap``            fit on ``np.load(path, mmap_mode="r")`` (streamed, prefetch thread on)
* ``memmap_no_prefetch`` the same with the prefetch thread off
* ``in_memory``         the same data loaded whole first (``np.load`` without mmap), fit on that

Memory is the process's own (anonymous) memory, RssAnon in /proc/self/status, sampled every 5 ms
during the fit: the mapped file's pages are the page cache's, not the process's. Throughput is
samples per second of the epochs after the first (the first also runs fit's checks, for a memmap
one chunked pass over the file), after a warm-up fit (JIT compilation is not timed). The page
cache is warm (the file was just written or read); a cold disk would favour the prefetch more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("FASTBP_OOC_DIR", "/tmp/fastbp-out-of-core"))
SIZES = [128, 64, 10]


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _PeakSampler(threading.Thread):
    """The highest RssAnon seen while running (sampled; allocations shorter than 5 ms may hide)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = _rss_anon(), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.005)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _rss_anon())


def make_data(rows: int) -> tuple[Path, Path]:
    DATA.mkdir(parents=True, exist_ok=True)
    xp, yp = DATA / f"X-{rows}.npy", DATA / f"y-{rows}.npy"
    if not (xp.exists() and yp.exists()):
        rng = np.random.default_rng(0)
        X = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float32, shape=(rows, SIZES[0]))
        y = np.lib.format.open_memmap(yp, mode="w+", dtype=np.int16, shape=(rows,))
        w = rng.standard_normal((SIZES[0], SIZES[-1])).astype(np.float32)
        for start in range(0, rows, 1 << 16):
            block = rng.standard_normal((min(1 << 16, rows - start), SIZES[0]), dtype=np.float32)
            X[start:start + len(block)] = block
            y[start:start + len(block)] = np.argmax(block @ w, axis=1)  # learnable labels
        X.flush(), y.flush()
        del X, y
    return xp, yp


def child(mode: str, rows: int, epochs: int) -> dict:
    import fastbp as fb
    from fastbp import data as fbdata

    xp, yp = make_data(rows)
    warm_X = np.random.default_rng(1).standard_normal((2048, SIZES[0]), dtype=np.float32)
    warm = fb.MLP(SIZES, activation="relu", loss="cross_entropy", seed=0)
    warm.fit(warm_X, np.zeros(2048, np.int64), epochs=1, batch_size=256, progress=False)  # JIT, workspaces
    warm.fit(np.load(xp, mmap_mode="r")[:4096], np.load(yp, mmap_mode="r")[:4096], epochs=1, batch_size=256,
             progress=False)
    if mode == "in_memory":
        X, y = np.load(xp), np.load(yp)
    else:
        X, y = np.load(xp, mmap_mode="r"), np.load(yp, mmap_mode="r")
        fbdata.DEFAULT_PREFETCH = mode == "memmap"
    net = fb.MLP(SIZES, activation="relu", loss="cross_entropy", seed=0)
    base = _rss_anon()
    sampler = _PeakSampler()
    sampler.start()
    stamps = [time.perf_counter()]
    history = net.fit(X, y, epochs=epochs, batch_size=256, progress=False,
                      callbacks=[lambda epoch, logs: stamps.append(time.perf_counter())])
    peak = sampler.stop()
    times = np.diff(stamps).tolist()  # the first includes fit's checks (a chunked pass over the memmap)
    steady = times[1:] or times
    return {"mode": mode, "backend": fb.get_backend().name, "rows": rows, "epochs": epochs,
            "epoch_s": times, "samples_per_s_median": rows / float(np.median(steady)),
            "rss_anon_before_fit_mb": base / 2**20, "rss_anon_peak_growth_mb": (peak - base) / 2**20,
            "loss_last": float(history[-1]), "data_bytes": int(X.nbytes + y.nbytes)}


def _cgroup(limit_bytes: int) -> Path:
    """A fresh memory cgroup limited to ``limit_bytes`` (page cache included, as the kernel counts)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        group = v1 / f"fastbp-ooc-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    else:
        group = Path("/sys/fs/cgroup") / f"fastbp-ooc-{os.getpid()}"
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        (group / "memory.swap.max").write_text("0")
    return group


def limited(args) -> None:
    """Both fits inside a memory limit smaller than the data set: which one trains."""
    sys.path.insert(0, str(HERE.parent))
    from fastbp.bench import machine

    xp, yp = make_data(args.rows)
    limit = args.memory_limit_mb << 20
    group = _cgroup(limit)
    results = []
    try:
        for mode in ("memmap", "in_memory"):
            t0 = time.perf_counter()
            enter = f"echo $$ > {group}/cgroup.procs && exec \"$0\" \"$@\""
            out = subprocess.run(["sh", "-c", enter, sys.executable, __file__, "--child", mode, "--rows",
                                  str(args.rows), "--epochs", "2"], capture_output=True, text=True)
            run = {"mode": mode, "returncode": out.returncode, "wall_s": time.perf_counter() - t0,
                   "trained": out.returncode == 0}
            if out.returncode == 0:
                run.update(json.loads(out.stdout.strip().splitlines()[-1]))
            elif out.returncode in (-9, 137):
                run["killed"] = "SIGKILL (the cgroup's out-of-memory killer)"
            results.append(run)
            print(f"{mode:10s} in {args.memory_limit_mb} MiB: "
                  + ("trained" if run["trained"] else f"failed ({out.returncode})"), flush=True)
    finally:
        group.rmdir()
    record = {"benchmark": "out_of_core_memory_limit", "memory_limit_mb": args.memory_limit_mb,
              "data_bytes": xp.stat().st_size + yp.stat().st_size, "runs": results,
              "machine": {"cpu": machine.cpu_model(), "cpus": machine.cpu_counts()},
              "load": machine.load_snapshot("after")}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode (alternating)")
    parser.add_argument("--out", default=str(HERE / "results" / "out-of-core-latest.json"))
    parser.add_argument("--memory-limit-mb", type=int, default=0,
                        help="instead: run the memmap and the in-memory fit each in a memory cgroup of this "
                             "size (root; cgroup v1 or v2) and record which one trains")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.epochs)))
        return
    if args.memory_limit_mb:
        limited(args)
        return

    sys.path.insert(0, str(HERE.parent))
    from fastbp.bench import machine

    make_data(args.rows)
    env = dict(os.environ)
    runs = []
    record = {"benchmark": "out_of_core", "workload": {"rows": args.rows, "features": SIZES[0], "sizes": SIZES,
                                                      "dtype": "float32", "batch_size": 256, "shuffle": True,
                                                      "labels": "int16", "page_cache": "warm"},
              "machine": {"cpu": machine.cpu_model(), "cpus": machine.cpu_counts(), "versions": machine.versions()},
              "load_before": machine.load_snapshot("before")}
    for _ in range(args.repeats):
        for mode in ("memmap", "memmap_no_prefetch", "in_memory"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(args.rows),
                                  "--epochs", str(args.epochs)], env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{mode:20s} {run['samples_per_s_median']:12.0f} samples/s  epochs {run['epoch_s']}  "
                  f"RssAnon growth {run['rss_anon_peak_growth_mb']:.0f} MB", flush=True)
    record["runs"] = runs
    record["load_after"] = machine.load_snapshot("after")
    best = {m: max(r["samples_per_s_median"] for r in runs if r["mode"] == m) for m in
            ("memmap", "memmap_no_prefetch", "in_memory")}
    record["summary"] = {
        "best_samples_per_s": best,
        "in_memory_over_memmap": best["in_memory"] / best["memmap"],
        "prefetch_speedup": best["memmap"] / best["memmap_no_prefetch"],
        "memmap_peak_growth_mb": max(r["rss_anon_peak_growth_mb"] for r in runs if r["mode"].startswith("memmap")),
    }
    print(json.dumps(record["summary"], indent=1))
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
