"""CuPy backend: the kernel contract on an NVIDIA GPU, and a whole training step as a CUDA graph.

GEMMs go through cuBLAS (``cupy.matmul`` with ``out=``). Everything else runs fastbp's own CUDA
code in ``kernels/cuda/``: ``activations.cu`` defines each activation beside its derivative once,
and both the ElementwiseKernels here and the kernels of ``fastbp_kernels.cu`` (compiled by NVRTC
through ``cupy.RawModule``, once per dtype, cached on disk by CuPy) use it. Meanings match the
NumPy reference backend exactly, including the stable log_loss + sigmoid and cross_entropy +
softmax computed from the logits.

Fused kernels: the output delta with its loss (one warp per example; the summed cost comes back
as a device 0-d array, no host sync), the bias + activation and ``phi'(z) (.) (delta @ W)``
epilogues, the bias reduction, one SGD update over the flat parameter buffer.

``train_epoch`` (the fast path ``fastbp.MLP.fit`` uses) keeps the data on the device and runs each
mini-batch as one CUDA graph: batch gather, forward, fused output delta and loss, backward, SGD,
about 4 + 5 * n_layers kernels replayed with a single launch. The graph reads the data set's
address, the learning rate and the batch index from device memory, so one graph per batch size
serves every batch and epoch. A batch whose cost is not finite sets a device flag that skips
every later update; the flag, the summed cost and the number of examples done are read back once
per epoch.

CuPy refuses cuBLAS calls while a stream captures (its cuBLAS ``setStream`` raises
NotImplementedError; cupy/cupy#6290), although cuBLAS itself supports stream capture (cuBLAS
docs, "CUDA Graphs Support"). So the captured step has two routes for its GEMMs:

``graph-cublas``
    cuBLAS through fastbp's own handle, called with ctypes. The handle is bound to fastbp's stream
    and to a user-owned workspace before capture, so a captured GEMM allocates nothing.
``graph-raw``
    fastbp's tiled GEMM (``fb_gemm`` in ``fastbp_kernels.cu``) with the bias + activation or
    the ``phi'`` Hadamard fused into its epilogue: fewer kernels, but no tensor cores.
``eager``
    No graph: cupy.matmul and the same fused kernels, launched one by one.

Environment variables, read when the backend is created:

``FASTBP_TF32``
    ``1``: float32 GEMMs may use TF32 tensor cores (compute capability 8.0 and newer): several
    times the FP32 peak, products rounded to a 10-bit mantissa. ``0``: full FP32. Unset: CuPy's
    own ``CUPY_TF32`` decides (off by default), so float32 means FP32 unless asked. Applies to
    CuPy's float32 matmuls process-wide (``cupy._core._routines_linalg.set_compute_type``) and to
    fastbp's cuBLAS handle; fastbp's own GEMM kernel is always FP32.
``FASTBP_CUPY_STEP``
    ``auto`` (default): ``graph-cublas``, else ``graph-raw``, else ``eager``, taking the first
    that works here; or one of those names to force it (an error if it does not work).
``FASTBP_CUPY_VERIFY``
    ``1`` (default): the first time a graph is made for a network and batch size, its step is
    checked against the eager step on the same batch (parameters restored afterwards); a graph
    that disagrees is dropped, with a RuntimeWarning, for the next route. ``0`` skips the check.

``create()`` imports CuPy (only this module does, and only then) and raises
``BackendUnavailableError`` saying why it cannot run here and how to fix it.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastbp.errors import BackendUnavailableError

from .base import ELEMENTWISE_ACTIVATIONS, LOSSES, Backend, NetSpec

ACT_CODES = {"identity": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "leaky_relu": 4, "softmax": 5}
LOSS_CODES = {"mse": 0, "log_loss": 1, "cross_entropy": 2}
STEP_ROUTES = ("graph-cublas", "graph-raw", "eager")

_EPI_NONE, _EPI_BIAS_ACT, _EPI_DACT = 0, 1, 2  # fb_gemm epilogues (fastbp_kernels.cu)
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_GEMM_SHAPES = ((0, 1), (0, 0), (1, 0))  # (trans_a, trans_b): forward, hidden delta, weight grad
_GEMM_TILES = (32, 64)
_ROW_KERNELS = (
    "fb_bias_act", "fb_dact_inplace", "fb_softmax_rows", "fb_softmax_backward_rows", "fb_output_delta",
    "fb_bias_grad", "fb_gather_batch", "fb_accumulate_loss", "fb_sgd",
)
_BLOCK = 256
_ROWS_PER_BLOCK = 4  # warps (rows) per block in the row-wise kernels
_NULL = np.uint64(0)  # a null pointer argument
_CUDA_DIR = Path(__file__).resolve().parent / "cuda"

_FIX_INSTALL = ("pip install 'fastbp[cuda12]' (NVIDIA driver for CUDA 12) or "
                "pip install 'fastbp[cuda13]' (driver for CUDA 13); nvidia-smi shows the driver")
_FIX_DRIVER = ("install or update the NVIDIA driver until nvidia-smi works (cupy-cuda12x needs a "
               "driver for CUDA 12, >= 525; cupy-cuda13x one for CUDA 13, >= 580) and match the "
               "wheel to it: pip install 'fastbp[cuda12]' or pip install 'fastbp[cuda13]'; "
               "without an NVIDIA GPU use a CPU backend: FASTBP_BACKEND=numba")
_FIX_NO_DEVICE = ("run on a machine with an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES) "
                  "after pip install 'fastbp[cuda12]', or use a CPU backend: FASTBP_BACKEND=numba")
_FIX_LIBS = ("pip install 'cupy-cuda12x[ctk]' (or 'cupy-cuda13x[ctk]' for a CUDA 13 driver) to get "
             "cuBLAS and NVRTC as wheels, or install the CUDA Toolkit; then pip install 'fastbp[cuda12]'")


# ---------------------------------------------------------------- selection


def create() -> "CupyBackend":
    """The CuPy backend, or BackendUnavailableError saying why not and how to fix it.

    Checks, in order: CuPy imports; the first device call works (on a machine without an NVIDIA
    driver cupy-cuda12x imports, then fails here with cudaErrorInsufficientDriver); there is a
    device; cuBLAS and NVRTC work (one small matmul, one compiled elementwise kernel).
    """
    try:
        import cupy
    except ModuleNotFoundError as exc:
        if exc.name != "cupy":
            raise _import_error(exc) from exc
        raise BackendUnavailableError("cupy", "cupy is not installed", _FIX_INSTALL) from None
    except Exception as exc:  # a broken wheel, or one for another CUDA major version
        raise _import_error(exc) from exc

    cuda_error = getattr(cupy.cuda.runtime, "CUDARuntimeError", RuntimeError)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cuda_error as exc:
        raise _device_error(exc) from exc
    if count == 0:
        raise BackendUnavailableError(
            "cupy", "no CUDA device (cupy.cuda.runtime.getDeviceCount() == 0)", _FIX_NO_DEVICE)
    try:
        backend = CupyBackend(cupy)
        backend._smoke_test()
    except (BackendUnavailableError, ValueError):  # ValueError: a bad FASTBP_* setting, named
        raise
    except cuda_error as exc:
        raise _device_error(exc) from exc
    except Exception as exc:
        raise BackendUnavailableError(
            "cupy", f"the CUDA libraries CuPy needs are not usable ({type(exc).__name__}: {exc})",
            _FIX_LIBS) from exc
    return backend


def _import_error(exc: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(
        "cupy", f"cupy is installed but does not import ({type(exc).__name__}: {exc})",
        "install exactly one cupy wheel, the one matching the driver: " + _FIX_INSTALL)


def _device_error(exc: BaseException) -> BackendUnavailableError:
    """Names what a CUDARuntimeError at the first device call means."""
    message = str(exc)
    driver_codes = ("InsufficientDriver", "SystemDriverMismatch", "CompatNotSupported",
                    "InitializationError", "NoKernelImageForDevice")
    if any(code in message for code in driver_codes):
        return BackendUnavailableError("cupy", f"CUDA driver too old / not present ({message})", _FIX_DRIVER)
    if "NoDevice" in message or "InvalidDevice" in message or "DevicesUnavailable" in message:
        return BackendUnavailableError("cupy", f"no CUDA device ({message})", _FIX_NO_DEVICE)
    return BackendUnavailableError(
        "cupy", f"CUDA runtime error at the first device call ({message})",
        "check nvidia-smi and CUDA_VISIBLE_DEVICES; " + _FIX_INSTALL)


def _env_flag(name: str) -> bool | None:
    """True / False for 1/0 (yes/no, true/false, on/off), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"Received: {name}={os.environ[name]!r}. Expected 1 or 0")


