"""Numba backend: JIT-compiled CPU kernels, a compiled per-example loop and compiled epochs.

The kernels themselves live in ``kernels/numba_kernels.py`` (all ``@njit(cache=True)``);
this module is the :class:`~fastbp.kernels.base.Backend` that drives them and decides, by
size, which path runs. ``import fastbp`` never imports numba: only ``create()`` here does,
when the backend is first asked for.

What runs where
---------------
* GEMMs go to BLAS: ``matmul`` calls the ``?gemm`` of SciPy's OpenBLAS (alpha and beta
  inside the GEMM, ``out`` written in place), and compiled code calls ``np.dot``, which
  Numba routes to that same library. One BLAS library on purpose: NumPy ships its own
  OpenBLAS, and alternating GEMMs between the two ran 2-100x slower on the 2-core
  reference machine (each pool's idle workers spin while the other pool computes).
* Elementwise work is compiled and fused: ``hidden_delta`` is the GEMM then one pass
  applying phi'; ``output_delta`` is loss, ``dc/da`` and phi' in one pass per row; bias
  reduction and the SGD update over the flat parameter buffer are one pass each. Inside
  compiled epochs the bias and hidden activation follow each forward GEMM in one pass,
  and the output layer's activation, cost and delta share their exps. tanh's forward is
  the one exception: NumPy's SIMD ``np.tanh`` is ~70x faster than the scalar libm call a
  Numba loop makes (no SVML here), so the batch kernel uses it.
* ``loop_gradients`` (``has_compiled_loop``): the textbook per-example loop, one call.
* ``train_epoch`` (``has_compiled_epoch``): a whole epoch in one call, for batch size 1
  (always; the gradient is applied where it is formed), the "loop" strategy (always) and
  mini-batches whose ``batch_size * n_params`` is at most ``EPOCH_MAX_WORK``. Above that the
  model's per-batch path runs: its BLAS GEMMs take milliseconds and the Python between them
  is noise. Inside compiled code, products below ``FORWARD_BLAS_MIN`` / ``BACKWARD_BLAS_MIN``
  multiply-adds are hand loops (a BLAS call costs more than the arithmetic there); larger
  ones call BLAS.

Threads
-------
The cores belong to BLAS, and no Numba kernel is ``parallel=True``, so the two pools can never
oversubscribe the machine: GEMMs use BLAS's default thread count (all cores; limit it with
threadpoolctl as usual), and every compiled kernel runs on the calling thread, so Numba's
thread pool is never started. Measured on the 2-core reference machine, 1024-2048-2048-10,
batch 512: elementwise passes made ``parallel=True`` between the GEMMs slowed a step from
74 ms to 117 ms with Numba's default (OpenMP) threading layer -- libgomp's and OpenBLAS's idle
workers spin, each pool stealing the cores the other is computing on -- and gained nothing
with the workqueue layer (74 ms); the per-example loop and the small-network epochs are far
too fine-grained for a parallel region (~2-3 us to start one). One exception the other way:
a compiled mini-batch epoch whose largest GEMM is below ``SMALL_GEMM_MAX`` multiply-adds runs
BLAS on one thread for its duration (restored after), since handing each short GEMM to the
second thread measured slower than doing it alone. ``info()`` reports both pools.

JIT cost
--------
Every kernel is compiled on first use per dtype and cached on disk (``cache=True``, in
``kernels/__pycache__`` or Numba's user cache dir when that is read-only), so a second
process loads machine code instead of compiling. ``warmup(dtype)`` compiles (or loads)
everything up front and returns the seconds it took, so benchmarks report JIT time
separately from steady-state speed. Measured (2-core reference machine): ~10 s to compile
everything for one dtype with an empty cache; with the cache, a new process goes from
start to its first fit in ~0.3-0.6 s (import 0.1 s, backend 0.2-0.3 s, cache load 0.1-0.2 s).
Editing ``numba_kernels.py`` invalidates its cache.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np

from fastbp.errors import BackendUnavailableError

from .base import ACT_CODE, LOSS_CODE, Backend, NetSpec, OptimizerState, UpdateRule

try:  # only this backend's modules import numba
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None
else:
    from . import numba_kernels as _K


_MAX_WORKSPACES = 16  # (network, batch size) layouts kept warm


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _fortran_operand(m: np.ndarray, transposed: bool):
    """``m.T if transposed else m`` as (Fortran-ordered array, BLAS trans flag), without copying."""
    v = m.T if transposed else m
    if v.flags.f_contiguous:
        return v, 0
    if v.flags.c_contiguous:
        return v.T, 1
    return np.asfortranarray(v), 0


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

    def __init__(self) -> None:
        from scipy.linalg import blas

        from .numpy import NumpyBackend

        self._k = _K
        self._gemm = {np.dtype(np.float32): blas.sgemm, np.dtype(np.float64): blas.dgemm}
        self._ref = NumpyBackend()  # for shapes/layouts the compiled kernels do not take
        self._specs: dict = {}  # NetSpec -> (sizes array, hidden code, output code, loss code)
        self._work: OrderedDict = OrderedDict()  # (NetSpec, rows, dtype) -> flat workspace, LRU
        self._blas = _blas_controller()  # threadpoolctl's handle on the OpenBLAS our GEMMs use

    # ------------------------------------------------------------ arrays
    def asarray(self, x, dtype=None):
        if type(x).__module__.startswith("cupy"):
            x = x.get()
        return np.ascontiguousarray(x, dtype=dtype)

    def all_finite(self, a) -> bool:
        if isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype.kind == "f":
            return bool(self._k.all_finite(a))
        return bool(np.isfinite(a).all())

    def take_rows(self, src, index, out):
        if (_c(src, out, index) and src.ndim == 2 and index.ndim == 1 and index.dtype.kind == "i"
                and out.shape == (index.size, src.shape[1]) and src.dtype == out.dtype and src.shape[0] > 0):
            self._k.take_rows(src, index, out)
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
            "numba_threads": 1,  # every compiled kernel runs on the calling thread
            "numba_threading_layer": "unused (no parallel kernels)",
            "blas_threads": _blas_threads(blas),
            "blas": blas,
            "blas_used": "SciPy's OpenBLAS (scipy.linalg.blas and Numba's np.dot) for every GEMM",
            "thread_policy": ("cores belong to BLAS (its default: all of them); compiled kernels are "
                              "single-threaded, so Numba's pool never starts and cannot oversubscribe; "
                              f"compiled mini-batch epochs whose largest GEMM is < {self.SMALL_GEMM_MAX} "
                              "multiply-adds run BLAS on one thread"),
            "cores": _usable_cores(),
            "cpu_name": _host_cpu_name(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "thresholds": {"FORWARD_BLAS_MIN": self.FORWARD_BLAS_MIN, "BACKWARD_BLAS_MIN": self.BACKWARD_BLAS_MIN,
                           "HAND_MAX_ROWS": self.HAND_MAX_ROWS,
                           "EPOCH_MAX_WORK": self.EPOCH_MAX_WORK, "SMALL_GEMM_MAX": self.SMALL_GEMM_MAX},
        }

    # ------------------------------------------------------------ basic kernels
    def matmul(self, a, b, out, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        gemm = self._gemm.get(out.dtype)
        if (gemm is None or a.ndim != 2 or b.ndim != 2 or out.ndim != 2 or out.size == 0
                or a.dtype != out.dtype or b.dtype != out.dtype or not out.flags.c_contiguous
                or (a.shape[0] if trans_a else a.shape[1]) == 0):
            self._ref.matmul(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
            return
        # out (m, n) in C order is out.T (n, m) in Fortran order: out.T = op(b)^T op(a)^T.
        x, tx = _fortran_operand(b, not trans_b)
        y, ty = _fortran_operand(a, not trans_a)
        gemm(alpha, x, y, beta, out.T, tx, ty, 1)

    def hadamard(self, a, b, out):
        if _c(a, b, out) and a.shape == b.shape == out.shape and _same_dtype(a, b, out):
            self._k.hadamard(a, b, out)
        else:
            self._ref.hadamard(a, b, out)

    def outer(self, x, y, out, *, alpha=1.0, accumulate=True):
        if _c(x, y, out) and x.ndim == 1 and y.ndim == 1 and out.shape == (x.size, y.size) \
                and _same_dtype(x, y, out):
            self._k.outer(x, y, out, out.dtype.type(alpha), bool(accumulate))
        else:
            self._ref.outer(x, y, out, alpha=alpha, accumulate=accumulate)

    def add_bias(self, z, b):
        if _c(z, b) and z.ndim in (1, 2) and b.ndim == 1 and z.shape[-1] == b.size and _same_dtype(z, b):
            self._k.add_bias(_rows(z), b)
        else:
            self._ref.add_bias(z, b)

    def bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
        if _c(delta, out) and delta.ndim == 2 and out.ndim == 1 and delta.shape[1] == out.size \
                and _same_dtype(delta, out):
            self._k.bias_grad(delta, out, out.dtype.type(alpha), bool(accumulate))
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
        self._k.activation(code, _rows(z), _rows(out))

    def activation_backward(self, name, z, a, delta):
        code = _act_code(name)
        if not (_c(z, a, delta) and z.shape == a.shape == delta.shape and _same_dtype(z, a, delta)
                and z.ndim in (1, 2)):
            self._ref.activation_backward(name, z, a, delta)
            return
        self._k.activation_backward(code, _rows(z), _rows(a), _rows(delta))

    def hidden_delta(self, name, delta_next, w_next, z, a, out):
        """``out = phi'(z) (.) (delta_next @ w_next)``: one BLAS GEMM and one fused pass, one call."""
        code = _act_code(name)
        if not (_c(delta_next, w_next, z, a, out) and out.ndim == 2 and delta_next.ndim == 2
                and z.shape == a.shape == out.shape and _same_dtype(delta_next, w_next, z, a, out)
                and out.dtype in self._gemm and delta_next.shape[1] > 0):
            super().hidden_delta(name, delta_next, w_next, z, a, out)
            return
        self._k.hidden_delta(code, delta_next, w_next, z, a, out)

    # ---- losses: value beside fused output delta
    def output_delta(self, loss, output, z, a, y, delta):
        codes = _loss_code(loss), _act_code(output)
        if not (_c(z, a, y, delta) and z.shape == a.shape == y.shape == delta.shape
                and _same_dtype(z, a, y, delta) and z.ndim in (1, 2)):
            return self._ref.output_delta(loss, output, z, a, y, delta)
        return float(self._k.output_delta(*codes, _rows(z), _rows(a), _rows(y), _rows(delta)))

    def loss_sum(self, loss, output, z, a, y):
        codes = _loss_code(loss), _act_code(output)
        if not (_c(z, a, y) and z.shape == a.shape == y.shape and _same_dtype(z, a, y) and z.ndim in (1, 2)):
            return self._ref.loss_sum(loss, output, z, a, y)
        return float(self._k.loss_sum(*codes, _rows(z), _rows(a), _rows(y)))

    def update(self, spec, rule, params, grads, state, rows):
        """The rule's step over the flat buffers in one compiled pass (``apply_update``)."""
        self._check_update(spec, rule, params, grads, state)
        self._k.apply_update(rule.hyper(), state.step, self._spec(spec)[0], params, grads, state.buffers, rows)

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
        total, _ = self._k.loop_batch(sizes, hidden, output, loss, params, X, Y, grads, work, 0, X.shape[0])
        return float(total)

    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str, rule=None) -> bool:
        """True where one compiled call per epoch beats the per-batch path (measured by size)."""
        if batch_size is None:
            return False
        if batch_size <= 1 or strategy == "loop":
            return True
        return batch_size * spec.n_params <= self.EPOCH_MAX_WORK

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, rule, state, strategy):
        """One epoch over ``X, Y`` (already shuffled) in one compiled call, each batch's
        gradient applied by ``rule`` (fused into the per-example pass at batch size 1).

        Returns ``(loss_sum, n_done, n_correct)``; stops before the update of the first batch
        whose cost is not finite, so ``n_done < n`` says where.
        """
        self._check_fast_path(spec, params, grads, X, Y)
        self._check_update(spec, rule, params, grads, state)
        sizes, hidden, output, loss = self._spec(spec)
        n = X.shape[0]
        batch_size = max(1, min(int(batch_size), n))
        hp, step, buffers = rule.hyper(), state.step, state.buffers
        K = self._k
        if batch_size == 1:
            work = self._workspace(spec, 0, params.dtype)
            total, done, correct = K.examples_epoch(sizes, hidden, output, loss, params, X, Y, hp, step, buffers, work)
        elif strategy == "loop":
            work = self._workspace(spec, 0, params.dtype)
            total, done, correct = K.loop_epoch(sizes, hidden, output, loss, params, grads, X, Y, batch_size,
                                                hp, step, buffers, work)
        else:
            work = self._workspace(spec, batch_size, params.dtype)
            if batch_size <= self.HAND_MAX_ROWS:  # a few rows: every product a hand loop
                plan = np.full(2, np.iinfo(np.int64).max, np.int64)
            else:
                plan = np.array([self.FORWARD_BLAS_MIN, self.BACKWARD_BLAS_MIN], np.int64)
            largest = batch_size * max(i * o for i, o in zip(spec.sizes[:-1], spec.sizes[1:]))
            threads = self._blas.get_num_threads() if self._blas is not None else 1
            single = threads > 1 and largest < self.SMALL_GEMM_MAX
            if single:
                self._blas.set_num_threads(1)
            try:
                total, done, correct = K.batch_epoch(sizes, hidden, output, loss, params, grads, X, Y, batch_size,
                                                     hp, step, buffers, work, plan)
            finally:
                if single:
                    self._blas.set_num_threads(threads)
        return float(total), int(done), int(correct)

    # ------------------------------------------------------------ JIT
    def warmup(self, dtype="float32") -> float:
        """Compile (or load from the disk cache) every kernel for ``dtype``; returns the seconds spent."""
        dt = np.dtype(dtype)
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        n, sizes = 4, (3, 5, 2)
        X = rng.standard_normal((n, sizes[0])).astype(dt)
        Y = np.zeros((n, sizes[-1]), dt)
        Y[:, 0] = 1
        for loss, output in (("cross_entropy", "softmax"), ("mse", "identity")):
            spec = NetSpec(sizes, "relu", output, loss, dt)
            params = (rng.standard_normal(spec.n_params) * 0.1).astype(dt)
            grads = np.empty_like(params)
            self.loop_gradients(spec, params, X, Y, grads)
            for rule in (UpdateRule("sgd", lr=0.01), UpdateRule("adam", lr=0.01)):
                state = OptimizerState(np.zeros((rule.n_buffers, spec.n_params), dt))
                for bs, strategy in ((1, "vectorized"), (2, "loop"), (2, "vectorized")):
                    self.train_epoch(spec, params, grads, X, Y, bs, rule, state, strategy)
                self.update(spec, rule, params, grads, state, n)
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
        return time.perf_counter() - t0


