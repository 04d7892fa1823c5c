"""Numba backend: JIT-compiled CPU kernels, a compiled per-example loop and compiled epochs.

The kernels themselves live in ``kernels/numba_kernels.py`` (all ``@njit(cache=True)``);
this module is the :class:`~fastbp.kernels.base.Backend` that drives them and decides, by
size, which path runs. ``import fastbp`` never imports numba: only ``create()`` here does,
when the backend is first asked for.

What runs where
---------------
* GEMMs go to one BLAS library, SciPy's OpenBLAS or MKL (``FASTBP_BLAS``, chosen in
  ``kernels/blas.py``): ``matmul`` and the compiled epochs call ``numba_kernels.gemm`` (alpha
  and beta inside the GEMM, ``out`` written in place). One library on purpose: NumPy ships
  its own OpenBLAS, and alternating GEMMs between the two ran 2-100x slower on the 2-core
  reference machine (each pool's idle workers spin while the other pool computes).
* Elementwise work is compiled and fused: ``hidden_delta`` is the GEMM then one pass
  applying phi'; ``output_delta`` is loss, ``dc/da`` and phi' in one pass per row; bias
  reduction and the update rule over the flat parameter buffer are one vectorized pass each.
  Inside compiled epochs the bias and hidden activation follow each forward GEMM in one pass,
  and the output layer's activation, cost and delta share their exps. tanh's forward is
  the one exception: NumPy's SIMD ``np.tanh`` is ~70x faster than the scalar libm call a
  Numba loop makes (no SVML here), so the batch kernel uses it.
* ``loop_gradients`` (``has_compiled_loop``): the textbook per-example loop, one call.
* ``train_epoch`` (``has_compiled_epoch``): a whole epoch in one call, for batch size 1
  (always; the update is applied where each gradient is formed; a network with one hidden
  layer and at most ``SMALL_NET_MAX_PARAMS`` parameters runs the whole example in one loop,
  compiled for its own sizes and vectorized by SLP (``_small_kernel``, ``_SLPCompiled``):
  2-8-1 relu SGD at ~49 ns an example, ~67 without SLP, ~420 layer by layer), the "loop"
  strategy (always)
  and mini-batches whose
  ``batch_size * n_params`` is at most ``EPOCH_MAX_WORK``. Above that the model's per-batch
  path runs: its BLAS GEMMs take milliseconds and the Python between them is noise. Inside
  compiled code, products below ``FORWARD_BLAS_MIN`` / ``BACKWARD_BLAS_MIN`` multiply-adds
  are hand loops (a BLAS call costs more than the arithmetic there); larger ones call BLAS,
  and so does a first layer held transposed (``FIRST_TRANSPOSED_MAX``) whatever its rows.
  Plain SGD is fused into the weight-gradient GEMM (``W += -lr D^T A``, BLAS beta = 1,
  through ``numba_kernels.gemm``): no gradient buffer written, no update pass after it; so is
  momentum without weight decay, l2 or Nesterov (``M = mom M + D^T A``, beta = mom, then
  ``W -= lr M``).
  The epochs read the rows in the fit's shuffled order in place (``order``): per example
  straight from ``X``, per batch gathered into a buffer that stays in cache, so no shuffled
  copy of the data set is made each epoch.
* The compiled epochs and the update run with denormals flushed to zero (x86 FTZ/DAZ, set on
  entry and restored on exit): moments of weights whose gradient stays zero sink into the
  denormal range and stay there, and each operation on one is a microcode assist (784-128-10
  per example with Adam: 37 us an example against 22 flushed). Only values below the
  dtype's smallest normal number are affected.

Threads
-------
No Numba kernel is ``parallel=True``: the cores belong to BLAS, and every compiled kernel runs
on the calling thread, so Numba's thread pool never starts. Measured on the 2-core reference
machine, 1024-2048-2048-10, batch 512: elementwise passes made ``parallel=True`` between the
GEMMs slowed a step from 74 ms to 117 ms with Numba's default (OpenMP) threading layer --
libgomp's and OpenBLAS's idle workers spin, each pool stealing the cores the other is
computing on -- and gained nothing with the workqueue layer (74 ms); the per-example loop and
the small-network epochs are far too fine-grained for a parallel region (~2-3 us to start one).

How many BLAS threads is decided per call (``_ThreadPolicy``): as many as the cores that
other processes leave free, measured from ``/proc/stat``, because an OpenBLAS worker waiting
for a core another process holds stalls every GEMM (784-256-10 at batch 64 fell from ~140k to
3-10k samples/s on two threads beside other busy processes; one thread kept ~95k). The
choice stays under any limit set from outside (threadpoolctl, ``OPENBLAS_NUM_THREADS``),
``set_threads(n)`` fixes it, and a compiled mini-batch epoch whose largest GEMM is below
``SMALL_GEMM_MAX`` multiply-adds runs one thread (handing short GEMMs to a second thread
measured slower than doing them alone). The count is set for each call and restored after.
``info()["blas_threads_policy"]`` says what was chosen and why.

JIT cost
--------
Every kernel is compiled on first use per dtype and cached on disk (``cache=True``, in
``kernels/__pycache__`` or Numba's user cache dir when that is read-only), so a second
process loads machine code instead of compiling; a fit compiles only the entry point its
path runs (plus the shuffle and check kernels). When the disk cache does not hold an entry
point, its first call prints one line to stderr saying what is compiling and about how long
(``_compiling``). A small network's own kernel is a generated module of a few lines (its
sizes and codes as constants, the loop inlined from ``numba_kernels.shallow_body``), written
once beside Numba's cache and compiled and cached like the rest. ``warmup(dtype)`` compiles
(or loads) everything up front and returns the seconds it took, so benchmarks report JIT
time separately from steady-state speed. Measured
cold on the 2-core reference machine (one other busy process): a per-example fit ~8-10 s, a
mini-batch fit ~10-12 s, everything for one dtype (warmup) ~23-30 s; with the cache, a new
process goes from start to its first fit in ~0.2-0.3 s. Numba's front end is ~60% of a cold
compile (NUMBA_OPT=0 still took ~18 of ~28 s), so what shortens it is fewer
specialisations: call sites pass one argument type per parameter (see numba_kernels.py) --
and a second core: a cold mini-batch epoch starts a helper process that compiles its backward
half and the update into the disk cache while this process compiles the forward half, and
loads them from there when it gets to them (``numba_compile.py``; ``FASTBP_COMPILE_HELPER=0``
turns it off).
Editing ``numba_kernels.py`` invalidates its cache.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict

import numpy as np

from fastbp.errors import BackendUnavailableError

from . import numba_compile
from .base import ACT_CODE, LOSS_CODE, Backend, NetSpec, OptimizerState, UpdateRule

try:  # only this backend's modules import numba
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
else:
    from . import blas as _blas
    from . import numba_kernels as _K
    from . import numba_random as _R


_MAX_WORKSPACES = 16  # (network, batch size) layouts kept warm


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _row_major_operand(m: np.ndarray, transposed: bool):
    """``op(m)`` as (C-contiguous array, trans flag) for ``numba_kernels.gemm``, or None
    where neither ``m`` nor ``m.T`` is C-contiguous."""
    if m.flags.c_contiguous:
        return m, transposed
    if m.T.flags.c_contiguous:
        return m.T, not transposed
    return None


_GEMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _product_shape(a_shape, trans_a, b_shape, trans_b):
    """Shape of ``op(a) @ op(b)``, or None where the inner dimensions differ."""
    m, k = (a_shape[1], a_shape[0]) if trans_a else a_shape
    k2, n = (b_shape[1], b_shape[0]) if trans_b else b_shape
    return (m, n) if k == k2 else None


class _ThreadPolicy:
    """How many threads the BLAS library (every GEMM of this backend) runs, decided per call.

    ``fixed`` (``set_threads(n)``) or automatic: as many threads as there are cores the other
    processes leave free, measured from ``/proc/stat`` over the time since the last decision
    (at least ``WINDOW_S``; the first decision reads the instantaneous run queue of
    ``/proc/loadavg``), so an OpenBLAS worker never spins waiting for a core another process
    holds. Measured on the 2-core reference machine with one other CPU-bound process:
    784-256-10 at batch 64 ran 3-10k samples/s on two BLAS threads against ~95k on one (and
    141k on two when the machine was quiet). A thread count set from outside -- threadpoolctl's
    ``threadpool_limits`` around a fit, ``OPENBLAS_NUM_THREADS``, or ``MKL_NUM_THREADS`` /
    ``OMP_NUM_THREADS`` for MKL -- is a ceiling the automatic choice stays under.
    """

    WINDOW_S = 0.2
    FREE_SLACK = 0.3  # a core counts as free when other processes use less than 0.7 of it

    def __init__(self, blas, cores: int) -> None:
        self.blas = blas
        self.cores = cores
        self.fixed: int | None = None
        self.ceiling = blas.get_num_threads() if blas is not None else 1  # OPENBLAS_NUM_THREADS or all cores
        self.chosen: int | None = None
        self.others: float | None = None
        self.reason = "no GEMM has run yet"
        self._sample = None  # (wall, busy seconds of all CPUs, this process's CPU seconds)
        self._decided_at = -1.0

    def decide(self, now: float | None = None) -> int:
        """Threads for the GEMMs about to run (re-decided at most every ``WINDOW_S``)."""
        if self.blas is None:
            return 1
        # Between our calls the BLAS holds what its owner set (we restore after each call):
        # OpenBLAS's default (all cores), OPENBLAS_NUM_THREADS, or a threadpool_limits around us.
        self.ceiling = self.blas.get_num_threads()
        cap = _blas.child_thread_cap()
        if cap is not None:  # a forked child of an MKL/libgomp parent
            self.chosen, self.reason = cap, "forked child: MKL's OpenMP pool does not survive fork(), so 1 thread"
            return cap
        if self.fixed is not None:
            self.chosen, self.reason = self.fixed, f"fixed by set_threads({self.fixed})"
            return self.fixed
        now = time.perf_counter() if now is None else now
        if self.chosen is not None and now - self._decided_at < self.WINDOW_S:
            return min(self.chosen, self.ceiling)
        others, how = self._others_busy(now)
        self._decided_at = now
        self.others = others
        free = self.cores - others if others is not None else self.cores
        threads = max(1, min(self.ceiling, int(free + self.FREE_SLACK)))
        if others is None:
            self.reason = f"auto: CPU use unreadable here ({how}); all {threads} allowed threads"
        else:
            self.reason = (f"auto: other processes kept {others:.2f} of {self.cores} cores busy ({how}), "
                           f"so {threads} BLAS thread{'s' if threads > 1 else ''}"
                           + (f" (limit {self.ceiling} set outside fastbp)" if self.ceiling < self.cores else "")
                           + ("; more would wait for a taken core" if threads < min(self.cores, self.ceiling) else ""))
        self.chosen = threads
        return threads

    def run_with(self, threads: int):
        """Set ``threads`` on the BLAS; returns what to restore afterwards (None: nothing changed)."""
        if self.blas is None:
            return None
        current = self.blas.get_num_threads()
        if current == threads:
            return None
        self.blas.set_num_threads(threads)
        return current

    def restore(self, previous) -> None:
        if previous is not None:
            self.blas.set_num_threads(previous)

    def _others_busy(self, now: float):
        """CPU cores' worth of work by other processes since the last sample, and how it was read."""
        sample = _cpu_sample(now)
        last, self._sample = self._sample, sample
        if sample is None:
            return None, "no /proc/stat"
        if last is not None and now - last[0] >= self.WINDOW_S:
            wall = now - last[0]
            other = (sample[1] - last[1]) - (sample[2] - last[2])
            return max(0.0, other / wall), f"/proc/stat over the last {wall:.2f} s"
        try:  # no window yet: the run queue now, less this thread
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
            return float(min(self.cores, max(0, running - 1))), "/proc/loadavg run queue"
        except (OSError, ValueError, IndexError):
            return None, "no /proc/loadavg"

    def describe(self) -> dict:
        return {"mode": "fixed" if self.fixed is not None else "auto", "threads": self.chosen,
                "reason": self.reason, "other_processes_cores": self.others, "cores": self.cores,
                "ceiling": self.ceiling}


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_sample(now: float):
    """(wall, seconds all CPUs spent busy, seconds this process used) or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (sum(ticks) - ticks[3] - ticks[4]) / _CLK_TCK
    t = os.times()
    return now, busy, t.user + t.system


class NumbaBackend(Backend):
    """JIT-compiled kernels (see the module docstring for what runs where and why)."""

    name = "numba"
    xp = np
    has_compiled_loop = True
    has_compiled_epoch = True

    # Size thresholds, measured on the 2-core reference machine (AMD EPYC, OpenBLAS 0.3.30):
    # products inside a compiled mini-batch epoch, in multiply-adds, below which a hand loop
    # beats a BLAS call (OpenBLAS's small-matrix path wins from a few thousand on) ...
    FORWARD_BLAS_MIN = 1 << 12
    BACKWARD_BLAS_MIN = 1 << 8
    # ... except for batches of at most HAND_MAX_ROWS rows, where OpenBLAS's small-m GEMMs run
    # at a fraction of its peak (4x784 @ 784x128: 16.5 us, 48 GFLOP/s) and hand loops win
    # whatever the width: 784-128-10 batch 2 / 4 / 6: 37k / 73k / 87k samples/s with BLAS,
    # 81k / 101k / 119k with hand loops; batch 8 is a tie and from 12 rows on BLAS wins.
    HAND_MAX_ROWS = 6
    # ... and a first layer whose batch product is under FIRST_TRANSPOSED_MAX multiply-adds is
    # held transposed for the epoch (numba_kernels.FIRST_TRANSPOSED): OpenBLAS's small-matrix
    # kernel for ``X @ W.T`` runs at about half the rate of its ``X @ Wt``, and the first
    # layer forms no input delta, the one product the transposed layout slows (its forward +
    # weight gradient on one BLAS thread, as the epoch runs products this small, at
    # 0.75-0.86x the time from 16x64x64 to 32x128x128, 1.00x at 1M multiply-adds; on two
    # 0.73-1.02x; 64-64-10 batch 32 fits 0.86-0.88x the time per step:
    # benchmarks/results/batch-step-ab-20261208T021208Z.json).
    FIRST_TRANSPOSED_MAX = 1 << 20
    # ... and batch_size * n_params above which the model's per-batch path runs instead of a
    # compiled epoch: the compiled epoch saved 18 us per batch on 64-64-10 (14 vs 33 us) but
    # was within noise of the per-batch path from ~1e8 on (784-512-512-10 batch 128: 1.9 ms
    # both), where a batch's GEMMs take milliseconds and the Python per batch is < 1%; past
    # that the second copy of the activations a compiled epoch keeps is not worth its memory.
    EPOCH_MAX_WORK = 1 << 27
    # A compiled mini-batch epoch whose largest product is below this many multiply-adds runs
    # its GEMMs on one BLAS thread: measured 4-50% faster there than two threads (64-64-10 at
    # batch 200: 65 vs 84 us per batch; 784-128-10 at batch 16: 94 vs 142 us), because
    # handing each short GEMM to the second thread costs more than it saves; from ~1e7 on
    # (784-256-10 at batch 64: 449 vs 508 us) both cores win.
    SMALL_GEMM_MAX = 1 << 23
    # One-hidden-layer nets with at most this many parameters train per example in a kernel
    # compiled for their exact sizes (``_small_kernel``): there the loop overhead is the step.
    SMALL_NET_MAX_PARAMS = 1024
    # A helper compiling a team's callback (ready_team) still running after this many seconds
    # is killed, and the callback compiles in this process instead.
    HELPER_DEADLINE_S = 120.0
    # Update passes (the optimizer step over a layer's weights) run on the GEMMs' threads where
    # MKL's pool is libgomp's (kernels/numba_kernels.py, "update passes on the BLAS threads");
    # per example a wide first layer's rows run on a team too, libgomp's own pool where the
    # BLAS is not MKL on libgomp (a per-example epoch calls no BLAS, so the two pools never
    # want the cores at once). FASTBP_TEAM_PASSES=0 keeps both on the calling thread (same
    # results, bit for bit).
    TEAM_PASSES = os.environ.get("FASTBP_TEAM_PASSES", "1").strip() != "0"
    OWN_POOL_KINDS = ("example",)  # the callbacks libgomp's own pool runs beside another BLAS

    def _pool(self, kind) -> tuple[int, int, int]:
        """The libgomp addresses (``TEAM_PARALLEL`` .. ``TEAM_NUM_THREADS``) a team for ``kind``
        uses: MKL's pool, libgomp's own for ``OWN_POOL_KINDS``, else zeros (no team)."""
        lib = self.blas_library
        mkl = (lib.omp_parallel, lib.omp_thread_num, lib.omp_num_threads)
        if all(mkl):
            return mkl
        return _blas.own_libgomp() if kind in self.OWN_POOL_KINDS else (0, 0, 0)

    def team_description(self) -> str:
        lib = self.blas_library
        if not self.TEAM_PASSES:
            return "on the calling thread (FASTBP_TEAM_PASSES=0)"
        if _blas.child_thread_cap() is not None:
            return "on the calling thread: a process forked after MKL's OpenMP pool started"
        parts = f"in parts of at least {self._k.PART_MIN} parameters"
        if all(self._pool("update")):
            return ("on the BLAS threads, through libgomp's GOMP_parallel (MKL's own pool): update passes, and per "
                    f"example a first layer's rows, {parts}")
        if all(self._pool("example")):
            return (f"update passes on the calling thread (the BLAS is {lib.name}, {lib.threading}, not MKL on "
                    f"libgomp); per example a first layer's rows on libgomp's own pool, {parts}")
        return (f"on the calling thread: the BLAS is {lib.name} ({lib.threading}), not MKL on libgomp, "
                "and libgomp's own pool is not usable here (not loadable, or a process forked after it was "
                "asked for)")

    def ready_team(self, threads: int, dtype, kind, span: int) -> np.ndarray:
        """``team`` for a pass of at most ``span`` parameters, but where its callback is not
        compiled yet a helper process compiles it into the disk cache while this one goes on
        alone (one thread) until the helper is done, or ``HELPER_DEADLINE_S`` has passed: the
        first per-example fit does not wait ~6 s for it (numba_compile.CALLBACKS). Alone, with
        nothing compiled, where ``span`` is too short for two parts."""
        alone = self._k.alone()
        if span < 2 * self._k.PART_MIN or not self._teams_possible(threads, kind):
            return alone
        key = (np.dtype(dtype).name, kind)
        helper = self._callback_helpers.get(key)
        if helper is None:
            if self._k.callback_loaded(dtype, kind) or self._k.callback_cached(dtype, kind) is not False:
                return self.team(threads, dtype, kind)
            helper = numba_compile.start(f"{kind}_callback", key[0])
            if helper is None:  # no helper here (one core, a busy machine, FASTBP_COMPILE_HELPER=0)
                return self.team(threads, dtype, kind)
            self._callback_helpers[key] = helper, time.perf_counter()
            return alone
        helper, started = helper
        running = helper.poll() is None
        if running and time.perf_counter() - started < self.HELPER_DEADLINE_S:
            return alone
        if self._callback_helpers.pop(key, None) is not None and running:  # pop: fits on other threads race here
            helper.kill()  # late: this process compiles it (team, below) rather than wait on
            helper.wait()
        return self.team(threads, dtype, kind)

    def team(self, threads: int, dtype, kind="update") -> np.ndarray:
        """The team for ``threads`` threads (``numba_kernels`` TEAM_*) running ``kind``'s callback
        (``pass_callback``): one thread where no libgomp pool serves ``kind`` (``_pool``), in a
        forked child (libgomp's pool does not survive the fork), or where ``TEAM_PASSES`` is off."""
        if not self._teams_possible(threads, kind):
            return self._k.alone()
        return np.array([threads, *self._pool(kind), self._k.pass_callback(dtype, kind)], np.int64)

    def _teams_possible(self, threads: int, kind) -> bool:
        return (threads > 1 and self.TEAM_PASSES and _blas.child_thread_cap() is None
                and all(self._pool(kind)))

    def __init__(self) -> None:
        from .numpy import NumpyBackend

        self._k = _K
        self.blas_library = _blas.active()  # which BLAS the GEMMs call (FASTBP_BLAS); raises if unusable
        self._ref = NumpyBackend()  # for shapes/layouts the compiled kernels do not take
        self._specs: dict = {}  # NetSpec -> (sizes array, hidden code, output code, loss code)
        self._work: OrderedDict = OrderedDict()  # (NetSpec, rows, dtype) -> flat workspace, LRU
        self._blas = _blas_controller(self.blas_library)  # threadpoolctl's handle on that library
        self._threads = _ThreadPolicy(self._blas, _usable_cores())
        self._seen: set = set()  # (entry, dtype) this process has already called
        self._small: dict = {}  # (sizes, hidden, output, loss) -> generated kernel or None
        self._quiet = False  # warmup announces itself once instead of entry by entry
        self._helper = None  # a numba_compile process working on the entry being compiled
        self._callback_helpers: dict = {}  # (dtype name, kind) -> numba_compile process compiling that callback

    def _compiling(self, name: str, args, dtype, disp=None):
        """Before a compiled entry's first call in this process: when the disk cache does not
        hold it (Numba will compile it now), one line to stderr saying what and roughly how
        long. Returns a timer to cancel after the call where the cache could not be read."""
        self._seen.add((name, dtype.char))
        what, seconds = _ENTRY.get(name, _BASIC)
        disp = getattr(_K, name, None) if disp is None else disp
        cached = _cached_on_disk(disp, args) if name in _HELPED else None  # read once, used twice
        if cached is False:  # cold: a second process compiles part of it meanwhile (numba_compile.py)
            self._helper = numba_compile.start(_HELPED[name], dtype.name)
        if self._quiet or ("basic", dtype.char) in self._seen and name not in _ENTRY:
            return None  # warmup says it once; the layer kernels get one line per dtype
        if name not in _HELPED:
            cached = _cached_on_disk(disp, args) if disp is not None else True
        if cached:
            return None
        if name not in _ENTRY:
            self._seen.add(("basic", dtype.char))
        line = (f"fastbp: compiling Numba code for {what} ({dtype.name}) on first use: about {seconds} s, once; "
                f"later runs load it from the disk cache in {_cache_dir(disp)}")
        if cached is False:
            _say(line)
            return None
        timer = threading.Timer(ANNOUNCE_AFTER_S, _say, (line.replace("compiling", "probably compiling", 1),))
        timer.daemon = True
        timer.start()
        return timer

    def _run(self, name: str, dtype, *args, fn=None):
        """``self._k.<name>(*args)`` (or ``fn(*args)``), announcing a cold compile on its first
        call in this process (``_compiling``)."""
        key = name if fn is None else f"{name}:{id(fn)}"
        timer = self._compiling(name, args, dtype, fn) if (key, dtype.char) not in self._seen else None
        self._seen.add((key, dtype.char))
        try:
            return (getattr(self._k, name) if fn is None else fn)(*args)
        finally:
            if timer is not None:
                timer.cancel()
            if self._helper is not None:  # compiled now: what the helper has not finished is of no use
                helper, self._helper = self._helper, None
                if helper.poll() is None:
                    helper.kill()
                helper.wait()

    def _is_small(self, spec: NetSpec) -> bool:
        return spec.n_layers == 2 and spec.n_params <= self.SMALL_NET_MAX_PARAMS

    def _small_kernel(self, spec: NetSpec):
        """``shallow_epoch_drawing`` compiled for this one network's sizes and codes
        (compile-time constants, which LLVM unrolls loops over; see _hidden_count), for nets of
        at most ``SMALL_NET_MAX_PARAMS`` parameters; None where the generated module cannot be
        made. One kernel whether or not an epoch draws the next order (each is a cold compile)."""
        if not self._is_small(spec):
            return None
        key = (spec.sizes, spec.hidden, spec.output, spec.loss)
        if key not in self._small:
            self._small[key] = _load_small_kernel(spec.sizes, *self._spec(spec)[1:])
        module = self._small[key]
        if module is None:
            return None
        if not hasattr(module, "epoch_slp"):
            module.epoch_slp = _SLPCompiled(module.epoch)
        return module.epoch_slp

    def set_threads(self, n: int | None):
        """BLAS threads for this backend's GEMMs: ``n`` >= 1 fixed, or None for the automatic
        choice (as many as the cores other processes leave free, re-decided per call; see
        ``_ThreadPolicy``). Returns the previous setting, so a caller can restore it.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise ValueError(f"set_threads takes an int >= 1 or None. Received: n={n!r}")
        previous, self._threads.fixed = self._threads.fixed, None if n is None else int(n)
        return previous

    # ------------------------------------------------------------ arrays
    def asarray(self, x, dtype=None):
        if type(x).__module__.startswith("cupy"):
            x = x.get()
        return np.ascontiguousarray(x, dtype=dtype)

    def all_finite(self, a) -> bool:
        if isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype.kind == "f":
            return bool(self._run("all_finite", a.dtype, a))
        return bool(np.isfinite(a).all())

    def take_rows(self, src, index, out):
        if (_c(src, out, index) and src.ndim == 2 and index.ndim == 1 and index.dtype.kind == "i"
                and out.shape == (index.size, src.shape[1]) and src.dtype == out.dtype and src.shape[0] > 0):
            self._run("take_rows", out.dtype, src, index, out)
        else:
            self._ref.take_rows(src, index, out)

    def info(self) -> dict:
        from threadpoolctl import threadpool_info

        blas = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer",
                                   "architecture", "filepath")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
        import scipy

        return {
            "name": self.name,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "numba_threads": 1,  # no parallel=True kernel: Numba's own pool never starts
            "update_passes": self.team_description(),
            "blas_threads": self._blas.get_num_threads() if self._blas is not None else None,
            "blas_threads_policy": self._threads.describe(),
            "blas": blas,
            "blas_used": self.blas_library.describe(),
            "thread_policy": ("BLAS threads chosen per call: as many as the cores other processes leave free "
                              "(set_threads(n) fixes them; a threadpoolctl limit is a ceiling); compiled mini-batch "
                              f"epochs whose largest GEMM is < {self.SMALL_GEMM_MAX} multiply-adds run BLAS on one "
                              "thread; the update passes of wide layers (and, per example, a wide first layer's rows) "
                              "run on as many threads as the policy allows, where a libgomp pool serves them (update_passes "
                              "says which)"),
            "cores": _usable_cores(),
            "cpu_name": _host_cpu_name(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "thresholds": {"FORWARD_BLAS_MIN": self.FORWARD_BLAS_MIN, "BACKWARD_BLAS_MIN": self.BACKWARD_BLAS_MIN,
                           "HAND_MAX_ROWS": self.HAND_MAX_ROWS, "FIRST_TRANSPOSED_MAX": self.FIRST_TRANSPOSED_MAX,
                           "EPOCH_MAX_WORK": self.EPOCH_MAX_WORK, "SMALL_GEMM_MAX": self.SMALL_GEMM_MAX},
        }

    # ------------------------------------------------------------ basic kernels
    def matmul(self, a, b, out, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        x = _row_major_operand(a, trans_a) if isinstance(a, np.ndarray) and a.ndim == 2 else None
        y = _row_major_operand(b, trans_b) if isinstance(b, np.ndarray) and b.ndim == 2 else None
        if (x is None or y is None or out.ndim != 2 or out.size == 0 or out.dtype not in _GEMM_DTYPES
                or a.dtype != out.dtype or b.dtype != out.dtype or not out.flags.c_contiguous
                or _product_shape(a.shape, trans_a, b.shape, trans_b) != out.shape
                or (a.shape[0] if trans_a else a.shape[1]) == 0):  # the reference raises on a mismatch
            self._ref.matmul(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
            return
        T = out.dtype.type
        previous = self._threads.run_with(self._threads.decide())
        try:
            self._run("gemm", out.dtype, np.bool_(x[1]), np.bool_(y[1]), T(alpha), x[0], y[0], T(beta), out)
        finally:
            self._threads.restore(previous)

    def hadamard(self, a, b, out):
        if _c(a, b, out) and a.shape == b.shape == out.shape and _same_dtype(a, b, out):
            self._run("hadamard", out.dtype, a, b, out)
        else:
            self._ref.hadamard(a, b, out)

    def outer(self, x, y, out, *, alpha=1.0, accumulate=True):
        if _c(x, y, out) and x.ndim == 1 and y.ndim == 1 and out.shape == (x.size, y.size) \
                and _same_dtype(x, y, out):
            self._run("outer", out.dtype, x, y, out, out.dtype.type(alpha), bool(accumulate))
        else:
            self._ref.outer(x, y, out, alpha=alpha, accumulate=accumulate)

    def add_bias(self, z, b):
        if _c(z, b) and z.ndim in (1, 2) and b.ndim == 1 and z.shape[-1] == b.size and _same_dtype(z, b):
            self._run("add_bias", z.dtype, _rows(z), b)
        else:
            self._ref.add_bias(z, b)

    def bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
        if _c(delta, out) and delta.ndim == 2 and out.ndim == 1 and delta.shape[1] == out.size \
                and _same_dtype(delta, out):
            self._run("bias_grad", out.dtype, delta, out, out.dtype.type(alpha), bool(accumulate))
        else:
            self._ref.bias_grad(delta, out, alpha=alpha, accumulate=accumulate)

    # ---- activations: forward beside derivative
    def activation(self, name, z, out):
        code = _act_code(name)
        if name == "tanh":  # NumPy's SIMD tanh; a compiled loop would call scalar libm
            np.tanh(z, out=out)
            return
        if not (_c(z, out) and z.shape == out.shape and _same_dtype(z, out) and z.ndim in (1, 2)):
            self._ref.activation(name, z, out)
            return
        self._run("activation", z.dtype, code, _rows(z), _rows(out))

    def activation_backward(self, name, z, a, delta):
        code = _act_code(name)
        if not (_c(z, a, delta) and z.shape == a.shape == delta.shape and _same_dtype(z, a, delta)
                and z.ndim in (1, 2)):
            self._ref.activation_backward(name, z, a, delta)
            return
        self._run("activation_backward", z.dtype, code, _rows(z), _rows(a), _rows(delta))

    def hidden_delta(self, name, delta_next, w_next, z, a, out):
        """``out = phi'(z) (.) (delta_next @ w_next)``: one BLAS GEMM and one fused pass, one call."""
        code = _act_code(name)
        if not (_c(delta_next, w_next, z, a, out) and out.ndim == 2 and delta_next.ndim == 2 and w_next.ndim == 2
                and delta_next.shape == (out.shape[0], w_next.shape[0]) and w_next.shape[1] == out.shape[1]
                and z.shape == a.shape == out.shape and _same_dtype(delta_next, w_next, z, a, out)
                and out.dtype in _GEMM_DTYPES and delta_next.shape[1] > 0):
            super().hidden_delta(name, delta_next, w_next, z, a, out)
            return
        previous = self._threads.run_with(self._threads.decide())  # its GEMM is BLAS's too
        try:
            self._run("hidden_delta", out.dtype, code, delta_next, w_next, z, a, out)
        finally:
            self._threads.restore(previous)

    # ---- losses: value beside fused output delta
    def output_delta(self, loss, output, z, a, y, delta):
        codes = _loss_code(loss), _act_code(output)
        if not (_c(z, a, y, delta) and z.shape == a.shape == y.shape == delta.shape
                and _same_dtype(z, a, y, delta) and z.ndim in (1, 2)):
            return self._ref.output_delta(loss, output, z, a, y, delta)
        return float(self._run("output_delta", z.dtype, *codes, _rows(z), _rows(a), _rows(y), _rows(delta)))

    def loss_sum(self, loss, output, z, a, y):
        codes = _loss_code(loss), _act_code(output)
        if not (_c(z, a, y) and z.shape == a.shape == y.shape and _same_dtype(z, a, y) and z.ndim in (1, 2)):
            return self._ref.loss_sum(loss, output, z, a, y)
        return float(self._run("loss_sum", z.dtype, *codes, _rows(z), _rows(a), _rows(y)))

    def update(self, spec, rule, params, grads, state, rows):
        """The rule's step over the flat buffers in one compiled pass (``apply_update``)."""
        self._check_update(spec, rule, params, grads, state)
        self._run("apply_update", params.dtype, rule.hyper(), state.step, self._spec(spec)[0], params, grads,
                  state.buffers, rows, self.ready_team(self._threads.decide(), params.dtype, "update",
                                                       _widest_layer(spec)))

    def _check_update(self, spec, rule, params, grads, state) -> None:
        """Compiled updates index raw memory: mismatched buffers are refused, never written past."""
        buffers = state.buffers
        ok = (_c(params, grads, buffers) and _same_dtype(params, grads, buffers)
              and params.shape == grads.shape == (spec.n_params,) and buffers.ndim == 2
              and buffers.shape[1] == spec.n_params and buffers.shape[0] >= rule.n_buffers
              and isinstance(state.step, np.ndarray) and state.step.dtype == np.int64 and state.step.shape == (1,))
        if not ok:
            raise ValueError(f"update got buffers that do not match {spec} and {rule}. Received: params "
                             f"{params.shape} {params.dtype}, grads {grads.shape} {grads.dtype}, state "
                             f"{buffers.shape} {buffers.dtype}. Expected C-contiguous {spec.dtype} arrays of "
                             f"({spec.n_params},) and state ({rule.n_buffers}, {spec.n_params})")

    # ------------------------------------------------------------ compiled fast paths
    def _spec(self, spec: NetSpec):
        entry = self._specs.get(spec)
        if entry is None:
            entry = self._specs[spec] = (
                np.asarray(spec.sizes, dtype=np.int64),
                _act_code(spec.hidden), _act_code(spec.output), _loss_code(spec.loss),
            )
        return entry

    def _workspace(self, spec: NetSpec, rows: int, dtype) -> np.ndarray:
        """Flat scratch for z, a and delta of every layer, made once per (spec, rows, dtype).

        ``rows == 0`` is the per-example layout (inputs included, ``3 * sum(sizes)``); else
        the batch layout for up to ``rows`` examples (``3 * rows * sum(sizes[1:])``).
        """
        key = (spec, rows, np.dtype(dtype).str)
        work = self._work.get(key)
        if work is None:
            size = 3 * sum(spec.sizes) if rows == 0 else 3 * rows * sum(spec.sizes[1:])
            work = self._work[key] = np.empty(size, dtype=dtype)
            if len(self._work) > _MAX_WORKSPACES:  # bounded: many models or batch sizes over a process
                self._work.popitem(last=False)
        else:
            self._work.move_to_end(key)
        return work

    def _check_fast_path(self, spec: NetSpec, params, grads, X, Y) -> None:
        """Compiled loops index raw memory: a mismatched buffer is refused, never read past."""
        n = X.shape[0] if getattr(X, "ndim", 0) == 2 else -1
        ok = (_c(params, grads, X, Y) and params.dtype == spec.dtype and _same_dtype(params, grads, X, Y)
              and params.shape == grads.shape == (spec.n_params,) and X.shape == (n, spec.sizes[0])
              and Y.shape == (n, spec.sizes[-1]))
        if not ok:
            got = {k: (getattr(v, "shape", None), str(getattr(v, "dtype", type(v).__name__)))
                   for k, v in (("params", params), ("grads", grads), ("X", X), ("Y", Y))}
            raise ValueError(f"compiled fast path got buffers that do not match {spec}. Received: {got}. Expected "
                             f"C-contiguous {spec.dtype} arrays: params/grads ({spec.n_params},), "
                             f"X (n, {spec.sizes[0]}), Y (n, {spec.sizes[-1]})")

    def loop_gradients(self, spec: NetSpec, params, X, Y, grads):
        """The per-example loop in one compiled call: mean gradients into ``grads``.

        Per example: vector forward, output delta, backward, ``dW += delta a^T``, ``db += delta``;
        then the sums are divided by ``n``. Returns the summed cost.
        """
        self._check_fast_path(spec, params, grads, X, Y)
        sizes, hidden, output, loss = self._spec(spec)
        work = self._workspace(spec, 0, params.dtype)
        total, _ = self._run("loop_batch", params.dtype, sizes, hidden, output, loss, params, X, Y, grads, work, 0,
                             X.shape[0])
        return float(total)

    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str, rule=None) -> bool:
        """True where one compiled call per epoch beats the per-batch path (measured by size)."""
        if batch_size is None:
            return False
        if batch_size <= 1 or strategy == "loop":
            return True
        return batch_size * spec.n_params <= self.EPOCH_MAX_WORK

    def draws_next_order(self, spec: NetSpec, batch_size: int, strategy: str) -> bool:
        # the small nets' per-example kernels (numba_random.shuffle_step beside each example)
        return batch_size == 1 and self._is_small(spec)

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, rule, state, strategy, order=None,
                    next_order=None):
        """One epoch over ``X, Y`` in one compiled call, each batch's gradient applied by
        ``rule`` (fused into the per-example pass at batch size 1). ``order``: the rows in the
        order to visit them (a permutation), read in place rather than copied shuffled first.

        Returns ``(loss_sum, n_done, n_correct)``; stops before the update of the first batch
        whose cost is not finite, so ``n_done < n`` says where (a small net's per-example
        kernel checks the logits and the output deltas instead, and the cost only for mse:
        the same but for softmax logits farther apart than the float range, whose infinite
        cost shows in ``loss_sum`` after finite updates).
        """
        self._check_fast_path(spec, params, grads, X, Y)
        self._check_update(spec, rule, params, grads, state)
        order = _visit_order(order, X.shape[0])
        if next_order is not None:
            _check_next_order(next_order, X.shape[0], self.draws_next_order(spec, batch_size, strategy))
        if not (X.flags.writeable and Y.flags.writeable):  # kernels are typed for writable arrays (a read-only
            X, Y = (X[order], Y[order]) if order.size else (X.copy(), Y.copy())  # one: another compile), so copy
            order = _IN_ORDER
        sizes, hidden, output, loss = self._spec(spec)
        n = X.shape[0]
        batch_size = max(1, min(int(batch_size), n))
        hp, step, buffers, dt = rule.hyper(), state.step, state.buffers, params.dtype
        if batch_size == 1:
            work = self._workspace(spec, 0, dt)
            # a small one-hidden-layer net: its own kernel (shallow_epoch_drawing where none can be made);
            # anything wider runs layer by layer, which measured faster there (784-128-10 SGD:
            # 5.8 against 7.0 us an example; Adam 24.6 against 26.8)
            small = self._small_kernel(spec)
            args = (sizes, hidden, output, loss, params, X, Y, order, hp, step, buffers, work)
            if self._is_small(spec):
                args += _NO_DRAW if next_order is None else tuple(next_order)
                total, done, correct = self._run("small_epoch" if small else "shallow_epoch", dt, *args,
                                                 fn=small or self._k.shallow_epoch_drawing)
            else:
                span = 0 if spec.n_layers < 2 or spec.activation(0) == "softmax" else spec.sizes[0] * spec.sizes[1]
                team = self.ready_team(self._threads.decide(), dt, "example", span)
                if team[0] > 1:
                    team = self._k.example_team(team, sizes, hidden, params, buffers, X, hp, work)
                total, done, correct = self._run("examples_epoch", dt, *args, team)
        elif strategy == "loop":
            work = self._workspace(spec, 0, dt)
            total, done, correct = self._run("loop_epoch", dt, sizes, hidden, output, loss, params, grads, X, Y,
                                             order, batch_size, hp, step, buffers, work)
        else:
            work = self._workspace(spec, batch_size, dt)
            if batch_size <= self.HAND_MAX_ROWS:  # a few rows: every product a hand loop
                mins, transposed = (np.iinfo(np.int64).max, np.iinfo(np.int64).max), False
            else:
                first = batch_size * spec.sizes[0] * spec.sizes[1]
                mins = (self.FORWARD_BLAS_MIN, self.BACKWARD_BLAS_MIN)
                transposed = self.FORWARD_BLAS_MIN <= first < self.FIRST_TRANSPOSED_MAX
            widest = _widest_layer(spec)
            threads = self._threads.decide()
            if batch_size * widest < self.SMALL_GEMM_MAX and self._threads.fixed is None:
                threads = 1  # short GEMMs: a second thread costs more than it saves
            plan = self._k.batch_plan(*mins, transposed, self.ready_team(threads, dt, "update", widest))
            previous = self._threads.run_with(threads)
            try:
                total, done, correct = self._run("batch_epoch", dt, sizes, hidden, output, loss, params, grads, X,
                                                 Y, order, batch_size, hp, step, buffers, work, plan)
            finally:
                self._threads.restore(previous)
        return float(total), int(done), int(correct)

    # ------------------------------------------------------------ JIT
    def warmup(self, dtype="float32") -> float:
        """Compile (or load from the disk cache) every kernel for ``dtype``; returns the seconds spent.

        Says so in one line on stderr when it is compiling (still running after
        ``ANNOUNCE_AFTER_S``; loading from the cache takes well under that)."""
        dt = np.dtype(dtype)
        t0 = time.perf_counter()
        timer = threading.Timer(ANNOUNCE_AFTER_S, _say, (
            f"fastbp: compiling every Numba kernel for {dt.name} (warmup): about {WARMUP_S} s, once; "
            "later runs load them from the disk cache",))
        timer.daemon = True
        timer.start()
        self._quiet = True
        try:
            self._warm(dt)
        finally:
            self._quiet = False
            timer.cancel()
        return time.perf_counter() - t0

    def _warm(self, dt) -> None:
        rng = np.random.default_rng(0)
        n = 4
        X = rng.standard_normal((n, 3)).astype(dt)
        Y = np.zeros((n, 2), dt)
        Y[:, 0] = 1
        # per example: examples_epoch (two hidden layers); a small one-hidden-layer net's own
        # kernel (or shallow_epoch_drawing, where none can be made) compiles when first used
        for sizes, loss, output in (((3, 4, 5, 2), "cross_entropy", "softmax"), ((3, 4, 5, 2), "mse", "identity")):
            spec = NetSpec(sizes, "relu", output, loss, dt)
            params = (rng.standard_normal(spec.n_params) * 0.1).astype(dt)
            grads = np.empty_like(params)
            self.loop_gradients(spec, params, X, Y, grads)
            for rule in (UpdateRule("sgd", lr=0.01), UpdateRule("adam", lr=0.01)):
                state = OptimizerState(np.zeros((rule.n_buffers, spec.n_params), dt))
                for bs, strategy in ((1, "vectorized"), (2, "loop"), (2, "vectorized")):
                    self.train_epoch(spec, params, grads, X, Y, bs, rule, state, strategy)
                self.update(spec, rule, params, grads, state, n)
        for kind in ("update", "example"):  # the teams' callbacks (layers this small never start a team)
            if self.team(2, dt, kind)[0] > 1:
                self._k.pass_callback(dt, kind)
        small = np.ones((2, 3), dt)
        W = rng.standard_normal((3, 3)).astype(dt)
        for name in ("relu", "softmax"):
            self.activation(name, small, np.empty_like(small))
            self.activation_backward(name, small, small, small.copy())
        self.hidden_delta("relu", small, W, small, small, np.empty_like(small))
        self.output_delta("cross_entropy", "softmax", small, small, small, np.empty_like(small))
        self.loss_sum("cross_entropy", "softmax", small, small, small)
        self.add_bias(small, W[0])
        self.bias_grad(small, np.empty(3, dt))
        self.hadamard(small, small, np.empty_like(small))
        self.outer(W[0], W[1], np.empty_like(W))
        self.matmul(small, W, np.empty_like(small))
        self.all_finite(small)
        self.take_rows(small, np.array([1, 0]), np.empty_like(small))