# ---------------------------------------------------------------- pure helpers (no CuPy)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _read_cuda(*names: str) -> str:
    return "\n".join((_CUDA_DIR / name).read_text() for name in names)


def module_source() -> str:
    """The CUDA source of fastbp's RawModule: the device functions, then the kernels."""
    return _read_cuda("activations.cu", "fastbp_kernels.cu")


def _gemm_name(t: str, trans_a: int, trans_b: int, tile: int) -> str:
    return f"fb_gemm<{t}, {int(trans_a)}, {int(trans_b)}, {tile}, {tile}>"


def _kname(base: str, t: str) -> str:
    return f"{base}<{t}>"


def kernel_names(t: str) -> list[str]:
    """Every name expression the RawModule of element type ``t`` ("float" | "double") instantiates."""
    names = [_gemm_name(t, ta, tb, tile) for ta, tb in _GEMM_SHAPES for tile in _GEMM_TILES]
    return names + [_kname(base, t) for base in _ROW_KERNELS]


def _gemm_tile(m: int, n: int, sm_count: int) -> int:
    """64 x 64 tiles when those alone give every multiprocessor a block, else 32 x 32."""
    return 64 if _cdiv(m, 64) * _cdiv(n, 64) >= sm_count else 32


def _grid_1d(total: int):
    """(grid, block) of a grid-stride elementwise kernel."""
    return (max(1, min(_cdiv(total, _BLOCK), 65535)),), (_BLOCK,)