# ---------------------------------------------------------------- helpers


def _c(*arrays) -> bool:
    return all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)


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


def _blas_controller():
    """threadpoolctl's controller of SciPy's OpenBLAS (the library our GEMMs call), or None."""
    try:
        from threadpoolctl import ThreadpoolController

        for lib in ThreadpoolController().lib_controllers:
            if lib.user_api == "blas" and "scipy.libs" in (lib.filepath or ""):
                return lib
    except Exception:  # pragma: no cover - threadpoolctl missing or a BLAS it cannot drive
        pass
    return None


def _blas_threads(blas: list) -> int | None:
    """Threads of the BLAS that runs our GEMMs (SciPy's OpenBLAS), as threadpoolctl sees it."""
    for lib in blas:
        path = lib.get("filepath") or ""
        if "scipy.libs" in path or ("scipy_openblas" in path and "openblas64_" not in path):
            return lib.get("num_threads")
    return blas[0].get("num_threads") if blas else None


def _host_cpu_name() -> str:
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:  # pragma: no cover
        return "unknown"


def create() -> NumbaBackend:
    """The Numba backend, or BackendUnavailableError saying why not and how to fix it."""
    if numba is None:
        raise BackendUnavailableError("numba", "numba is not installed", "pip install numba")
    try:
        import scipy.linalg.blas  # noqa: F401 - Numba's np.dot and our GEMMs call SciPy's BLAS
    except ImportError:
        raise BackendUnavailableError(
            "numba", "scipy is not installed (Numba's BLAS calls go through SciPy)", "pip install scipy"
        ) from None
    return NumbaBackend()
