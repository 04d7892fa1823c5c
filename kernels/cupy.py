"""CuPy backend: the kernel contract on an NVIDIA GPU, and a whole training step as a CUDA graph.

GEMMs go through cuBLAS (``cupy.matmul`` with ``out=``). Everything else runs fastbp's own CUDA
code in ``kernels/cuda/``: ``activations.cu`` defines each activation beside its derivative once,
and both the ElementwiseKernels here and the kernels of ``fastbp_kernels.cu`` (compiled by NVRTC
through ``cupy.RawModule``, once per dtype, cached on disk by CuPy) use it. The numbering of
activations, losses and update rules is ``kernels/base.py``'s (``ACT_CODE``, ``LOSS_CODE``,
``RULE_CODE``, ``HP_*``): :func:`cuda_defines` writes it, with this module's slot layouts, as the
``#define`` lines in front of the sources, so the ``.cu`` files carry no numbering of their own.
Meanings match the NumPy reference backend exactly, including the stable log_loss + sigmoid and
cross_entropy + softmax computed from the logits, float64 cost sums, and the update formulas
(``fb_update``: SGD with momentum / Nesterov / weight decay, Adam, AdamW, scikit-learn's l2).

Fused kernels: the output delta with its loss and correct count (one warp per example; the
summed cost comes back as a device 0-d array, no host sync), the bias + activation and
``phi'(z) (.) (delta @ W)`` epilogues, the bias reduction, one optimizer update over the flat
parameter buffer.

``train_epoch`` (the fast path of the fit loop) keeps the data on the device and runs each
mini-batch as one CUDA graph: batch gather, forward, fused output delta and loss, backward,
update, about 5 + 5 * n_layers kernels replayed with a single launch. The graph reads the data
set's address and size, the optimizer's hyper-parameters and state buffers, the step count and
the batch index from device memory, so one graph per network shape and batch size serves every
batch, epoch, model and optimizer setting (an lr schedule needs no new capture). A batch whose
cost is not finite sets a device flag that skips every later update; the flag, the summed cost,
the correct count and the number of examples done are read back once per epoch.

Inside a captured step the backward pass forks: each layer's weight and bias gradients run on a
second stream while the main stream computes the next delta, joined before the update (shorter
latency for small, launch-bound steps). ``FASTBP_CUPY_FORK=0`` keeps one serial chain.

Threads: every thread that trains gets its own streams, cuBLAS handles, epoch state, scratch
buffers and prepared steps (CuPy releases the GIL while it copies and launches, so two threads
sharing them would train on each other's batches). The compiled kernels are shared.

CuPy refuses cuBLAS calls while a stream captures (its cuBLAS ``setStream`` raises
NotImplementedError; cupy/cupy#6290), although cuBLAS itself supports stream capture (cuBLAS
docs, "CUDA Graphs Support"). So the captured step has two routes for its GEMMs:

``graph-cublas``
    cuBLAS through fastbp's own handles, called with ctypes. Each handle is bound to one of the
    thread's streams and to a user-owned workspace before capture, so a captured GEMM allocates
    nothing.
``graph-raw``
    fastbp's tiled GEMM (``fb_gemm`` in ``fastbp_kernels.cu``) with the bias + activation or
    the ``phi'`` Hadamard fused into its epilogue: fewer kernels, but no tensor cores.
``eager``
    No graph: cupy.matmul and the same fused kernels, launched one by one.

Environment variables, read when the backend is created:

``FASTBP_TF32``
    ``1``: float32 GEMMs may use TF32 tensor cores (compute capability 8.0 and newer): several
    times the FP32 peak, products rounded to a 10-bit mantissa. ``0``: full FP32. Unset: CuPy's
    own ``CUPY_TF32`` decides (off by default), so float32 means FP32 unless asked. One switch,
    ``backend.tf32``: CuPy's float32 matmuls (process-wide, CuPy's own setting), fastbp's cuBLAS
    handles and the verification tolerance follow it, and captured steps are made again after
    a change. fastbp's own GEMM kernel is always FP32.
``FASTBP_CUPY_STEP``
    ``auto`` (default): ``graph-cublas``, else ``graph-raw``, else ``eager``, taking the first
    that works here (a RuntimeWarning, and ``info()["cublas_direct_error"]``, say why cuBLAS
    could not be used); or one of those names to force it (an error if it does not work).
``FASTBP_CUPY_VERIFY``
    ``1`` (default): the first time a graph is made for a network and batch size, its step is
    checked against the eager step on the same batch (parameters and optimizer state restored
    afterwards); a graph that disagrees is dropped, with a RuntimeWarning, for the next route.
    ``0`` skips the check.
``FASTBP_CUPY_FORK``
    ``1`` (default) / ``0``: the second stream in captured steps, as above.

``create()`` imports CuPy (only this module does, and only then) and raises
``BackendUnavailableError`` saying why it cannot run here and how to fix it.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fastbp.errors import BackendUnavailableError

from . import base
from .base import (
    ACT_CODE,
    ELEMENTWISE_ACTIVATIONS,
    LEAKY_SLOPE,
    LOSS_CODE,
    LOSSES,
    N_HYPER,
    RULE_CODE,
    UPDATE_RULES,
    Backend,
    NetSpec,
    OptimizerState,
    UpdateRule,
)

STEP_ROUTES = ("graph-cublas", "graph-raw", "eager")

# This module's own codes and slot layouts, generated into the CUDA source beside base.py's
# numbering (cuda_defines): fb_gemm's epilogues, and the device arrays of _EpochState.
EPILOGUE_CODE = {"epi_none": 0, "epi_bias_act": 1, "epi_dact": 2}
TABLE_SLOT = {"tab_x": 0, "tab_y": 1, "tab_s0": 2, "tab_s1": 3}          # uint64 addresses
COUNTER_SLOT = {"ctr_batch": 0, "ctr_step": 1, "ctr_rows": 2}            # int64
STATUS_SLOT = {"st_cost": 0, "st_done": 1, "st_stop": 2, "st_correct": 3}  # float64
STOP_CODE = {"stop_nonfinite": 1, "stop_range": 2}                      # values of status[st_stop]

_EPI_NONE, _EPI_BIAS_ACT, _EPI_DACT = (EPILOGUE_CODE[k] for k in ("epi_none", "epi_bias_act", "epi_dact"))
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_GEMM_SHAPES = ((0, 1), (0, 0), (1, 0))  # (trans_a, trans_b): forward, hidden delta, weight grad
_GEMM_TILES = (32, 64)
_ROW_KERNELS = (
    "fb_bias_act", "fb_dact_inplace", "fb_softmax_rows", "fb_softmax_backward_rows", "fb_output_delta",
    "fb_bias_grad", "fb_bias_grad_finish", "fb_gather_batch", "fb_accumulate_loss", "fb_update",
)
_BLOCK = 256
_ROWS_PER_BLOCK = 4  # warps (rows) per block in the row-wise kernels
_NULL = np.uint64(0)  # a null pointer argument
_CUDA_DIR = Path(__file__).resolve().parent / "cuda"

_FIX_INSTALL = ("pip install 'cupy-cuda12x[ctk]' (NVIDIA driver for CUDA 12) or "
                "pip install 'cupy-cuda13x[ctk]' (driver for CUDA 13) -- from the fastbp checkout: "
                "pip install -e '.[cuda12]' or '.[cuda13]'; nvidia-smi shows the driver")
_FIX_DRIVER = ("install or update the NVIDIA driver until nvidia-smi works (cupy-cuda12x needs a "
               "driver for CUDA 12, >= 525; cupy-cuda13x one for CUDA 13, >= 580) and match the "
               "wheel to it: pip install 'cupy-cuda12x[ctk]' or 'cupy-cuda13x[ctk]'; "
               "without an NVIDIA GPU use a CPU backend: FASTBP_BACKEND=numba")
_FIX_NO_DEVICE = ("run on a machine with an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES) "
                  "after pip install 'cupy-cuda12x[ctk]', or use a CPU backend: FASTBP_BACKEND=numba")
_FIX_NOT_READY = ("the GPUs are there but not ready: on NVSwitch systems (HGX/DGX H100, H200, B200) "
                  "start the fabric manager (systemctl start nvidia-fabricmanager, its version equal to "
                  "the driver's) and check nvidia-smi -q for the fabric state; or use a CPU backend: "
                  "FASTBP_BACKEND=numba")
_FIX_ARCH = ("the installed CuPy has no kernels for this GPU's architecture: install the cupy wheel "
             "for the driver's CUDA major version (pip install 'cupy-cuda12x[ctk]' or 'cupy-cuda13x[ctk]'; "
             "a new GPU may need the newer one), or a CuPy built for this GPU; nvidia-smi "
             "--query-gpu=compute_cap --format=csv shows it")
_FIX_LIBS = ("pip install 'cupy-cuda12x[ctk]' (or 'cupy-cuda13x[ctk]' for a CUDA 13 driver) to get "
             "cuBLAS and NVRTC as wheels, or install the CUDA Toolkit")


# ---------------------------------------------------------------- selection


def _gpu_visibility() -> str:
    """Whether this machine shows an NVIDIA GPU at all, without importing CuPy: the driver's
    device nodes and nvidia-smi say so, so the error tells "install cupy" from "no GPU here"."""
    import glob
    import shutil

    devices = glob.glob("/dev/nvidia[0-9]*")
    if devices:
        return f"an NVIDIA GPU is visible: {len(devices)} device(s) under /dev"
    if shutil.which("nvidia-smi"):
        return "nvidia-smi is installed but no /dev/nvidia* device is visible"
    return "and no NVIDIA GPU is visible here: no /dev/nvidia* device, no nvidia-smi"


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
        raise BackendUnavailableError("cupy", f"cupy is not installed ({_gpu_visibility()})", _FIX_INSTALL) from None
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


# cudaError_t names (as CuPy's CUDARuntimeError spells them) -> (reason, fix), first match wins.
_DEVICE_ERRORS = (
    (("InsufficientDriver", "CallRequiresNewerDriver", "SystemDriverMismatch", "CompatNotSupported",
      "UnsupportedPtxVersion", "InitializationError"), "CUDA driver too old / not present", _FIX_DRIVER),
    (("SystemNotReady",), "CUDA system not ready", _FIX_NOT_READY),
    (("NoKernelImageForDevice", "InvalidKernelImage"), "no kernel image for this GPU", _FIX_ARCH),
    (("NoDevice", "InvalidDevice", "DevicesUnavailable"), "no CUDA device", _FIX_NO_DEVICE),
)


def _device_error(exc: BaseException) -> BackendUnavailableError:
    """Names what a CUDARuntimeError at the first device call means, and its fix."""
    message = str(exc)
    for codes, reason, fix in _DEVICE_ERRORS:
        if any(code in message for code in codes):
            return BackendUnavailableError("cupy", f"{reason} ({message})", fix)
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


def cuda_defines() -> str:
    """The ``#define`` lines in front of every CUDA source: kernels/base.py's numbering of
    activations, losses, rules and hyper-parameter slots, and this module's slot layouts."""
    hp_names = sorted((name for name in dir(base) if name.startswith("HP_")), key=lambda n: getattr(base, n))
    lines = ["// generated by kernels/cupy.py (cuda_defines) from kernels/base.py; not written by hand"]
    lines += [f"#define FB_{name.upper()} {code}" for name, code in ACT_CODE.items()]
    lines += [f"#define FB_{name.upper()} {code}" for name, code in LOSS_CODE.items()]
    lines += [f"#define FB_RULE_{name.upper()} {code}" for name, code in RULE_CODE.items()]
    lines += [f"#define FB_{name} {getattr(base, name)}" for name in hp_names]
    lines.append(f"#define FB_N_HYPER {N_HYPER}")
    lines.append(f"#define FB_LEAKY_SLOPE {float(LEAKY_SLOPE)!r}")
    for table in (EPILOGUE_CODE, TABLE_SLOT, COUNTER_SLOT, STATUS_SLOT, STOP_CODE):
        lines += [f"#define FB_{name.upper()} {code}" for name, code in table.items()]
    return "\n".join(lines) + "\n"