# ---------------------------------------------------------------- helpers


_IN_ORDER = np.empty(0, np.int64)  # the compiled epochs' "no order given": rows as they are
_NO_DRAW = (np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.uint64))  # the small kernels' "draw none"


def _visit_order(order, n: int) -> np.ndarray:
    """``order`` as the compiled epochs take it (int64, C-contiguous); every entry must be a
    row of ``X``, since the kernels index without bounds checks."""
    if order is None:
        return _IN_ORDER
    order = np.ascontiguousarray(order)
    if order.ndim != 1 or order.dtype.kind not in "iu" or order.size != n or (n and (order.min() < 0
                                                                                     or order.max() >= n)):
        raise ValueError(f"order must list the {n} rows to visit (integers in [0, {n})). Received: "
                         f"shape {order.shape}, dtype {order.dtype}")
    return order.astype(np.int64, copy=False)


def _check_next_order(next_order, n: int, drawable: bool) -> None:
    """``train_epoch``'s ``next_order``: ``(out, state_in, state_out)``, int64 (n,) and two
    uint64 (5,), C-contiguous and writable (the kernel writes them without bounds checks)."""
    ok = drawable and isinstance(next_order, tuple) and len(next_order) == 3
    if ok:
        out, state_in, state_out = next_order
        ok = (_c(out, state_in, state_out) and out.dtype == np.int64 and out.shape == (n,)
              and state_in.dtype == state_out.dtype == np.uint64 and state_in.shape == state_out.shape == (5,)
              and out.flags.writeable and state_out.flags.writeable and state_out is not state_in)
    if not ok:
        shapes = [(getattr(a, "shape", None), str(getattr(a, "dtype", type(a).__name__)))
                  for a in (next_order if isinstance(next_order, tuple) else (next_order,))]
        raise ValueError(f"next_order must be (out, state_in, state_out): C-contiguous writable int64 ({n},) and "
                         f"two distinct uint64 (5,), and only where draws_next_order holds ({drawable}). "
                         f"Received: {shapes}")