def _grid_rows(m: int):
    """(grid, block) of a row-wise kernel: one warp per row."""
    return (max(1, _cdiv(m, _ROWS_PER_BLOCK)),), (32 * _ROWS_PER_BLOCK,)


def _grid_bias(k: int):
    return (max(1, _cdiv(k, 32)),), (32, 8)


def _grid_gemm(m: int, n: int, tile: int):
    return (_cdiv(n, tile), _cdiv(m, tile)), (16, 16)


def _data_ptr(a) -> int:
    """Device address of a CuPy array (host address of a NumPy one)."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


def _layer_views(spec: NetSpec, flat):
    """Per-layer views ``W^l`` of shape (n_out, n_in) and ``b^l`` of shape (n_out,) of a flat buffer."""
    weights, biases = [], []
    for l, (fan_in, fan_out) in enumerate(zip(spec.sizes[:-1], spec.sizes[1:])):
        w, b = spec.w_offsets[l], spec.b_offsets[l]
        weights.append(flat[w:w + fan_out * fan_in].reshape(fan_out, fan_in))
        biases.append(flat[b:b + fan_out])
    return weights, biases


def _cuda_version(v: int) -> str:
    """12090 -> "12.9" (the encoding of cudaRuntimeGetVersion / cudaDriverGetVersion)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def colmajor_gemm_args(trans_a, trans_b, m, n, k, lda, ldb, ldc):
    """cuBLAS (column-major) arguments for the row-major ``C = op(A) op(B)``.

    Row-major C is column-major C^T = op(B)^T op(A)^T: swap the operands and the sizes, keep
    the transposition flags and leading dimensions. Returns
    ``(op_first, op_second, m', n', k, first, ld_first, second, ld_second, ldc)`` with
    ``first``/``second`` naming which of "A"/"B" goes where.
    """
    return int(trans_b), int(trans_a), n, m, k, "B", ldb, "A", lda, ldc


# ---------------------------------------------------------------- the training step


class _EpochState:
    """Device scalars a captured step reads and writes, so one graph serves every batch and epoch."""

    def __init__(self, xp, dtype) -> None:
        self.table = xp.zeros(2, dtype=np.uint64)     # addresses of the data set X, Y
        self.counter = xp.zeros(1, dtype=np.int32)    # index of the next batch in this epoch
        self.status = xp.zeros(4, dtype=np.float64)   # cost sum, examples done, stopped, (unused)
        self.lr = xp.zeros(1, dtype=dtype)

    def reset(self) -> None:
        self.status.fill(0)
        self.counter.fill(0)