def elementwise_preamble() -> str:
    """What the ElementwiseKernels see: the numbering and the device functions."""
    return cuda_defines() + _read_cuda("activations.cu")


def module_source() -> str:
    """The CUDA source of fastbp's RawModule: the numbering, the device functions, the kernels."""
    return cuda_defines() + _read_cuda("activations.cu", "fastbp_kernels.cu")


def _gemm_name(t: str, trans_a: int, trans_b: int, tile: int) -> str:
    return f"fb_gemm<{t}, {int(trans_a)}, {int(trans_b)}, {tile}, {tile}>"


def _kname(name: str, t: str) -> str:
    return f"{name}<{t}>"


def kernel_names(t: str) -> list[str]:
    """Every name expression the RawModule of element type ``t`` ("float" | "double") instantiates."""
    names = [_gemm_name(t, ta, tb, tile) for ta, tb in _GEMM_SHAPES for tile in _GEMM_TILES]
    return names + [_kname(name, t) for name in _ROW_KERNELS]


def _gemm_tile(m: int, n: int, sm_count: int) -> int:
    """64 x 64 tiles when those alone give every multiprocessor a block, else 32 x 32."""
    return 64 if _cdiv(m, 64) * _cdiv(n, 64) >= sm_count else 32


def _grid_1d(total: int):
    """(grid, block) of a grid-stride elementwise kernel."""
    return (max(1, min(_cdiv(total, _BLOCK), 65535)),), (_BLOCK,)