def _c(*arrays) -> bool:
    return all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)


def _widest_layer(spec: NetSpec) -> int:
    """The most weights in one layer: the longest update pass a team could take."""
    return max(i * o for i, o in zip(spec.sizes[:-1], spec.sizes[1:]))


def _same_dtype(first, *rest) -> bool:
    return first.dtype.kind == "f" and all(a.dtype == first.dtype for a in rest)


def _rows(a: np.ndarray) -> np.ndarray:
    """A 1-D vector as a batch of one row; 2-D batches unchanged."""
    return a.reshape(1, -1) if a.ndim == 1 else a


def _act_code(name) -> int:
    code = ACT_CODE.get(name)
    if code is None:
        raise ValueError(f"unknown activation {name!r}")
    return code


def _loss_code(name) -> int:
    code = LOSS_CODE.get(name)
    if code is None:
        raise ValueError(f"unknown loss {name!r}")
    return code


def _blas_controller(library):
    """threadpoolctl's controller of the BLAS library our GEMMs call (the file kernels/blas.py
    bound, matched by real path), or None."""
    try:
        from threadpoolctl import ThreadpoolController

        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api == "blas" and lib.filepath and os.path.realpath(lib.filepath) == library.path:
                return lib
    except Exception:  # pragma: no cover - threadpoolctl missing or a BLAS it cannot drive
        pass
    return None


