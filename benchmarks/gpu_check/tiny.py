#!/usr/bin/env python3
"""Tiny fits on every step route, both dtypes, SGD and Adam, for compute-sanitizer (make gpu-check).

Odd sizes (ragged GEMM tiles, a k > 32 softmax row, a tail batch) so that any out-of-bounds read or
write of fastbp's kernels shows up under ``compute-sanitizer --tool memcheck``. Prints one line per fit.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np  # noqa: E402

import fastbp as fb  # noqa: E402

X = np.random.default_rng(0).standard_normal((37, 9))
y = np.arange(37) % 33
be = fb.set_backend("cupy")
for route in ("graph-cublas", "graph-raw", "eager"):
    for dtype in ("float32", "float64"):
        for optimizer in ("sgd", "adam"):
            be.step_route = route
            net = fb.MLP([9, 33, 17, 33], activation="tanh", loss="cross_entropy", dtype=dtype, seed=0)
            history = net.fit(X, y, epochs=2, batch_size=8, lr=0.05, optimizer=optimizer, progress=False)
            print(route, dtype, optimizer, be.last_route.get(((9, 33, 17, 33), 8)),
                  [round(v, 6) for v in history], flush=True)
print("tiny ok")