def _grid_rows(m: int):
    """(grid, block) of a row-wise kernel: one warp per row."""
    return (max(1, _cdiv(m, _ROWS_PER_BLOCK)),), (32 * _ROWS_PER_BLOCK,)


def _grid_bias_act(m: int, k: int, sm_count: int):
    """fb_bias_act: threads across columns (a multiple of 32, at most 256), the rest of the block
    and a grid of about 8 blocks per multiprocessor across rows."""
    bx = min(_BLOCK, 32 * _cdiv(k, 32))
    by = _BLOCK // bx
    gx = _cdiv(k, bx)
    gy = max(1, min(_cdiv(m, by), _cdiv(8 * sm_count, gx), 65535))
    return (gx, gy), (bx, by)


def _bias_chunks(m: int, k: int, sm_count: int) -> tuple[int, int]:
    """(chunks, rows per chunk) of fb_bias_grad: enough row chunks for about 4 blocks per
    multiprocessor, each chunk at least 64 rows (8 per thread)."""
    col_blocks = _cdiv(k, 32)
    chunks = max(1, min(_cdiv(m, 64), _cdiv(4 * sm_count, col_blocks), 65535))
    rows = _cdiv(m, chunks)
    return _cdiv(m, rows), rows


def _grid_bias(k: int, chunks: int):
    return (max(1, _cdiv(k, 32)), chunks), (32, 8)


def _grid_gemm(m: int, n: int, tile: int):
    return (_cdiv(n, tile), _cdiv(m, tile)), (16, 16)


def _data_ptr(a) -> int:
    """Device address of a CuPy array (host address of a NumPy one); 0 for None."""
    if a is None:
        return 0
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


def weight_ranges(spec: NetSpec) -> np.ndarray:
    """``[start, end)`` of every layer's W in the flat buffer, as fb_update's ``w_ranges``."""
    return np.array([(w, b) for w, b in zip(spec.w_offsets, spec.b_offsets)], dtype=np.int64).reshape(-1)


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


def check_rule(spec: NetSpec, rule, state, *, xp=None) -> None:
    """ValueError/TypeError, before anything is touched, for a rule or state the kernels cannot run."""
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule must be an UpdateRule. Received: {type(rule).__name__}")
    if rule.kind not in UPDATE_RULES:
        raise ValueError(f"Received: rule.kind={rule.kind!r}. Expected one of {list(UPDATE_RULES)}")
    if not isinstance(state, OptimizerState):
        raise TypeError(f"state must be an OptimizerState. Received: {type(state).__name__}")
    need = rule.n_buffers
    if need:
        bufs = state.buffers
        shape = tuple(getattr(bufs, "shape", ()))
        if len(shape) != 2 or shape[0] < need or shape[1] != spec.n_params:
            raise ValueError(f"state.buffers has the wrong shape for rule {rule.kind!r}. Received: shape "
                             f"{shape}. Expected ({need} or more, {spec.n_params})")
        if np.dtype(bufs.dtype) != np.dtype(spec.dtype) or not bufs.flags.c_contiguous:
            raise ValueError(f"state.buffers must be C-contiguous {np.dtype(spec.dtype).name}. Received: "
                             f"{np.dtype(bufs.dtype).name}, c_contiguous={bufs.flags.c_contiguous}")
        if xp is not None and not isinstance(bufs, xp.ndarray):
            raise TypeError(f"state.buffers must live on the GPU. Received: {type(bufs).__module__}."
                            f"{type(bufs).__name__}. Expected {xp.__name__}.ndarray")


# ---------------------------------------------------------------- the training step