def _host_cpu_name() -> str:
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:  # pragma: no cover
        return "unknown"


# What each compiled entry point is, and roughly how long its cold compile takes per dtype
# (seconds, from the 2-core Xeon and the slower-compiling 2-core EPYC Zen 3: a first per-example
# fit 12.2 / 14.3 s, a first batch-32 fit 22.5 / 32.2 s before its compile helper and 19-24 s on
# the EPYC with it, warmup 28 / 49 s; cpu-peers-20261202T014939Z.json and T054506Z.json "jit",
# jit-helper-20261202T063300Z.json; the first one also compiles what later ones share). Compiling
# the per-example team's callback too took a first per-example fit to 20.4 s on the Xeon SPR
# (cpu-peers-20261203T084534Z.json); for the helper that compiles it meanwhile (ready_team), against
# compiling it in-process and no team: benchmarks/results/jit-team-callback-20261207T154548Z.json.
_ENTRY = {
    "shallow_epoch": ("per-example training of a small network", "8-12"),
    "examples_epoch": ("per-example training", "10-15"),
    "batch_epoch": ("mini-batch training", "15-25"),
    "loop_epoch": ("mini-batch training with the per-example loop", 4),
    "loop_batch": ("per-example gradients", 4),
    "apply_update": ("the optimizer update", 2),
    "small_epoch": ("per-example training of this small network (compiled for its sizes)", "10-12"),
}
_HELPED = {"batch_epoch": "batch"}  # entry points a helper process compiles part of (numba_compile.PARTS)
WARMUP_S = "25-50"  # everything for one dtype, the same way
_BASIC = ("the shuffle, check and layer kernels", 1)  # each, on its first use
ANNOUNCE_AFTER_S = 1.0  # where the cache cannot be read: say it once a call has taken this long


