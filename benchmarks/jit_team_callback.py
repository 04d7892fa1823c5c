"""What the per-example team's compiled callback adds to a cold first fit: process start to the
end of a first per-example fit (784-128-10 relu, momentum, 2 threads, float32), each in a fresh
process with an empty Numba cache, in three settings alternated round by round:

* ``helper``: as shipped; a cold callback compiles in a helper process while the fit goes on
  alone (``NumbaBackend.ready_team``),
* ``in_process``: ``FASTBP_COMPILE_HELPER=0``, so the callback compiles in the fitting process,
* ``no_team``: ``FASTBP_TEAM_PASSES=0``, no callback at all.

    python benchmarks/jit_team_callback.py [--rounds 2] [--out FILE]

Where no libgomp pool serves the per-example rows (``fastbp info``: ``update_passes``) the three
settings compile the same code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastbp as fb  # noqa: E402
from fastbp.bench import machine  # noqa: E402

SETTINGS = {"helper": {}, "in_process": {"FASTBP_COMPILE_HELPER": "0"}, "no_team": {"FASTBP_TEAM_PASSES": "0"}}
FIT = """
import time
t0 = time.perf_counter()
import numpy as np, fastbp as fb
X = np.random.default_rng(0).random((64, 784)).astype(np.float32); y = np.arange(64) % 10
with fb.use_backend("numba"):
    fb.MLP([784, 128, 10], activation="relu", loss="cross_entropy", dtype="float32", seed=0).fit(
        X, y, epochs=1, batch_size=1, progress=False, optimizer=fb.optim.SGD(lr=0.01, momentum=0.9), threads=2)
print(time.perf_counter() - t0)
"""


def first_fit_s(env_extra: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="fastbp-jit-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, **env_extra)
        out = subprocess.run([sys.executable, "-c", FIT], env=env, check=True, capture_output=True, text=True,
                             timeout=600)
        return float(out.stdout.split()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    runs = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
            runs[name].append(round(first_fit_s(SETTINGS[name]), 2))
            print(f"round {r + 1} {name}: {runs[name][-1]} s", flush=True)
    rec = {"schema": "fastbp-jit-team-callback/1", "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "what": "process start to the end of a first per-example fit, empty Numba cache, per setting (s)",
           "command": "python benchmarks/jit_team_callback.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "source": machine.source_state(str(ROOT)), "machine": machine.describe(),
           "update_passes": fb.backend._create("numba").team_description(), "settings": SETTINGS,
           "first_fit_s": runs, "median_s": {k: sorted(v)[len(v) // 2] for k, v in runs.items()}}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"jit-team-callback-{started:%Y%m%dT%H%M%SZ}.json")
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