class _EpochState:
    """Device scalars a captured step reads and writes, so one graph serves every batch and epoch.

    ``table``: the data set's and the optimizer state's addresses (TABLE_SLOT); ``ctr``: the next
    batch, the optimizer's step count, the data set's rows (COUNTER_SLOT); ``status``: cost sum,
    examples done, stop code, correct count (STATUS_SLOT); ``hyper``: ``UpdateRule.hyper()``.
    """

    def __init__(self, xp) -> None:
        self.table = xp.zeros(len(TABLE_SLOT), dtype=np.uint64)
        self.ctr = xp.zeros(len(COUNTER_SLOT), dtype=np.int64)
        self.status = xp.zeros(len(STATUS_SLOT), dtype=np.float64)
        self.hyper = xp.zeros(N_HYPER, dtype=np.float64)
        self._start = np.zeros(len(COUNTER_SLOT), dtype=np.int64)

    def load(self, stream, X, Y, n: int, rule: UpdateRule, state: OptimizerState) -> None:
        """The epoch's data set, rule and optimizer state, written on ``stream`` (in order with
        the replays: ``set`` without a stream would copy on the legacy stream, unordered)."""
        bufs = state.buffers
        rows = int(bufs.shape[0]) if rule.n_buffers else 0
        table = np.zeros(len(TABLE_SLOT), dtype=np.uint64)
        table[TABLE_SLOT["tab_x"]], table[TABLE_SLOT["tab_y"]] = _data_ptr(X), _data_ptr(Y)
        if rows >= 1:
            table[TABLE_SLOT["tab_s0"]] = _data_ptr(bufs[0])
        if rows >= 2 and rule.n_buffers >= 2:
            table[TABLE_SLOT["tab_s1"]] = _data_ptr(bufs[1])
        self._start = np.zeros(len(COUNTER_SLOT), dtype=np.int64)
        self._start[COUNTER_SLOT["ctr_step"]] = state.steps
        self._start[COUNTER_SLOT["ctr_rows"]] = n
        self.table.set(table, stream=stream)
        self.hyper.set(rule.hyper(), stream=stream)
        self.rewind(stream)

    def rewind(self, stream) -> None:
        """Back to the epoch's start: batch 0, the loaded step count, nothing summed."""
        self.ctr.set(self._start, stream=stream)
        self.status.fill(0)


class _ParamSlot:
    """The parameters and gradients every prepared step of one network shape reads and writes.

    Captured GEMMs take their operands' addresses by value, so the graphs work on these fixed
    buffers, and ``train_epoch`` copies a model's parameters in before the replays and out after
    them (two device copies per epoch). No step refers to a model's own arrays: a new model of
    the same shape reuses the graphs, and a dropped model's memory is freed.
    """

    def __init__(self, xp, spec: NetSpec) -> None:
        dtype = np.dtype(spec.dtype)
        self.params = xp.empty(spec.n_params, dtype=dtype)
        self.grads = xp.zeros(spec.n_params, dtype=dtype)
        self.w_ranges = xp.asarray(weight_ranges(spec))