def _cached_on_disk(disp, args):
    """Whether Numba's disk cache holds ``disp`` compiled for these arguments: True/False, or
    None where this Numba's cache internals are not the ones read here."""
    try:
        sig = tuple(disp.typeof_pyval(a) for a in args)
        if sig in disp.overloads:
            return True
        cache = disp._cache
        return cache._index_key(sig, disp.targetctx.codegen()) in cache._cache_file._load_index()
    except Exception:  # pragma: no cover - another Numba's layout
        return None


def _cache_dir(disp) -> str:
    try:
        return disp._cache._cache_path
    except Exception:  # pragma: no cover
        return "Numba's cache directory"


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


_SMALL_SOURCE = '''"""Generated by fastbp.kernels.numba: shallow_epoch_drawing for one network, {sizes} with codes
hidden={hidden} output={output} loss={loss}, as compile-time constants (the hidden count too when
it is small, see _hidden_count), compiled with LLVM's SLP vectorizer (_SLPCompiled). Safe to delete.
sha256 of numba_kernels.py, numba_random.py and this template {digest} (Numba's cache does not
see changes to inlined code, so the file name and text carry it: an edit to any means a new file)."""
from numba import njit

from fastbp.kernels.numba_kernels import _DOT_MATH, shallow_body

N_IN, N_OUT, HIDDEN, OUTPUT, LOSS = {n_in}, {n_out}, {hidden}, {output}, {loss}


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, nogil=True)
def epoch(sizes, hidden, output, loss, P, X, Y, order, hp, step, S, work, next_order, state_in, state_out):
    return shallow_body(N_IN, {hidden_count}, N_OUT, HIDDEN, OUTPUT, LOSS, P, X, Y, order, hp, step, S, work,
                        next_order, state_in, state_out)
'''