class _StepPlan:
    """One SGD step on a batch of ``m`` rows as a fixed sequence of kernels on fixed buffers.

    Batch ``counter`` starts at row ``counter * stride`` of the data set named in ``state.table``.
    ``issue(route)`` launches the sequence; under stream capture it becomes the step's graph.
    Only ``xp`` (for allocation and, on the eager route, matmul), the ``kernels`` table of
    callables ``kernel(grid, block, args)`` and ``blas`` (graph-cublas) touch the device.
    """

    def __init__(self, spec: NetSpec, params, grads, m: int, stride: int, *, xp, kernels, state,
                 sm_count: int, blas=None) -> None:
        dtype = np.dtype(spec.dtype)
        self.spec, self.m, self.stride = spec, m, stride
        self.xp, self.k, self.st, self.sm_count, self.blas = xp, kernels, state, sm_count, blas
        self.T, self.t = dtype.type, _CTYPES[dtype]
        self.params, self.grads = params, grads
        self.W, self.b = _layer_views(spec, params)
        self.dW, self.db = _layer_views(spec, grads)
        sizes = spec.sizes
        self.xs = xp.empty((m, sizes[0]), dtype=dtype)
        self.ys = xp.empty((m, sizes[-1]), dtype=dtype)
        self.Z = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.A = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.D = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.row_loss = xp.empty((m,), dtype=dtype)

    def _launch(self, name: str, grid_block, args) -> None:
        grid, block = grid_block
        self.k[name](grid, block, args)

    def issue(self, route: str) -> None:
        spec, m, st, T, t, i32 = self.spec, self.m, self.st, self.T, self.t, np.int32
        sizes, n_layers = spec.sizes, spec.n_layers
        self._launch(_kname("fb_gather_batch", t), _grid_1d(m * (sizes[0] + sizes[-1])),
                     (st.table, st.counter, self.xs, self.ys, i32(self.stride), i32(m),
                      i32(sizes[0]), i32(sizes[-1])))
        # forward: Z = A_prev W^T + b, A = phi(Z)
        for l in range(n_layers):
            n_in, n_out = sizes[l], sizes[l + 1]
            prev = self.xs if l == 0 else self.A[l - 1]
            act = ACT_CODES[spec.activation(l)]
            softmax = act == ACT_CODES["softmax"]
            self._gemm(route, 0, 1, m, n_out, n_in, prev, self.W[l], self.Z[l], epi=_EPI_BIAS_ACT,
                       act=ACT_CODES["identity"] if softmax else act, bias=self.b[l],
                       aout=None if softmax else self.A[l])
            if softmax:
                self._launch(_kname("fb_softmax_rows", t), _grid_rows(m),
                             (self.Z[l], self.A[l], i32(m), i32(n_out)))
        # output delta and cost, fused; the cost joins the epoch's sum unless it is not finite
        self._launch(_kname("fb_output_delta", t), _grid_rows(m),
                     (self.Z[-1], self.A[-1], self.ys, self.D[-1], self.row_loss, i32(m),
                      i32(sizes[-1]), i32(ACT_CODES[spec.output]), i32(LOSS_CODES[spec.loss])))
        self._launch(_kname("fb_accumulate_loss", t), ((1,), (256,)),
                     (self.row_loss, i32(m), st.status, st.counter))
        # backward: dW = D^T A_prev / m, db = sum(D) / m, D_prev = phi'(Z_prev) (.) (D W)
        inv_m, hidden = T(1.0 / m), ACT_CODES[spec.hidden]
        for l in reversed(range(n_layers)):
            n_in, n_out = sizes[l], sizes[l + 1]
            prev = self.xs if l == 0 else self.A[l - 1]
            self._gemm(route, 1, 0, n_out, n_in, m, self.D[l], prev, self.dW[l], alpha=inv_m)
            self._launch(_kname("fb_bias_grad", t), _grid_bias(n_out),
                         (self.D[l], self.db[l], i32(m), i32(n_out), inv_m, i32(0)))
            if l > 0:
                self._gemm(route, 0, 0, m, n_in, n_out, self.D[l], self.W[l], self.D[l - 1],
                           epi=_EPI_DACT, act=hidden, ez=self.Z[l - 1], ea=self.A[l - 1])
        n_params = int(self.params.size)
        self._launch(_kname("fb_sgd", t), _grid_1d(n_params),
                     (self.params, self.grads, np.int64(n_params), st.lr, st.status))

    def _gemm(self, route, trans_a, trans_b, m, n, k, a, b, c, *, alpha=1.0, beta=0.0,
              epi=_EPI_NONE, act=0, bias=None, ez=None, ea=None, aout=None) -> None:
        """``c = alpha op(a) op(b) + beta c`` then the epilogue; a, b, c are row-major 2-D."""
        T, i32 = self.T, np.int32
        lda, ldb, ldc = a.shape[1], b.shape[1], c.shape[1]
        if route == "graph-raw":
            tile = _gemm_tile(m, n, self.sm_count)
            self._launch(_gemm_name(self.t, trans_a, trans_b, tile), _grid_gemm(m, n, tile),
                         (i32(m), i32(n), i32(k), a, i32(lda), b, i32(ldb), c, i32(ldc), T(alpha),
                          T(beta), i32(epi), i32(act), _opt(bias), _opt(ez), _opt(ea), _opt(aout)))
            return
        if route == "graph-cublas":
            self.blas.gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        else:
            assert beta == 0.0, "the eager step never accumulates into c"
            self.xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=c)
            if alpha != 1.0:
                self.xp.multiply(c, T(alpha), out=c)
        if epi == _EPI_BIAS_ACT:
            self._launch(_kname("fb_bias_act", self.t), _grid_1d(c.size),
                         (c, bias, _opt(aout), np.int64(c.size), i32(n), i32(act)))
        elif epi == _EPI_DACT:
            self._launch(_kname("fb_dact_inplace", self.t), _grid_1d(c.size),
                         (c, ez, ea, np.int64(c.size), i32(act)))


def _opt(a):
    return _NULL if a is None else a


class _Step:
    """A prepared step: its plan, the route chosen, and the graph (None on the eager route)."""

    def __init__(self, plan: _StepPlan, route: str, graph) -> None:
        self.plan, self.route, self.graph = plan, route, graph

    def run(self, count: int, stream) -> None:
        if self.graph is not None:
            for _ in range(count):
                self.graph.launch(stream)
        else:
            for _ in range(count):
                self.plan.issue("eager")


# ---------------------------------------------------------------- cuBLAS for captured steps