class _StepPlan:
    """One optimizer step on a batch of ``m`` rows as a fixed sequence of kernels on fixed buffers.

    Batch ``ctr[batch]`` starts at row ``ctr[batch] * stride`` of the data set named in
    ``state.table``. ``issue(route)`` launches the sequence; under stream capture it becomes the
    step's graph. Only ``xp`` (for allocation and, on the eager route, matmul), the ``kernels``
    table of callables ``kernel(grid, block, args)``, ``blas`` (graph-cublas: the main and the
    side stream's handle) and ``streams`` (main, side; side None: no fork) touch the device.
    """

    def __init__(self, spec: NetSpec, slot: _ParamSlot, m: int, stride: int, *, xp, kernels, state,
                 sm_count: int, blas=(None, None), streams=(None, None)) -> None:
        dtype = np.dtype(spec.dtype)
        self.spec, self.m, self.stride = spec, m, stride
        self.xp, self.k, self.st, self.sm_count = xp, kernels, state, sm_count
        self.blas, self.blas_side = blas
        self.main, self.side = streams
        self.T, self.t = dtype.type, _CTYPES[dtype]
        self.slot, self.params, self.grads = slot, slot.params, slot.grads
        self.W, self.b = _layer_views(spec, slot.params)
        self.dW, self.db = _layer_views(spec, slot.grads)
        sizes = spec.sizes
        self.xs = xp.empty((m, sizes[0]), dtype=dtype)
        self.ys = xp.empty((m, sizes[-1]), dtype=dtype)
        self.Z = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.A = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.D = [xp.empty((m, n), dtype=dtype) for n in sizes[1:]]
        self.row_loss = xp.empty((m,), dtype=np.float64)
        self.row_correct = xp.empty((m,), dtype=np.int32)
        self.chunks = [_bias_chunks(m, n, sm_count) for n in sizes[1:]]
        width = max(c * n for (c, _), n in zip(self.chunks, sizes[1:]) if c > 1) if any(
            c > 1 for c, _ in self.chunks) else 0
        self.partial = xp.empty((width,), dtype=dtype) if width else None  # one: the bias grads run in order
        if self.side is not None:
            event = xp.cuda.Event
            self.forks = [event(disable_timing=True) for _ in sizes[1:]]
            self.joined = event(disable_timing=True)

    def _launch(self, name: str, grid_block, args) -> None:
        grid, block = grid_block
        self.k[name](grid, block, args)

    def issue(self, route: str) -> None:
        spec, m, st, t, i32 = self.spec, self.m, self.st, self.t, np.int32
        sizes, n_layers = spec.sizes, spec.n_layers
        fork = self.side is not None and route != "eager"
        self._launch(_kname("fb_gather_batch", t), _grid_1d(m * (sizes[0] + sizes[-1])),
                     (st.table, st.ctr, st.status, self.xs, self.ys, i32(self.stride), i32(m),
                      i32(sizes[0]), i32(sizes[-1])))
        # forward: Z = A_prev W^T + b, A = phi(Z)
        for l in range(n_layers):
            n_in, n_out = sizes[l], sizes[l + 1]
            prev = self.xs if l == 0 else self.A[l - 1]
            act = ACT_CODE[spec.activation(l)]
            softmax = act == ACT_CODE["softmax"]
            self._gemm(route, 0, 1, m, n_out, n_in, prev, self.W[l], self.Z[l], epi=_EPI_BIAS_ACT,
                       act=ACT_CODE["identity"] if softmax else act, bias=self.b[l],
                       aout=None if softmax else self.A[l])
            if softmax:
                self._launch(_kname("fb_softmax_rows", t), _grid_rows(m),
                             (self.Z[l], self.A[l], i32(m), i32(n_out)))
        # output delta, cost and correct count, fused; the batch commits unless its cost is not finite
        self._launch(_kname("fb_output_delta", t), _grid_rows(m),
                     (self.Z[-1], self.A[-1], self.ys, self.D[-1], self.row_loss, self.row_correct,
                      i32(m), i32(sizes[-1]), i32(ACT_CODE[spec.output]), i32(LOSS_CODE[spec.loss])))
        self._launch(_kname("fb_accumulate_loss", t), ((1,), (256,)),
                     (self.row_loss, self.row_correct, i32(m), st.status, st.ctr))
        # backward: dW = D^T A_prev / m, db = sum(D) / m (on the side stream when forked),
        # D_prev = phi'(Z_prev) (.) (D W) on the main stream
        hidden = ACT_CODE[spec.hidden]
        for l in reversed(range(n_layers)):
            n_in, n_out = sizes[l], sizes[l + 1]
            if fork:
                self.forks[l].record(self.main)
                self.side.wait_event(self.forks[l])
                with self.side:
                    self._weight_grads(route, l, side=True)
            else:
                self._weight_grads(route, l)
            if l > 0:
                self._gemm(route, 0, 0, m, n_in, n_out, self.D[l], self.W[l], self.D[l - 1],
                           epi=_EPI_DACT, act=hidden, ez=self.Z[l - 1], ea=self.A[l - 1])
        if fork:
            self.joined.record(self.side)
            self.main.wait_event(self.joined)
        n_params = int(self.params.size)
        self._launch(_kname("fb_update", t), _grid_1d(n_params),
                     (self.params, self.grads, _NULL, _NULL, np.int64(n_params), st.hyper, st.ctr, np.int64(0),
                      i32(m), self.slot.w_ranges, i32(n_layers), st.table, st.status))

    def _weight_grads(self, route, l: int, side: bool = False) -> None:
        m, t, i32, T = self.m, self.t, np.int32, self.T
        n_in, n_out = self.spec.sizes[l], self.spec.sizes[l + 1]
        prev = self.xs if l == 0 else self.A[l - 1]
        inv_m = T(1.0 / m)
        self._gemm(route, 1, 0, n_out, n_in, m, self.D[l], prev, self.dW[l], alpha=1.0 / m, side=side)
        chunks, rows = self.chunks[l]
        partial = self.partial if chunks > 1 else _NULL
        self._launch(_kname("fb_bias_grad", t), _grid_bias(n_out, chunks),
                     (self.D[l], self.db[l], partial, i32(m), i32(n_out), i32(rows), inv_m, i32(0)))
        if chunks > 1:
            self._launch(_kname("fb_bias_grad_finish", t), _grid_1d(n_out),
                         (self.partial, self.db[l], i32(chunks), i32(n_out), inv_m, i32(0)))

    def _gemm(self, route, trans_a, trans_b, m, n, k, a, b, c, *, alpha=1.0, beta=0.0,
              epi=_EPI_NONE, act=0, bias=None, ez=None, ea=None, aout=None, side=False) -> None:
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
            (self.blas_side if side else self.blas).gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
                                                         beta, c, ldc)
        else:
            assert beta == 0.0, "the eager step never accumulates into c"
            self.xp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=c)
            if alpha != 1.0:
                self.xp.multiply(c, T(alpha), out=c)
        if epi == _EPI_BIAS_ACT:
            self._launch(_kname("fb_bias_act", self.t), _grid_bias_act(m, n, self.sm_count),
                         (c, bias, _opt(aout), i32(m), i32(n), i32(act)))
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


class _ThreadContext:
    """What one thread's GPU work owns: CuPy copies and launches release the GIL, so two threads
    sharing a stream, the epoch's device scalars, scratch buffers, a cuBLAS handle (bound to one
    stream and one workspace) or a prepared step would interleave on them."""

    def __init__(self, backend: "CupyBackend") -> None:
        cp = backend.xp
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.side = None
        self.state: _EpochState | None = None
        self.scratch: dict = {}
        self.hypers: OrderedDict = OrderedDict()  # UpdateRule -> its hyper() on the device
        self.ranges: dict = {}  # NetSpec -> weight_ranges on the device
        self.reset(backend)

    def reset(self, backend: "CupyBackend") -> None:
        """Drops what depends on the backend's settings (TF32, fork): handles, slots and steps."""
        self.generation = backend._generation
        self.blas = self.blas_side = None
        self.blas_tried = False
        self.steps: OrderedDict = OrderedDict()  # (spec, m, stride, route setting) -> _Step
        self.slots: dict = {}  # NetSpec -> _ParamSlot
        if backend.fork and self.side is None:
            self.side = backend.xp.cuda.Stream(non_blocking=True)
        elif not backend.fork:
            self.side = None

    def epoch_state(self, xp) -> _EpochState:
        if self.state is None:
            self.state = _EpochState(xp)
        return self.state

    def slot(self, xp, spec: NetSpec) -> _ParamSlot:
        slot = self.slots.get(spec)
        if slot is None:
            slot = self.slots[spec] = _ParamSlot(xp, spec)
        return slot


# ---------------------------------------------------------------- cuBLAS for captured steps