def _generated_dir():
    """Where generated kernel modules go: beside Numba's cache when NUMBA_CACHE_DIR is set, else
    kernels/__pycache__ when writable, else the user cache directory."""
    candidates = []
    if numba.config.CACHE_DIR:
        candidates.append(os.path.join(numba.config.CACHE_DIR, "fastbp_generated"))
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__", "fastbp_generated"))
    candidates.append(os.path.join(os.path.expanduser("~"), ".cache", "fastbp", "generated"))
    for path in candidates:
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    return None


_DIGEST = None
UNROLLED_HIDDEN_MAX = 8
_SLP_LOCK = threading.Lock()


class _SLPCompiled:
    """A generated small kernel whose compile (or load from the disk cache) for each argument
    type runs with LLVM's SLP vectorizer on, which Numba leaves off by default
    (``NUMBA_SLP_VECTORIZE``). A small net's loops over its hidden units are unrolled into
    scalar code that the loop vectorizer never sees; SLP packs them into vector code: 2-8-1
    sigmoid per example 67.7 vs 95.8 ns SGD, 87.3 vs 107.7 momentum, 102.4 vs 123.2 Adam
    (benchmarks/results/small-kernel-ab-20261208T023159Z.json). Numba reads the setting when
    it builds a pass manager, so it is set, under a lock, only around ``dispatcher.compile``;
    whatever that compile compiles for the first time (the kernel's callees not yet cached)
    gets it too, and so may a compile on another thread meanwhile: their speed may differ,
    and where their flags allow reassociation, the order of a sum (without those flags SLP
    keeps each operation's rounding). Calls it has compiled for cost one set lookup."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._ready = set()  # dtype chars of the parameters compiled for in this process

    def __call__(self, *args):
        key = args[4].dtype.char  # the parameters' dtype: the one type that varies between fits
        if key not in self._ready:
            signature = tuple(numba.typeof(a) for a in args)
            if signature not in self.dispatcher.overloads:
                with _SLP_LOCK:
                    before, numba.config.SLP_VECTORIZE = numba.config.SLP_VECTORIZE, 1
                    try:
                        self.dispatcher.compile(signature)
                    finally:
                        numba.config.SLP_VECTORIZE = before
            self._ready.add(key)
        return self.dispatcher(*args)

    def __getattr__(self, name):  # the dispatcher's own (its cache, for _compiling's announcement)
        return getattr(self.dispatcher, name)


def _hidden_count(n_hidden: int) -> str:
    """The hidden-unit count as the generated kernel reads it: a constant up to
    UNROLLED_HIDDEN_MAX units (LLVM unrolls the loops over them, and SLP vectorizes them), else
    from ``sizes`` at run time (the loops stay loops, which the loop vectorizer takes). Without
    SLP each was the faster there (small-kernel-ab-20261207T201239Z.json); with it the constant
    measured faster up to 32 units too (4-16-3 relu SGD 93 vs 98 ns, 8-32-4 tanh 555 vs 600:
    benchmarks/results/small-kernel-ab-20261208T023159Z.json), not taken yet: more unrolled
    code to compile on a first fit, unmeasured."""
    return str(n_hidden) if n_hidden <= UNROLLED_HIDDEN_MAX else "sizes[1]"


def _load_small_kernel(sizes, hidden: int, output: int, loss: int):
    """Write (once) and import the generated module for one small network (its ``epoch``)."""
    global _DIGEST
    import hashlib
    import importlib.util

    try:
        if _DIGEST is None:  # the kernels and the template: a change to any means a new module
            with open(_K.__file__, "rb") as f, open(_R.__file__, "rb") as g:
                _DIGEST = hashlib.sha256(f.read() + g.read() + _SMALL_SOURCE.encode()).hexdigest()
        folder = _generated_dir()
        if folder is None:
            return None
        n_in, n_hidden, n_out = (int(v) for v in sizes)
        count = _hidden_count(n_hidden)
        unrolled = "u" if count.isdigit() else "v"  # the choice in the name: a new rule means a new file
        name = f"fastbp_small_{n_in}_{n_hidden}{unrolled}_{n_out}_{hidden}_{output}_{loss}_{_DIGEST[:16]}"
        path = os.path.join(folder, name + ".py")
        if not os.path.exists(path):
            text = _SMALL_SOURCE.format(sizes=list(sizes), n_in=n_in, hidden_count=count, n_out=n_out, hidden=hidden,
                                        output=output, loss=loss, digest=_DIGEST)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # atomic: a process importing it never sees half a file
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Numba's cache finds the function's module again by this name
        spec.loader.exec_module(module)
        return module
    except Exception:  # read-only everywhere, odd file systems: the shared shallow_epoch_drawing serves
        return None


def create() -> NumbaBackend:
    """The Numba backend, or BackendUnavailableError saying why not and how to fix it."""
    if numba is None:
        raise BackendUnavailableError("numba", "numba is not installed", "pip install numba")
    return NumbaBackend()  # raises BackendUnavailableError where no BLAS can be bound (kernels/blas.py)