class _CublasDirect:
    """fastbp's own cuBLAS handle, called through ctypes so that its GEMMs can be captured.

    Bound once, outside any capture, to fastbp's stream and to a user-owned workspace (the
    cuBLAS docs' advice for graphs: no allocation inside the captured region). ``types`` maps a
    dtype to ``(cudaDataType, cublasComputeType, ctypes scalar)``.
    """

    WORKSPACE_BYTES = 32 << 20

    def __init__(self, lib, stream_ptr: int, workspace_ptr: int, workspace_bytes: int, types: dict,
                 algo: int, keepalive=None) -> None:
        self._lib, self._types, self._algo, self._keepalive = lib, types, algo, keepalive
        lib.cublasGemmEx.restype = ctypes.c_int
        lib.cublasGemmEx.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,  # handle, ops, m, n, k
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # alpha, A, Atype, lda
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # B, Btype, ldb
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # beta, C, Ctype, ldc
            ctypes.c_int, ctypes.c_int,  # computeType, algo
        ]
        self.handle = ctypes.c_void_p()
        _check_cublas(lib.cublasCreate_v2(ctypes.byref(self.handle)), "cublasCreate")
        _check_cublas(lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream_ptr)), "cublasSetStream")
        set_workspace = getattr(lib, "cublasSetWorkspace_v2", None)
        if set_workspace is not None and workspace_bytes:
            _check_cublas(set_workspace(self.handle, ctypes.c_void_p(workspace_ptr),
                                        ctypes.c_size_t(workspace_bytes)), "cublasSetWorkspace")
        self.library = getattr(lib, "_name", "libcublas")

    @classmethod
    def for_cupy(cls, cupy, stream, tf32: bool) -> "_CublasDirect":
        from cupy_backends.cuda.libs import cublas  # loads libcublas, as CuPy itself would

        runtime = cupy.cuda.runtime
        lib = _load_libcublas(runtime.runtimeGetVersion() // 1000)
        workspace = cupy.empty(cls.WORKSPACE_BYTES, dtype=np.uint8)  # lives as long as the handle
        compute32 = cublas.CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else cublas.CUBLAS_COMPUTE_32F
        types = {
            np.dtype(np.float32): (runtime.CUDA_R_32F, compute32, ctypes.c_float),
            np.dtype(np.float64): (runtime.CUDA_R_64F, cublas.CUBLAS_COMPUTE_64F, ctypes.c_double),
        }
        return cls(lib, stream.ptr, workspace.data.ptr, cls.WORKSPACE_BYTES, types,
                   cublas.CUBLAS_GEMM_DEFAULT, keepalive=workspace)

    def gemm(self, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) -> None:
        """Row-major ``c = alpha op(a) op(b) + beta c`` (host alpha/beta: captured by value)."""
        data_type, compute, scalar = self._types[np.dtype(c.dtype)]
        op1, op2, m2, n2, k2, first, ld1, _, ld2, ldc2 = colmajor_gemm_args(
            trans_a, trans_b, m, n, k, lda, ldb, ldc)
        x, y = (b, a) if first == "B" else (a, b)
        alpha_c, beta_c = scalar(alpha), scalar(beta)
        status = self._lib.cublasGemmEx(
            self.handle, op1, op2, m2, n2, k2, ctypes.byref(alpha_c),
            _data_ptr(x), data_type, ld1, _data_ptr(y), data_type, ld2,
            ctypes.byref(beta_c), _data_ptr(c), data_type, ldc2, compute, self._algo)
        _check_cublas(status, "cublasGemmEx")


def _load_libcublas(cuda_major: int):
    """The libcublas CuPy uses (already loaded by then), found like CuPy finds it."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib("cublas").abs_path)
    except Exception:
        pass
    errors = []
    for name in (f"libcublas.so.{cuda_major}", "libcublas.so", f"cublas64_{cuda_major}.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("libcublas not found: " + "; ".join(errors))


def _check_cublas(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


# ---------------------------------------------------------------- the backend


class CupyBackend(Backend):
    """The kernel contract on the current CUDA device, with ``xp = cupy``.

    Parameters
    ----------
    cupy : module
        The imported ``cupy`` (``create()`` passes it, so nothing imports CuPy at module level).
    tf32 : bool, optional
        TF32 tensor cores for float32 GEMMs; None reads ``FASTBP_TF32`` (then ``CUPY_TF32``).
    step_route : str, optional
        ``auto`` or one of ``STEP_ROUTES``; None reads ``FASTBP_CUPY_STEP``.
    verify : bool, optional
        Check each new graph against the eager step; None reads ``FASTBP_CUPY_VERIFY`` (default on).
    """

    name = "cupy"
    is_gpu = True
    has_compiled_loop = False
    has_compiled_epoch = True
    _MAX_STEPS = 16  # prepared steps (graphs) kept, least recently used dropped first

    def __init__(self, cupy, *, tf32=None, step_route=None, verify=None) -> None:
        self.xp = cupy
        self.step_route = step_route if step_route is not None else os.environ.get("FASTBP_CUPY_STEP", "auto")
        env_verify = _env_flag("FASTBP_CUPY_VERIFY")
        self.verify = bool(verify) if verify is not None else (env_verify is not False)
        if tf32 is None:
            tf32 = _env_flag("FASTBP_TF32")
        if tf32 is None:
            tf32 = _env_flag("CUPY_TF32") or False
        self.device = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(self.device.id)
        self.sm_count = int(props["multiProcessorCount"])
        self.tf32 = self._set_tf32(bool(tf32))
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._modules: dict = {}
        self._scratch: dict = {}
        self._states: dict = {}
        self._steps: OrderedDict = OrderedDict()
        self._blas = None
        self._blas_error: str | None = None
        self.last_route: dict = {}  # (sizes, batch rows) -> route of the last step prepared

        pre = _read_cuda("activations.cu")
        kernel = cupy.ElementwiseKernel
        self._ew_act = kernel("T z, int32 act", "T out", "out = fb_act(act, z)", "fastbp_act", preamble=pre)
        self._ew_dact = kernel("T z, T a, int32 act", "T delta", "delta = delta * fb_dact(act, z, a)",
                               "fastbp_dact", preamble=pre)
        self._ew_sgd = kernel("T g, T lr", "T p", "p = p - fb_mul_rn(g, lr)", "fastbp_sgd", preamble=pre)
        self._ew_outer = kernel("T x, T y, T alpha", "T out", "out = (x * y) * alpha", "fastbp_outer")
        self._ew_outer_acc = kernel("T x, T y, T alpha", "T out", "out = out + (x * y) * alpha",
                                    "fastbp_outer_acc")
        self._ew_axpby = kernel("T t, T alpha, T beta", "T out", "out = out * beta + t * alpha",
                                "fastbp_axpby")

    # ------------------------------------------------------------ configuration
    @property
    def step_route(self) -> str:
        return self._step_route

    @step_route.setter
    def step_route(self, value: str) -> None:
        key = str(value).strip().lower()
        if key not in ("auto",) + STEP_ROUTES:
            raise ValueError(f"Received: step_route (FASTBP_CUPY_STEP)={value!r}. "
                             f"Expected one of {['auto', *STEP_ROUTES]}")
        self._step_route = key

    def _set_tf32(self, want: bool) -> bool:
        """Sets CuPy's float32 GEMM compute type; returns whether TF32 is on."""
        if want and int(self.device.compute_capability) < 80:
            warnings.warn("FASTBP_TF32=1 ignored: TF32 needs compute capability 8.0 or newer, this "
                          f"device has {self.device.compute_capability}", RuntimeWarning, stacklevel=3)
            want = False
        try:
            linalg = importlib.import_module(self.xp.__name__ + "._core._routines_linalg")
            linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if want else linalg.COMPUTE_TYPE_DEFAULT)
        except (ImportError, AttributeError):  # another CuPy layout: its own switch, read lazily
            os.environ["CUPY_TF32"] = "1" if want else "0"
        return want

    def _smoke_test(self) -> None:
        """One cuBLAS GEMM and one NVRTC-compiled kernel (fastbp's RawModules compile on first use)."""
        cp = self.xp
        a = cp.ones((4, 4), dtype=np.float32)
        out = cp.empty((4, 4), dtype=np.float32)
        self.matmul(a, a, out)
        self.activation("sigmoid", out, out)
        self.device.synchronize()

    def _kernels(self, dtype) -> dict:
        """Name expression -> RawKernel of fastbp_kernels.cu for ``dtype``, compiled on first use."""
        dtype = np.dtype(dtype)
        table = self._modules.get(dtype)
        if table is None:
            if dtype not in _CTYPES:
                raise ValueError(f"Received: dtype={dtype}. Expected float32 or float64")
            names = kernel_names(_CTYPES[dtype])
            module = self.xp.RawModule(code=module_source(), name_expressions=names)
            table = self._modules[dtype] = {name: module.get_function(name) for name in names}
        return table

    def _buf(self, tag: str, shape: tuple, dtype):
        key = (tag, tuple(shape), np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = self.xp.empty(shape, dtype=dtype)
        return buf

    def _c(self, a):
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    # ------------------------------------------------------------ arrays
    def asarray(self, x, dtype=None):
        cp = self.xp
        if isinstance(x, cp.ndarray):
            return cp.ascontiguousarray(x, dtype=dtype)
        return cp.asarray(np.ascontiguousarray(x, dtype=dtype))

    def to_numpy(self, a) -> np.ndarray:
        if isinstance(a, self.xp.ndarray):
            return a.get()
        return np.asarray(a)

    def synchronize(self) -> None:
        self.device.synchronize()

    def take_rows(self, src, index, out) -> None:
        self.xp.take(src, index, axis=0, out=out)

    def index_array(self, index: np.ndarray):
        return self.xp.asarray(np.asarray(index, dtype=np.int64))

    def info(self) -> dict:
        cp = self.xp
        runtime = cp.cuda.runtime
        props = runtime.getDeviceProperties(self.device.id)
        name = props["name"]
        free, total = runtime.memGetInfo()
        return {
            "name": self.name,
            "cupy": cp.__version__,
            "device": name.decode() if isinstance(name, bytes) else str(name),
            "device_id": self.device.id,
            "compute_capability": self.device.compute_capability,
            "multiprocessors": self.sm_count,
            "memory_total_bytes": int(total),
            "memory_free_bytes": int(free),
            "cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),
            "cuda_driver": _cuda_version(runtime.driverGetVersion()),
            "tf32": self.tf32,
            "step_route": self.step_route,
            "cublas_direct": None if self._blas is None else self._blas.library,
        }

    # ------------------------------------------------------------ basic kernels
    def matmul(self, a, b, out, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        cp, T = self.xp, out.dtype.type
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if beta == 0.0:
            cp.matmul(a, b, out=out)
            if alpha != 1.0:
                cp.multiply(out, T(alpha), out=out)
            return
        tmp = self._buf("matmul", out.shape, out.dtype)
        cp.matmul(a, b, out=tmp)
        self._ew_axpby(tmp, T(alpha), T(beta), out)

    def hadamard(self, a, b, out):
        self.xp.multiply(a, b, out=out)

    def outer(self, x, y, out, *, alpha=1.0, accumulate=True):
        kernel = self._ew_outer_acc if accumulate else self._ew_outer
        kernel(x[:, None], y[None, :], out.dtype.type(alpha), out)

    def add_bias(self, z, b):
        self.xp.add(z, b, out=z)

    def bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
        m, k = delta.shape
        target = out if out.flags.c_contiguous else self.xp.ascontiguousarray(out)
        grid, block = _grid_bias(k)
        self._kernels(delta.dtype)[_kname("fb_bias_grad", _CTYPES[delta.dtype])](
            grid, block, (self._c(delta), target, np.int32(m), np.int32(k),
                          delta.dtype.type(alpha), np.int32(bool(accumulate))))
        if target is not out:
            out[...] = target

    def activation(self, name, z, out):
        if name == "softmax":
            m, k = z.shape
            target = out if out.flags.c_contiguous else self.xp.empty(out.shape, out.dtype)
            grid, block = _grid_rows(m)
            self._kernels(z.dtype)[_kname("fb_softmax_rows", _CTYPES[z.dtype])](
                grid, block, (self._c(z), target, np.int32(m), np.int32(k)))
            if target is not out:
                out[...] = target
        elif name in ELEMENTWISE_ACTIVATIONS:
            self._ew_act(z, np.int32(ACT_CODES[name]), out)
        else:
            raise ValueError(f"unknown activation {name!r}")

    def activation_backward(self, name, z, a, delta):
        if name == "softmax":
            m, k = delta.shape
            target = self._c(delta)
            grid, block = _grid_rows(m)
            self._kernels(delta.dtype)[_kname("fb_softmax_backward_rows", _CTYPES[delta.dtype])](
                grid, block, (self._c(a), target, np.int32(m), np.int32(k)))
            if target is not delta:
                delta[...] = target
        elif name == "identity":
            pass
        elif name in ELEMENTWISE_ACTIVATIONS:
            self._ew_dact(z, a, np.int32(ACT_CODES[name]), delta)
        else:
            raise ValueError(f"unknown activation {name!r}")

    def output_delta(self, loss, output, z, a, y, delta):
        return self._output(loss, output, z, a, y, delta)

    def loss_sum(self, loss, output, z, a, y):
        return self._output(loss, output, z, a, y, None)

    def _output(self, loss, output, z, a, y, delta):
        """fb_output_delta: the per-example costs (and deltas), summed on the device: a 0-d array."""
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}")
        if output not in ACT_CODES:
            raise ValueError(f"unknown activation {output!r}")
        m, k = z.shape
        dtype = z.dtype
        if y.dtype != dtype:
            y = y.astype(dtype)
        target = None
        if delta is not None:
            target = delta if delta.flags.c_contiguous else self.xp.empty(delta.shape, dtype)
        rows = self._buf("row_loss", (m,), dtype)
        grid, block = _grid_rows(m)
        self._kernels(dtype)[_kname("fb_output_delta", _CTYPES[dtype])](
            grid, block, (self._c(z), self._c(a), self._c(y), _opt(target), rows, np.int32(m),
                          np.int32(k), np.int32(ACT_CODES[output]), np.int32(LOSS_CODES[loss])))
        if target is not None and target is not delta:
            delta[...] = target
        return rows.sum()

    def sgd_update(self, params, grads, lr):
        self._ew_sgd(grads, params.dtype.type(lr), params)

    # ------------------------------------------------------------ the compiled epoch
    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str) -> bool:
        return (strategy == "vectorized" and np.dtype(spec.dtype) in _CTYPES
                and spec.hidden in ELEMENTWISE_ACTIVATIONS and spec.output in ACT_CODES
                and spec.loss in LOSSES)

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, lr, strategy):
        """One epoch of mini-batch SGD over ``X, Y`` in order, one graph replay per batch.

        Returns ``(loss_sum, n_done)`` as Python numbers: the one device-to-host read of the epoch.
        """
        if strategy != "vectorized":
            raise ValueError(f"Received: strategy={strategy!r}. Expected 'vectorized' (see supports_epoch)")
        cp = self.xp
        dtype = np.dtype(spec.dtype)
        X, Y = self.asarray(X, dtype), self.asarray(Y, dtype)
        n = int(X.shape[0])
        if n == 0:
            return 0.0, 0
        size = n if batch_size is None else max(1, min(int(batch_size), n))
        full, tail = divmod(n, size)
        state = self._state(dtype)
        caller = cp.cuda.get_current_stream()
        with self._stream:
            # the data, parameters or snapshot restores the caller queued come first
            self._stream.wait_event(caller.record())
            state.table.set(np.array([_data_ptr(X), _data_ptr(Y)], dtype=np.uint64))
            state.lr.fill(dtype.type(lr))
            steps = []
            if full:
                steps.append((self._step_for(spec, params, grads, size, size, state), full))
            if tail:
                steps.append((self._step_for(spec, params, grads, tail, size, state), 1))
            state.reset()
            for step, count in steps:
                step.run(count, self._stream)
            status = state.status.get(stream=self._stream)
        return float(status[0]), int(status[1])

    def _state(self, dtype) -> _EpochState:
        state = self._states.get(dtype)
        if state is None:
            with self._stream:
                state = self._states[dtype] = _EpochState(self.xp, dtype)
        return state

    def _blas_handle(self):
        """fastbp's cuBLAS handle for captured GEMMs, or None (reason in ``_blas_error``)."""
        if self._blas is None and self._blas_error is None:
            try:
                self._blas = _CublasDirect.for_cupy(self.xp, self._stream, self.tf32)
            except Exception as exc:
                self._blas_error = f"{type(exc).__name__}: {exc}"
        return self._blas

    def _routes(self) -> list[str]:
        if self.step_route != "auto":
            if self.step_route == "graph-cublas" and self._blas_handle() is None:
                raise RuntimeError(f"FASTBP_CUPY_STEP=graph-cublas: no cuBLAS handle ({self._blas_error})")
            return [self.step_route]
        routes = ["graph-cublas"] if self._blas_handle() is not None else []
        return routes + ["graph-raw", "eager"]

    def _step_for(self, spec, params, grads, m, stride, state) -> _Step:
        key = (spec, m, stride, _data_ptr(params), _data_ptr(grads), self.step_route)
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        plan = _StepPlan(spec, params, grads, m, stride, xp=self.xp, kernels=self._kernels(spec.dtype),
                         state=state, sm_count=self.sm_count, blas=self._blas_handle())
        step = self._steps[key] = self._prepare(plan)
        while len(self._steps) > self._MAX_STEPS:
            self._steps.popitem(last=False)
        self.last_route[(spec.sizes, m)] = step.route
        return step

    def _prepare(self, plan: _StepPlan) -> _Step:
        """The first route of ``_routes()`` whose step runs, captures and (if asked) verifies.

        Runs on fastbp's stream with the epoch's table and learning rate already set; leaves the
        parameters as they were.
        """
        routes = self._routes()
        if routes == ["eager"]:
            return _Step(plan, "eager", None)
        cp, state = self.xp, plan.st
        snapshot = plan.params.copy()

        def restore():
            cp.copyto(plan.params, snapshot)
            state.reset()

        reference = None
        if self.verify:
            restore()
            plan.issue("eager")
            reference = plan.params - snapshot
            restore()
        forced = self.step_route != "auto"
        for route in routes:
            if route == "eager":
                return _Step(plan, "eager", None)
            try:
                plan.issue(route)  # warm-up: loads every kernel, lets cuBLAS pick its algorithms
                restore()
                graph = self._capture(plan, route)
                if reference is not None:
                    graph.launch(self._stream)
                    error = self._update_error(plan.params - snapshot, reference)
                    restore()
                    if error is not None:
                        raise RuntimeError(f"its update differs from the eager step's (relative error {error:.2e})")
                return _Step(plan, route, graph)
            except Exception as exc:
                restore()
                if forced:
                    raise
                warnings.warn(f"fastbp cupy backend: step route {route!r} not used for sizes "
                              f"{list(plan.spec.sizes)}, batch {plan.m}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=4)
        raise AssertionError("the eager route always remains")

    def _capture(self, plan: _StepPlan, route: str):
        stream = self._stream
        stream.begin_capture()
        try:
            plan.issue(route)
        except BaseException:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        return stream.end_capture()

    def _update_error(self, update, reference) -> float | None:
        """None when two parameter updates agree (relative 2-norm), else the relative error."""
        cp = self.xp
        ref_norm = float(cp.linalg.norm(reference.astype(np.float64)))
        if not math.isfinite(ref_norm):
            return None  # a non-finite step: nothing to compare against
        error = float(cp.linalg.norm((update - reference).astype(np.float64)))
        if update.dtype == np.float64:
            tol = 1e-9
        else:
            tol = 3e-2 if self.tf32 else 2e-3
        if error <= tol * ref_norm:
            return None
        return error / ref_norm if ref_norm > 0 else math.inf