class _CublasDirect:
    """fastbp's own cuBLAS handle, called through ctypes so that its GEMMs can be captured.

    Bound once, outside any capture, to one stream and to a user-owned workspace (the cuBLAS
    docs' advice for graphs: no allocation inside the captured region). ``enums`` names the
    cudaDataType / cublasComputeType values (``R_32F``, ``R_64F``, ``COMPUTE_32F``,
    ``COMPUTE_32F_FAST_TF32``, ``COMPUTE_64F``); ``tf32`` picks float32's compute type.
    """

    WORKSPACE_BYTES = 32 << 20

    def __init__(self, lib, stream_ptr: int, workspace_ptr: int, workspace_bytes: int, enums: dict,
                 algo: int, *, tf32: bool = False, keepalive=None) -> None:
        self._lib, self._algo, self._keepalive, self.tf32 = lib, algo, keepalive, bool(tf32)
        compute32 = enums["COMPUTE_32F_FAST_TF32"] if tf32 else enums["COMPUTE_32F"]
        self._types = {
            np.dtype(np.float32): (enums["R_32F"], compute32, ctypes.c_float),
            np.dtype(np.float64): (enums["R_64F"], enums["COMPUTE_64F"], ctypes.c_double),
        }
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

    def __del__(self) -> None:
        destroy = getattr(getattr(self, "_lib", None), "cublasDestroy_v2", None)
        if destroy is not None and getattr(self, "handle", None):
            try:
                destroy(self.handle)
            except Exception:  # interpreter shutdown: the library may be gone already
                pass

    @classmethod
    def for_cupy(cls, cupy, stream, tf32: bool) -> "_CublasDirect":
        from cupy_backends.cuda.libs import cublas  # loads libcublas, as CuPy itself would

        runtime = cupy.cuda.runtime
        lib = _load_libcublas(runtime.runtimeGetVersion() // 1000)
        workspace = cupy.empty(cls.WORKSPACE_BYTES, dtype=np.uint8)  # lives as long as the handle
        enums = {"R_32F": runtime.CUDA_R_32F, "R_64F": runtime.CUDA_R_64F,
                 "COMPUTE_32F": cublas.CUBLAS_COMPUTE_32F,
                 "COMPUTE_32F_FAST_TF32": cublas.CUBLAS_COMPUTE_32F_FAST_TF32,
                 "COMPUTE_64F": cublas.CUBLAS_COMPUTE_64F}
        return cls(lib, stream.ptr, workspace.data.ptr, cls.WORKSPACE_BYTES, enums,
                   cublas.CUBLAS_GEMM_DEFAULT, tf32=tf32, keepalive=workspace)

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
    fork : bool, optional
        The second stream in captured steps; None reads ``FASTBP_CUPY_FORK`` (default on).
    """

    name = "cupy"
    is_gpu = True
    has_compiled_loop = False
    has_compiled_epoch = True
    _MAX_STEPS = 16  # prepared steps (graphs) kept per thread, least recently used dropped first
    _MAX_HYPERS = 32  # device copies of UpdateRule.hyper() kept per thread for update()

    def __init__(self, cupy, *, tf32=None, step_route=None, verify=None, fork=None) -> None:
        self.xp = cupy
        self._lock = threading.Lock()  # module compilation and the settings below
        self._local = threading.local()  # each thread's _ThreadContext
        self._generation = 0  # bumped when a setting that captured steps depend on changes
        self._modules: dict = {}
        self._blas_error: str | None = None
        self._warned_blas = False
        # how handles are made (tests substitute a stub library): (stream, tf32) -> handle
        self._blas_factory = lambda stream, tf32: _CublasDirect.for_cupy(cupy, stream, tf32)
        self.last_route: dict = {}  # (sizes, batch rows) -> route of the last step prepared
        self.step_route = step_route if step_route is not None else os.environ.get("FASTBP_CUPY_STEP", "auto")
        env_verify = _env_flag("FASTBP_CUPY_VERIFY")
        self.verify = bool(verify) if verify is not None else (env_verify is not False)
        env_fork = _env_flag("FASTBP_CUPY_FORK")
        self._fork = bool(fork) if fork is not None else (env_fork is not False)
        if tf32 is None:
            tf32 = _env_flag("FASTBP_TF32")
        if tf32 is None:
            tf32 = _env_flag("CUPY_TF32") or False
        self.device = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(self.device.id)
        self.sm_count = int(props["multiProcessorCount"])
        self._tf32 = self._apply_tf32(bool(tf32))

        pre = elementwise_preamble()
        kernel = cupy.ElementwiseKernel
        self._ew_act = kernel("T z, int32 act", "T out", "out = fb_act(act, z)", "fastbp_act", preamble=pre)
        self._ew_dact = kernel("T z, T a, int32 act", "T delta", "delta = delta * fb_dact(act, z, a)",
                               "fastbp_dact", preamble=pre)
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

    @property
    def tf32(self) -> bool:
        """Whether float32 GEMMs use TF32: CuPy's matmuls, fastbp's cuBLAS handles, the graphs."""
        return self._tf32

    @tf32.setter
    def tf32(self, want: bool) -> None:
        on = self._apply_tf32(bool(want))
        with self._lock:
            self._tf32 = on
            self._generation += 1  # every thread remakes its handles and graphs on next use

    @property
    def fork(self) -> bool:
        """Whether captured steps run the weight gradients on a second stream."""
        return self._fork

    @fork.setter
    def fork(self, value: bool) -> None:
        with self._lock:
            self._fork = bool(value)
            self._generation += 1

    def _apply_tf32(self, want: bool) -> bool:
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
            with self._lock:
                table = self._modules.get(dtype)
                if table is None:
                    names = kernel_names(_CTYPES[dtype])
                    module = self.xp.RawModule(code=module_source(), name_expressions=names)
                    table = self._modules[dtype] = {name: module.get_function(name) for name in names}
        return table

    def _ctx(self) -> _ThreadContext:
        """The calling thread's context, made on its first use and renewed after a setting change."""
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            with self.device:
                ctx = self._local.ctx = _ThreadContext(self)
        elif ctx.generation != self._generation:
            with self.device:
                ctx.reset(self)
        return ctx

    def _buf(self, tag: str, shape: tuple, dtype):
        scratch = self._ctx().scratch
        key = (tag, tuple(shape), np.dtype(dtype).str)
        buf = scratch.get(key)
        if buf is None:
            buf = scratch[key] = self.xp.empty(shape, dtype=dtype)
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
        blas = self._blas_handles(self._ctx())
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
            "step_fork": self.fork,
            "cublas_direct": None if blas is None else blas.library,
            # why the graph-cublas route cannot run here (auto then uses graph-raw), else None
            "cublas_direct_error": None if blas is not None else self._blas_error,
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
        chunks, rows = _bias_chunks(m, k, self.sm_count)
        t, T, i32 = _CTYPES[delta.dtype], delta.dtype.type, np.int32
        kernels = self._kernels(delta.dtype)
        partial = self._buf("bias_partial", (chunks * k,), delta.dtype) if chunks > 1 else _NULL
        kernels[_kname("fb_bias_grad", t)](
            *_grid_bias(k, chunks), (self._c(delta), target, partial, i32(m), i32(k), i32(rows), T(alpha),
                                     i32(bool(accumulate))))
        if chunks > 1:
            kernels[_kname("fb_bias_grad_finish", t)](
                *_grid_1d(k), (partial, target, i32(chunks), i32(k), T(alpha), i32(bool(accumulate))))
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
            self._ew_act(z, np.int32(ACT_CODE[name]), out)
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
            self._ew_dact(z, a, np.int32(ACT_CODE[name]), delta)
        else:
            raise ValueError(f"unknown activation {name!r}")

    def output_delta(self, loss, output, z, a, y, delta):
        return self._output(loss, output, z, a, y, delta)

    def loss_sum(self, loss, output, z, a, y):
        return self._output(loss, output, z, a, y, None)

    def _output(self, loss, output, z, a, y, delta):
        """fb_output_delta: the per-example costs (and deltas), summed on the device in float64: a 0-d array."""
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}")
        if output not in ACT_CODE:
            raise ValueError(f"unknown activation {output!r}")
        m, k = z.shape
        dtype = z.dtype
        if y.dtype != dtype:
            y = y.astype(dtype)
        target = None
        if delta is not None:
            target = delta if delta.flags.c_contiguous else self.xp.empty(delta.shape, dtype)
        rows = self._buf("row_loss", (m,), np.float64)
        grid, block = _grid_rows(m)
        self._kernels(dtype)[_kname("fb_output_delta", _CTYPES[dtype])](
            grid, block, (self._c(z), self._c(a), self._c(y), _opt(target), rows, _NULL, np.int32(m),
                          np.int32(k), np.int32(ACT_CODE[output]), np.int32(LOSS_CODE[loss])))
        if target is not None and target is not delta:
            delta[...] = target
        return rows.sum()

    def update(self, spec: NetSpec, rule: UpdateRule, params, grads, state: OptimizerState, rows: int):
        """fb_update on the current stream: the rule once over the flat buffers (see UpdateRule)."""
        check_rule(spec, rule, state, xp=self.xp)
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"Received: rows={rows!r}. Expected a positive int (the batch's examples)")
        ctx = self._ctx()
        bufs, need = state.buffers, rule.n_buffers
        s0 = bufs[0] if need >= 1 else _NULL
        s1 = bufs[1] if need >= 2 else _NULL
        ranges, n_layers = (self._weight_ranges(ctx, spec), spec.n_layers) if rule.l2 else (_NULL, 0)
        t = state.steps + 1
        n = int(params.size)
        self._kernels(params.dtype)[_kname("fb_update", _CTYPES[params.dtype])](
            *_grid_1d(n), (params, grads, s0, s1, np.int64(n), self._hyper(ctx, rule), _NULL, np.int64(t),
                           np.int32(rows), ranges, np.int32(n_layers), _NULL, _NULL))
        state.step[0] = t

    def _hyper(self, ctx: _ThreadContext, rule: UpdateRule):
        """The rule's hyper() on the device, one copy per distinct rule (an lr schedule makes one per epoch)."""
        hp = ctx.hypers.get(rule)
        if hp is None:
            hp = ctx.hypers[rule] = self.xp.asarray(rule.hyper())
            self.xp.cuda.get_current_stream().synchronize()  # written once, then read from any stream
            while len(ctx.hypers) > self._MAX_HYPERS:
                ctx.hypers.popitem(last=False)
        else:
            ctx.hypers.move_to_end(rule)
        return hp

    def _weight_ranges(self, ctx: _ThreadContext, spec: NetSpec):
        ranges = ctx.ranges.get(spec)
        if ranges is None:
            ranges = ctx.ranges[spec] = self.xp.asarray(weight_ranges(spec))
            self.xp.cuda.get_current_stream().synchronize()
        return ranges

    # ------------------------------------------------------------ the compiled epoch
    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str, rule: UpdateRule) -> bool:
        return (strategy == "vectorized" and np.dtype(spec.dtype) in _CTYPES
                and spec.hidden in ELEMENTWISE_ACTIVATIONS and spec.output in ACT_CODE
                and spec.loss in LOSSES and isinstance(rule, UpdateRule) and rule.kind in UPDATE_RULES)

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, rule: UpdateRule,
                    state: OptimizerState, strategy, order=None, next_order=None):
        """One epoch over the rows of ``X, Y`` in ``order`` (gathered on the device first; None:
        as they are), one graph replay per batch (see Backend.train_epoch).

        Returns ``(loss_sum, n_done, n_correct)`` as Python numbers: the one device-to-host read
        of the epoch. ``state.step`` advances by the batches applied.
        """
        if strategy != "vectorized":
            raise ValueError(f"Received: strategy={strategy!r}. Expected 'vectorized' (see supports_epoch)")
        if next_order is not None:
            raise ValueError("next_order: this backend draws no order (draws_next_order is False). "
                             f"Received: next_order of type {type(next_order).__name__}. Expected None")
        check_rule(spec, rule, state, xp=self.xp)
        cp = self.xp
        dtype = np.dtype(spec.dtype)
        X, Y = self.asarray(X, dtype), self.asarray(Y, dtype)
        n = int(X.shape[0])
        if n == 0:
            return 0.0, 0, 0
        if order is not None:  # the shuffled copy the graphs read (from the memory pool, each epoch)
            order = cp.asarray(order)  # fit passes index_array's; a host array is copied over
            if tuple(order.shape) != (n,) or order.dtype.kind not in "iu":
                raise ValueError(f"order must list the {n} rows to visit (integers in [0, {n})). Received: "
                                 f"shape {tuple(order.shape)}, dtype {order.dtype}")
            shuffled = self.empty(X.shape, dtype), self.empty(Y.shape, dtype)
            self.take_rows(X, order, shuffled[0])
            self.take_rows(Y, order, shuffled[1])
            X, Y = shuffled
        size = n if batch_size is None else max(1, min(int(batch_size), n))
        full, tail = divmod(n, size)
        ctx = self._ctx()
        caller = cp.cuda.get_current_stream()
        with self.device, ctx.stream:
            # the data, parameters or snapshot restores the caller queued come first
            ctx.stream.wait_event(caller.record())
            st = ctx.epoch_state(cp)
            slot = ctx.slot(cp, spec)
            st.load(ctx.stream, X, Y, n, rule, state)
            cp.copyto(slot.params, params)
            steps = []
            if full:
                steps.append((self._step_for(ctx, spec, slot, size, size, state), full))
            if tail:
                steps.append((self._step_for(ctx, spec, slot, tail, size, state), 1))
            for step, count in steps:
                step.run(count, ctx.stream)
            cp.copyto(params, slot.params)
            cp.copyto(grads, slot.grads)
            status = st.status.get(stream=ctx.stream)
        if int(status[STATUS_SLOT["st_stop"]]) == STOP_CODE["stop_range"]:
            raise RuntimeError(f"fastbp cupy backend: a batch reached past the {n} rows of the data set "
                               "(an internal error; no data was read out of range)")
        n_done = int(status[STATUS_SLOT["st_done"]])
        state.step[0] += _cdiv(n_done, size)  # the batches applied; the device counted the same
        return float(status[STATUS_SLOT["st_cost"]]), n_done, int(status[STATUS_SLOT["st_correct"]])

    def _blas_handles(self, ctx: _ThreadContext):
        """The thread's cuBLAS handle for captured GEMMs (and its side stream's), or None (reason in
        ``_blas_error``, reported by ``info()``)."""
        if not ctx.blas_tried:
            ctx.blas_tried = True
            try:
                ctx.blas = self._blas_factory(ctx.stream, self.tf32)
                ctx.blas_side = self._blas_factory(ctx.side, self.tf32) if ctx.side is not None else None
                self._blas_error = None
            except Exception as exc:
                ctx.blas = ctx.blas_side = None
                self._blas_error = f"{type(exc).__name__}: {exc}"
        return ctx.blas

    def _routes(self, ctx: _ThreadContext) -> list[str]:
        if self.step_route != "auto":
            if self.step_route == "graph-cublas" and self._blas_handles(ctx) is None:
                raise RuntimeError(f"FASTBP_CUPY_STEP=graph-cublas: no cuBLAS handle ({self._blas_error})")
            return [self.step_route]
        if self._blas_handles(ctx) is None:
            if not self._warned_blas:
                self._warned_blas = True
                warnings.warn(
                    f"fastbp cupy backend: captured steps cannot call cuBLAS ({self._blas_error}); they use "
                    "fastbp's own GEMM kernel (route graph-raw), several times slower on large layers. "
                    "info()['cublas_direct_error'] keeps the reason; FASTBP_CUPY_STEP=graph-cublas makes it "
                    "an error", RuntimeWarning, stacklevel=5)
            return ["graph-raw", "eager"]
        return ["graph-cublas", "graph-raw", "eager"]

    def _step_for(self, ctx: _ThreadContext, spec, slot, m, stride, state) -> _Step:
        key = (spec, m, stride, self.step_route)  # no model's arrays: any model of this shape reuses it
        step = ctx.steps.get(key)
        if step is not None:
            ctx.steps.move_to_end(key)
            return step
        routes = self._routes(ctx)
        plan = _StepPlan(spec, slot, m, stride, xp=self.xp, kernels=self._kernels(spec.dtype),
                         state=ctx.state, sm_count=self.sm_count, blas=(ctx.blas, ctx.blas_side),
                         streams=(ctx.stream, ctx.side))
        step = ctx.steps[key] = self._prepare(ctx, plan, routes, state)
        while len(ctx.steps) > self._MAX_STEPS:
            ctx.steps.popitem(last=False)
        live = {k[0] for k in ctx.steps}
        for old in [s for s in ctx.slots if s not in live]:
            del ctx.slots[old]  # no step of that shape is left: its parameter copy goes too
        self.last_route[(spec.sizes, m)] = step.route
        return step

    def _prepare(self, ctx: _ThreadContext, plan: _StepPlan, routes: list[str], state: OptimizerState) -> _Step:
        """The first route of ``routes`` whose step runs, captures and (if asked) verifies.

        Runs on the thread's stream with the epoch's state already loaded; leaves the parameters,
        the optimizer state and the epoch state as they were.
        """
        if routes == ["eager"]:
            return _Step(plan, "eager", None)
        cp, st = self.xp, plan.st
        snapshot = plan.params.copy()
        bufs = state.buffers if getattr(state.buffers, "size", 0) else None
        saved = bufs.copy() if bufs is not None else None

        def restore():
            cp.copyto(plan.params, snapshot)
            if saved is not None:
                cp.copyto(bufs, saved)
            st.rewind(ctx.stream)

        reference = None
        if self.verify:
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
                graph = self._capture(ctx.stream, plan, route)
                if reference is not None:
                    graph.launch(ctx.stream)
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
                              RuntimeWarning, stacklevel=5)
        raise AssertionError("the eager route always remains")

    @staticmethod
    def _capture(stream, plan: _StepPlan, route: str):
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
