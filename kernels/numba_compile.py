"""A second process compiling part of a cold entry point while the first compiles the rest.

Numba compiles on one thread, and a cold mini-batch epoch is ~two independent halves: the
forward pass (``batch_forward`` and what it calls) and the backward pass plus the update
(``batch_backward``, ``_apply_update``). The epoch's own compile reaches the backward half only
after the forward one, and every ``cache=True`` dispatcher looks in the disk cache before it
compiles, so a helper process that compiles the backward half into the same cache meanwhile
lets the first process load it instead (both cores work on the first fit). Where the helper is
late, slow or fails, the first process compiles the part itself, as it would have anyway.

    python -m fastbp.kernels.numba_compile batch float32     # what NumbaBackend starts
    python -m fastbp.kernels.numba_compile example_callback float32

The signatures are the ones ``_batch_epoch`` calls with (C-contiguous arrays, int64 codes and
offsets, the model dtype's scalars), so the helper's cache entries are the ones it looks up.
"""

from __future__ import annotations

import os
import subprocess
import sys

# the parts a helper takes for each entry point: (function name, argument kinds)
PARTS = {
    "batch": (
        ("batch_backward", ("i1", "i", "f1", "f1", "f2", "f1", "i1", "i1", "i1", "i2", "f", "f", "f", "f1")),
        ("_apply_update", ("d1", "i1", "i1", "f1", "f1", "f2", "i", "i1")),
    ),
}
# a team's C callback (numba_kernels.pass_callback) is an entry of its own: the first per-example
# fit runs on one thread while a helper compiles it, and takes the team once it is in the cache
CALLBACKS = {"example_callback": "example", "update_callback": "update"}
DISABLE_VAR = "FASTBP_COMPILE_HELPER"  # "0" keeps every compile in the calling process


def start(entry: str, dtype: str):
    """Start a helper compiling ``entry``'s parts for ``dtype`` into the disk cache; the Popen,
    or None where there is no such part, one core, every core already busy (a load average at
    the core count: MPI ranks compiling alike, say) or ``FASTBP_COMPILE_HELPER=0``."""
    cores = _cores()
    if (entry not in PARTS and entry not in CALLBACKS) or os.environ.get(DISABLE_VAR, "1") == "0" or cores < 2 or _load() >= cores:
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", "fastbp.kernels.numba_compile", entry, dtype],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:  # no interpreter to start: the first process compiles everything itself
        return None


def compile_parts(entry: str, dtype: str) -> list[str]:
    """Compile (and cache) ``entry``'s parts for ``dtype`` in this process; their names."""
    from numba import types

    from . import numba_kernels as K

    if entry in CALLBACKS:
        K.pass_callback(dtype, CALLBACKS[entry])
        return [entry]
    f = types.float32 if dtype == "float32" else types.float64
    kinds = {"i": types.int64, "f": f, "d1": types.float64[::1], "i1": types.int64[::1], "i2": types.int64[:, ::1],
             "f1": f[::1], "f2": f[:, ::1]}
    done = []
    for name, arg_kinds in PARTS[entry]:
        getattr(K, name).compile(tuple(kinds[k] for k in arg_kinds))
        done.append(name)
    return done


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average here
        return 0.0


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


if __name__ == "__main__":
    compile_parts(sys.argv[1], sys.argv[2])
