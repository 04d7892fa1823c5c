"""The Numba-compiled kernels behind ``kernels/numba.py``; importing this module imports numba.

Everything here is ``@njit(cache=True, error_model="numpy")`` and writes into caller-owned
arrays, on the calling thread, except the update passes of wide layers and, per example, a
wide first layer's rows, which may be split among MKL's threads ("update passes on the BLAS
threads"). Fast-math is explicit on every function (``fastmath=False`` unless
it is a dot-product loop): a Numba function that leaves it unset inherits its caller's, and
being compiled first from a fast-math caller (the per-example small kernels) once made the
plain SGD step use FMA, 1 ulp off NumPy's, depending on which kernel a process compiled first.
An ``inline="always"`` function is compiled with its caller's flags whatever it states, so
arithmetic that must round one way wherever it lands is written with operations fast-math
cannot touch: ``_fma`` (the float32 exp) and ``_mul``/``_add``/``_sub``/``_div`` (the update rules).
``error_model="numpy"`` because Python's model puts a ZeroDivisionError check on every float
division, and that branch kept LLVM from vectorizing any loop that divides: Adam's update
(``m / (sqrt(v) ... + eps)``) ran 12-25x slower with it (203k parameters: 0.5-1.1 ms against
41 us, float32), and so did every loop indexed by a signed offset (momentum 280 vs 29 us).
Division by zero gives inf/NaN, as in NumPy.

Call sites pass offsets as int64 and flags as ``np.bool_``: a literal (``0``, ``True``) or a
uint64 argument makes Numba compile another specialisation of the callee (56 instead of 42
per dtype, several seconds of cold compile). Names become small integer codes (``ACT_CODE``,
``LOSS_CODE``) so one compiled function serves every activation and loss; the branch on a
code sits outside the inner loops, which stay branch-free and vectorize.

The row-level kernels take flat arrays plus an offset (``z[lo:lo+k]`` is one example's
layer) rather than slices: a slice is an array object with a reference count, and making a
few per layer per example cost more than the arithmetic of a tiny network (2-8-1 SGD:
730 ns per example with slices, ~310 ns without).

Reading order follows the math: activations (value beside derivative), the fused output
layer (loss value beside its delta), the batch kernels the model calls one by one, the
update rule, then the compiled per-example loops (layer by layer, and fused into one loop
for one hidden layer) and the compiled mini-batch epoch (plain SGD inside its GEMMs).

Numerics mirror ``kernels/numpy.py``: a stable sigmoid, log_loss+sigmoid and
cross_entropy+softmax from the logits without cancellation, any other output/loss pair
through the clipped activation (``dc/da``, zero where clipping bit, then ``phi'``), leaky
slope ``LEAKY_SLOPE``. Costs are accumulated in float64 for both dtypes. Constants are
made with ``type(x)(c)`` so float32 arithmetic stays float32 (a bare Python float would
promote it to float64).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import blas as _blas
from .numba_random import shuffle_step
from .base import (ACT_CODE, HP_BETA1, HP_BETA2, HP_EPS, HP_KIND, HP_L2, HP_LR, HP_MOMENTUM, HP_NESTEROV,
                   HP_WEIGHT_DECAY, LEAKY_SLOPE, LOSS_CODE, RULE_CODE)

# The numbering is kernels/base.py's (shared with the CUDA sources); bound to names here
# because compiled code reads module-level integers as constants.
SIGMOID, RELU, TANH, IDENTITY, LEAKY_RELU, SOFTMAX = (ACT_CODE[k] for k in
                                                     ("sigmoid", "relu", "tanh", "identity", "leaky_relu", "softmax"))
MSE, LOG_LOSS, CROSS_ENTROPY = (LOSS_CODE[k] for k in ("mse", "log_loss", "cross_entropy"))
SGD, ADAM, ADAMW = (RULE_CODE[k] for k in ("sgd", "adam", "adamw"))

# Offsets into flat arrays are unsigned: Numba wraps negative signed indices (idx < 0 ->
# idx + len), and that select in an inner loop stops LLVM from vectorizing it (a 784x128
# matrix-vector product ran 15x slower with signed offsets). Range variables starting at 0
# are known non-negative and need no cast.
_U = np.uint64

# Only the dot-product loops get fast-math, and only the two flags that let LLVM split a
# float sum into SIMD lanes and use FMA; NaN/Inf semantics stay IEEE everywhere.
_DOT_MATH = {"reassoc", "contract"}

# The BLAS ?gemm of kernels/blas.py (SciPy's OpenBLAS or MKL, bound by name in LLVM's symbol
# table before any kernel links, so cached machine code serves either library). Fortran
# calling convention: every argument by pointer.
_N, _T = ord("n"), ord("t")  # ?gemm's transpose characters
_blas.bind_if_possible()


@intrinsic
def _fortran_gemm(typingctx, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
    """``fastbp_?gemm(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)`` (column-major,
    the Fortran convention) on the arrays' data: the scalars go by pointer to stack slots in
    the entry block, the arrays as their data pointers. Done in LLVM IR because the same call
    from Python-level Numba code needed three small heap arrays and thirteen ``.ctypes`` views
    per GEMM, each view a reference-counted object (an atomic increment and decrement)."""
    if not (isinstance(C, types.Array) and C.dtype in (types.float32, types.float64)
            and isinstance(alpha, types.Float) and isinstance(beta, types.Float)):
        return None  # alpha and beta must be floats: an integer would be passed as a dimension is
    sig = types.void(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)

    def codegen(context, builder, signature, args):
        tys = signature.args
        ptr = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr] * 13),
                                            _blas.SYMBOLS[str(C.dtype)])
        real = context.get_value_type(C.dtype)
        out = []
        for value, ty in zip(args, tys):
            if isinstance(ty, types.Array):
                out.append(builder.bitcast(context.make_array(ty)(context, builder, value).data, ptr))
                continue
            if isinstance(ty, types.Float):
                llty, value = real, context.cast(builder, value, ty, C.dtype)
            elif len(out) < 2:  # the transpose characters
                llty, value = ir.IntType(8), builder.trunc(value, ir.IntType(8))
            else:  # dimensions and leading dimensions: Fortran INTEGER
                llty, value = ir.IntType(32), builder.trunc(value, ir.IntType(32))
            slot = cgutils.alloca_once(builder, llty)
            builder.store(value, slot)
            out.append(builder.bitcast(slot, ptr))
        builder.call(fn, out)
        return context.get_dummy_value()

    return sig, codegen

# ============================================================ borrowed arrays
# Numba counts references to every array a function binds: each call that takes arrays
# increfs them on entry and decrefs them on exit, and so does each slice or reshape, with an
# atomic read-modify-write apiece: in a small network's compiled epoch that was a fifth of the
# time (benchmarks/results/refcount-profile-20261202.json). The epochs therefore work on borrowed views:
# the same data, shape and strides with no meminfo, so the counting is a null test. Safe
# because the caller's arrays outlive the call and no view escapes it (the epochs return
# scalars).


@intrinsic
def _borrowed(typingctx, a):
    """``a`` without its reference-counted owner (meminfo NULL): a view for the duration of
    the calling compiled function only."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import populate_array
        src = context.make_array(a)(context, builder, value=args[0])
        out = context.make_array(a)(context, builder)
        populate_array(out, data=src.data, shape=src.shape, strides=src.strides, itemsize=src.itemsize,
                       meminfo=None)
        return out._getvalue()

    return a(a), codegen


@intrinsic
def _alive(typingctx, a):
    """No code: a use of the owned array ``a`` after the calls that take borrowed views of it,
    so Numba does not free it before those calls return (it frees an array after its last
    use, and ``_borrowed(a)`` would otherwise be a's last use)."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(a), codegen


# ============================================================ denormals
# The training epochs run with denormals flushed to zero (MXCSR's FTZ and DAZ bits, set on entry
# and restored on exit, on the calling thread only). Adam's and momentum's moments of weights
# whose gradient stays zero (an off ReLU's row) decay into the denormal range and stay there
# (0.9 times the smallest denormal rounds back to itself), and every operation on one costs a
# microcode assist: 784-128-10 per example with Adam ran 37 us an example against ~19 with them
# flushed. The values flushed are below 1.2e-38 (float32) / 2.2e-308 (float64): no result in
# any tolerance changes, the same trade XLA and oneDNN make.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
FTZ_DAZ = np.uint32(0x8040)


@intrinsic
def _mxcsr_get(typingctx):
    """MXCSR, the x86 SSE control/status register."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        fnty = ir.FunctionType(ir.VoidType(), [slot.type])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr"), [slot])
        return builder.load(slot)

    return types.uint32(), codegen


@intrinsic
def _mxcsr_set(typingctx, bits):
    """Load ``bits`` into MXCSR."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        builder.store(args[0], slot)
        fnty = ir.FunctionType(ir.VoidType(), [slot.type])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr"), [slot])
        return context.get_dummy_value()

    return types.none(types.uint32), codegen


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def flush_denormals():
    """Set FTZ and DAZ; returns the MXCSR to hand to ``restore_denormals`` (0 off x86)."""
    if _X86:
        old = _mxcsr_get()
        _mxcsr_set(old | FTZ_DAZ)
        return old
    return np.uint32(0)


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def restore_denormals(old):
    if _X86:
        _mxcsr_set(old)


# ============================================================ activations: value beside derivative


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_F32 = np.float32
_EXP_F32_MIN = _F32(-87.33)  # e^x below this is under float32's smallest normal: 0 (flushed anyway)


def exp_nonpositive(x):
    """``e^x`` for ``x <= 0`` (NaN stays NaN): the sigmoid, softmax and log-loss exps."""
    return np.exp(x)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a b + c`` rounded once (``llvm.fma``) for floats of one type. A call, not an
    fmul/fadd pair: a fast-math caller's contraction and reassociation cannot re-round it, so a
    kernel written with it rounds alike inlined anywhere (``exp_nonpositive``)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [t], ir.FunctionType(t, [t, t, t]))
        return builder.call(fn, args)

    return a(a, a, a), codegen


@overload(exp_nonpositive)
def _exp_nonpositive(x):
    # float32: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial, 2^k
    # built in the exponent bits), within 1.02 ulp of the exact value, branch-free, so LLVM
    # vectorizes the loops it sits in; libm's expf is a call per element (no SVML in this
    # Numba). Every multiply-add is one ``_fma``: the same rounding in a fast-math caller as
    # elsewhere, and half the latency of a multiply then an add (the exp is on a small net's
    # critical path: 2-8-1 SGD ~15% faster, benchmarks/results/exp-fma-ab-xeon-spr-20261202.json).
    # float64: np.exp (libm), unchanged.
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp_f32(x):
        xc = min(x, _F32(0.0)) if x >= _EXP_F32_MIN else _EXP_F32_MIN  # NaN -> MIN: k stays an integer
        k = np.floor(_fma(xc, _F32(1.44269504088896341), _F32(0.5)))
        r = _fma(-k, _F32(0.693359375), xc)
        r = _fma(-k, _F32(-2.12194440e-4), r)
        p = _fma(_F32(1.9875691500e-4), r, _F32(1.3981999507e-3))
        p = _fma(p, r, _F32(8.3334519073e-3))
        p = _fma(p, r, _F32(4.1665795894e-2))
        p = _fma(p, r, _F32(1.6666665459e-1))
        p = _fma(p, r, _F32(5.0000001201e-1))
        p = _fma(p * r, r, r) + _F32(1.0)
        e = p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        e = _F32(0.0) if x < _EXP_F32_MIN else e
        return x if x != x else e  # NaN in, NaN out

    return exp_f32


@intrinsic
def _float32_bits(typingctx, x):
    """The IEEE bits of the float32 ``x`` as an int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _log1p_small(f, k, tail):
    """Cephes' logf core, ``log(1 + f + t) + k ln 2`` for f in [sqrt(1/2) - 1, sqrt(2) - 1]
    and ``tail = t / (1 + f)`` below f's last bit: a degree-8 polynomial, within ~1.5 ulp;
    every multiply-add one ``_fma`` (see exp_f32)."""
    z = f * f
    p = _fma(_F32(7.0376836292e-2), f, _F32(-1.1514610310e-1))
    p = _fma(p, f, _F32(1.1676998740e-1))
    p = _fma(p, f, _F32(-1.2420140846e-1))
    p = _fma(p, f, _F32(1.4249322787e-1))
    p = _fma(p, f, _F32(-1.6668057665e-1))
    p = _fma(p, f, _F32(2.0000714765e-1))
    p = _fma(p, f, _F32(-2.4999993993e-1))
    p = _fma(p, f, _F32(3.3333331174e-1))
    y = _fma(p * f, z, _F32(-0.5) * z)
    return _fma(k, _F32(0.693359375), f + (_fma(k, _F32(-2.12194440e-4), y) + tail))


def log1p_unit(x):
    """``log(1 + x)`` for x in [0, 1] (NaN stays NaN): the log-loss tail ``log1p(e^-|z|)``."""
    return np.log1p(x)


def log_positive(x):
    """``log x`` for x >= 1 (NaN and inf stay themselves): softmax's log of its exps' sum."""
    return np.log(x)


# float32: Cephes' logf inline, where libm's is a call per example on the output layer's
# critical path (2-8-1 log loss, a softmax row); float64: libm, unchanged.
@overload(log1p_unit)
def _log1p_unit(x):
    if x != types.float32:
        return lambda x: np.log1p(x)

    def log1p_f32(x):  # 1 + x is never formed (it would round): f = x, or (x - 1)/2 plus ln 2
        low = x < _F32(0.41421356237)
        s = x - _F32(1.0)  # rounds for x < 1/2; lost = what it dropped (Fast2Sum, exact)
        lost = x - (s + _F32(1.0))
        f = s * _F32(0.5)
        return _log1p_small(x if low else f, _F32(0.0) if low else _F32(1.0),
                            _F32(0.0) if low else lost * _F32(0.5) * (_F32(1.0) - f))

    return log1p_f32


@overload(log_positive)
def _log_positive(x):
    if x != types.float32:
        return lambda x: np.log(x)

    def log_f32(x):  # x = m 2^e with m in [sqrt(1/2), sqrt(2)) from the bits
        bits = _float32_bits(x)
        e = (bits >> np.int32(23)) - np.int32(127)
        m = _float32_from_bits((bits & np.int32(0x7FFFFF)) | np.int32(0x3F800000))  # [1, 2)
        big = m >= _F32(1.41421356237)
        f = m * _F32(0.5) - _F32(1.0) if big else m - _F32(1.0)
        y = _log1p_small(f, _F32(e + np.int32(1)) if big else _F32(e), _F32(0.0))
        return y if x < _F32(np.inf) else x

    return log_f32


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _sigmoid(x):
    # One exp of -|x|: never overflows, full relative precision on both tails.
    one = type(x)(1.0)
    e = exp_nonpositive(-abs(x))
    r = one / (one + e)
    return r if x >= 0 else e * r


@njit(cache=True, error_model="numpy", fastmath=False)
def act_range(code, z, a, lo, k):
    """``a[lo:lo+k] = phi(z[lo:lo+k])``; softmax treats the range as one example."""
    lo, k = _U(lo), _U(k)
    if code == SIGMOID:
        for i in range(lo, lo + k):
            a[i] = _sigmoid(z[i])
    elif code == RELU:  # max(z, 0); NaN stays NaN as in np.maximum
        for i in range(lo, lo + k):
            x = z[i]
            a[i] = type(x)(0.0) if x <= 0 else x
    elif code == LEAKY_RELU:  # max(z, slope z)
        for i in range(lo, lo + k):
            x = z[i]
            a[i] = x * type(x)(LEAKY_SLOPE) if x <= 0 else x
    elif code == TANH:
        for i in range(lo, lo + k):
            a[i] = np.tanh(z[i])
    elif code == IDENTITY:
        for i in range(lo, lo + k):
            a[i] = z[i]
    else:  # softmax: exp(z - max) / sum
        m = z[lo]
        for i in range(lo + _U(1), lo + k):
            if z[i] > m:
                m = z[i]
        s = type(m)(0.0)
        for i in range(lo, lo + k):
            e = exp_nonpositive(z[i] - m)
            a[i] = e
            s += e
        for i in range(lo, lo + k):
            a[i] /= s


@njit(cache=True, error_model="numpy", fastmath=False)
def dact_range(code, z, a, d, lo, k):
    """``d[lo:lo+k] = phi'(z) (.) d`` in place (softmax: the vector-Jacobian product)."""
    lo, k = _U(lo), _U(k)
    if code == SIGMOID:  # a (1 - a)
        for i in range(lo, lo + k):
            d[i] *= (type(a[i])(1.0) - a[i]) * a[i]
    elif code == TANH:  # 1 - a^2
        for i in range(lo, lo + k):
            d[i] *= type(a[i])(1.0) - a[i] * a[i]
    elif code == RELU:  # 1 where z > 0, else 0 (z == 0 counts as off, as in the NumPy backend)
        for i in range(lo, lo + k):
            if z[i] <= 0:
                d[i] = d[i] * 0
    elif code == LEAKY_RELU:
        for i in range(lo, lo + k):
            if z[i] <= 0:
                d[i] = d[i] * type(d[i])(LEAKY_SLOPE)
    elif code == SOFTMAX:  # J^T g = a (.) (g - <a, g>)
        s = type(d[lo])(0.0)
        for i in range(lo, lo + k):
            s += a[i] * d[i]
        for i in range(lo, lo + k):
            d[i] = (d[i] - s) * a[i]


# ============================================================ the output layer: loss beside delta


@njit(cache=True, error_model="numpy", fastmath=False)
def output_range(loss, code, z, a, d, lo, Y, row, want_delta):
    """One example's cost (float64) and, when ``want_delta``, ``d = dc/dz``.

    The example is ``z[lo:lo+k]`` (k = Y.shape[1]) with targets ``Y[row]``. Replaces the
    unfused loss, ``dc/da`` and ``phi'`` passes with one pass over the row;
    log_loss+sigmoid and cross_entropy+softmax work from the logits ``z``.
    """
    k, lo = _U(Y.shape[1]), _U(lo)
    cost = 0.0
    if loss == MSE:  # c = 1/2 |a - y|^2, dc/da = a - y
        for j in range(k):
            r = a[lo + j] - Y[row, j]
            cost += 0.5 * float(r) * float(r)
            if want_delta:
                d[lo + j] = r
        if want_delta:
            dact_range(code, z, a, d, np.int64(lo), np.int64(k))
        return cost
    if loss == LOG_LOSS and code == SIGMOID:  # c = (1-y) softplus(z) + y softplus(-z), dc/dz = a - y
        for j in range(k):
            x, t = float(z[lo + j]), float(Y[row, j])
            tail = np.log1p(np.exp(-abs(x)))  # softplus(+-x) = max(+-x, 0) + tail: no cancellation
            cost += (1.0 - t) * (max(x, 0.0) + tail) + t * (max(-x, 0.0) + tail)
            if want_delta:
                d[lo + j] = a[lo + j] - Y[row, j]
        return cost
    if loss == CROSS_ENTROPY and code == SOFTMAX:  # c = sum_j y_j (lse(z) - z_j), dc/dz = a sum(y) - y
        # lse(z) - z_j as log sum exp(z - max) - (z_j - max): no cancellation against the max
        m = float(z[lo])
        for j in range(_U(1), k):
            m = max(m, float(z[lo + j]))
        s = 0.0
        for j in range(k):
            s += np.exp(float(z[lo + j]) - m)
        log_s = np.log(s)
        sy = type(Y[row, 0])(0.0)
        for j in range(k):
            cost += float(Y[row, j]) * (log_s - (float(z[lo + j]) - m))
            sy += Y[row, j]
        if want_delta:
            for j in range(k):
                d[lo + j] = a[lo + j] * sy - Y[row, j]
        return cost
    # Any other output activation: the loss on the clipped activation, dc/da, then phi'.
    one = type(a[lo])(1.0)
    eps = type(a[lo])(np.finfo(a.dtype).eps)
    for j in range(k):
        aj = a[lo + j]
        ac = min(max(aj, eps), one - eps)
        if loss == LOG_LOSS:  # dc/da = (a - y) / (a (1 - a))
            cost -= float(Y[row, j]) * np.log(float(ac)) + (1.0 - float(Y[row, j])) * np.log(1.0 - float(ac))
            if want_delta:
                d[lo + j] = (ac - Y[row, j]) / ((one - ac) * ac)
        else:  # cross_entropy: dc/da = -y / a
            cost -= float(Y[row, j]) * np.log(float(ac))
            if want_delta:
                d[lo + j] = -(Y[row, j] / ac)
        if want_delta and ac != aj:  # the cost saw the clipped a: flat there, no gradient
            d[lo + j] = 0
    if want_delta:
        dact_range(code, z, a, d, np.int64(lo), np.int64(k))
    return cost


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def output_layer(loss, code, z, a, d, lo, k, Y, row, scale):
    """The whole output layer of one example from its logits: ``a = phi(z)``, ``d = scale dc/dz``
    and the cost, for the compiled paths (``scale = 1/n`` makes d the mean cost's delta). The
    example is ``z[lo:lo+k]`` with targets ``Y[row]`` (k = Y.shape[1], passed in so that a kernel
    with the output count as a constant unrolls these loops).

    Replaces ``act_range`` + ``output_range``: for softmax+cross_entropy and sigmoid+log_loss
    each exp is computed once and serves the activation, the cost and the delta (the output
    layer's exps dominated a small batch's elementwise time). Inlined where it is called (the
    per-example epochs, ``output_rows``): a call is a cost per example of its own, and the
    epochs' arrays are borrowed (``_borrowed``), so the inlined copies count no references."""
    k, lo = _U(k), _U(lo)
    if loss == CROSS_ENTROPY and code == SOFTMAX:
        m = z[lo]
        for j in range(_U(1), k):
            if z[lo + j] > m:
                m = z[lo + j]
        s = type(m)(0.0)
        for j in range(k):
            e = exp_nonpositive(z[lo + j] - m)
            a[lo + j] = e
            s += e
        inv_s = type(m)(1.0) / s
        log_s = float(log_positive(s))
        cost = 0.0
        sy = type(m)(0.0)
        for j in range(k):
            a[lo + j] *= inv_s
            t = Y[row, j]
            sy += t
            if t != 0:  # one-hot targets: one term per example
                cost += float(t) * (log_s - float(z[lo + j] - m))
        for j in range(k):
            d[lo + j] = (a[lo + j] * sy - Y[row, j]) * scale
        return cost
    if loss == LOG_LOSS and code == SIGMOID:
        cost = 0.0
        for j in range(k):
            x = z[lo + j]
            one = type(x)(1.0)
            e = exp_nonpositive(-abs(x))
            r = one / (one + e)
            a[lo + j] = r if x >= 0 else e * r
            t, xf = float(Y[row, j]), float(x)
            tail = float(log1p_unit(e))
            cost += (1.0 - t) * (max(xf, 0.0) + tail) + t * (max(-xf, 0.0) + tail)
            d[lo + j] = (a[lo + j] - Y[row, j]) * scale
        return cost
    act_range(code, z, a, np.int64(lo), np.int64(k))
    cost = output_range(loss, code, z, a, d, np.int64(lo), Y, row, np.bool_(True))
    for j in range(k):
        d[lo + j] *= scale
    return cost


@njit(cache=True, error_model="numpy", fastmath=False)
def output_rows(loss, code, Z, A, D, Y, n, scale):
    """``output_layer`` for the first ``n`` rows of a batch's flat ``Z, A, D``; returns the
    summed cost. The rows loop in here rather than around a call: a call that takes arrays
    increfs and decrefs each of them (an atomic read-modify-write apiece; measured in
    benchmarks/results/refcount-profile-20261202.json)."""
    k = Y.shape[1]
    if loss == CROSS_ENTROPY and code == SOFTMAX:
        return _softmax_rows(Z, A, D, Y, n, k, scale)
    total = 0.0
    for r in range(n):
        total += output_layer(loss, code, Z, A, D, r * k, k, Y, r, scale)
    return total


@njit(cache=True, error_model="numpy", fastmath=False)
def _softmax_rows(Z, A, D, Y, n, k, scale):
    """``output_layer``'s softmax + cross-entropy for ``n`` rows, rounding alike (each row's max,
    sum and cost in the same order), but laid out for SIMD: the exps in one flat loop over the
    batch, the maxima and sums column by column across the rows, the logs in a loop of their
    own. Row by row, each exp was a scalar call beside the sum's serial chain: 2.58 vs 0.80 us
    for a 64-64-10 batch of 32 (benchmarks/results/batch-step-ab-20261208T021208Z.json)."""
    k, n = _U(k), _U(n)
    buf = np.empty(4 * n, Z.dtype)
    M, S, SY, LOG = buf[:n], buf[n:2 * n], buf[2 * n:3 * n], buf[3 * n:]
    for r in range(n):
        M[r] = Z[r * k]
    for j in range(_U(1), k):
        for r in range(n):
            z = Z[r * k + j]
            M[r] = z if z > M[r] else M[r]
    for r in range(n):
        for j in range(k):
            A[r * k + j] = Z[r * k + j] - M[r]
    for i in range(n * k):
        A[i] = exp_nonpositive(A[i])
    for r in range(n):
        S[r] = 0
        SY[r] = 0
    for j in range(k):
        for r in range(n):
            S[r] += A[r * k + j]
            SY[r] += Y[r, j]
    for r in range(n):
        s = S[r]
        S[r] = type(s)(1.0) / s
        LOG[r] = log_positive(s)
    for r in range(n):
        inv_s, sy = S[r], SY[r]
        for j in range(k):
            a = A[r * k + j] * inv_s
            A[r * k + j] = a
            D[r * k + j] = (a * sy - Y[r, j]) * scale
    cost = 0.0
    for r in range(n):
        log_s, m = float(LOG[r]), M[r]
        row_cost = 0.0  # summed per row, then into the total, as output_rows does
        for j in range(k):
            t = Y[r, j]
            if t != 0:  # one-hot targets: one term per example
                row_cost += float(t) * (log_s - float(Z[r * k + j] - m))
        cost += row_cost
    return cost


# ============================================================ batch kernels (2-D, row-major)


@njit(cache=True, error_model="numpy", fastmath=False)
def activation(code, Z, A):
    """``A = phi(Z)`` for a batch; softmax row by row."""
    Zf, Af = Z.reshape(Z.size), A.reshape(A.size)
    if code == SOFTMAX:
        k = Z.shape[1]
        for r in range(Z.shape[0]):
            act_range(code, Zf, Af, r * k, k)
    else:
        act_range(code, Zf, Af, np.int64(0), Z.size)


@njit(cache=True, error_model="numpy", fastmath=False)
def activation_backward(code, Z, A, D):
    """``D = phi'(Z) (.) D`` in place for a batch; softmax's VJP row by row."""
    Zf, Af, Df = Z.reshape(Z.size), A.reshape(A.size), D.reshape(D.size)
    if code == SOFTMAX:
        k = D.shape[1]
        for r in range(D.shape[0]):
            dact_range(code, Zf, Af, Df, r * k, k)
    else:
        dact_range(code, Zf, Af, Df, np.int64(0), D.size)


@njit(cache=True, error_model="numpy", fastmath=False)
def hidden_delta(code, Dn, Wn, Z, A, out):
    """``out = phi'(Z) (.) (Dn @ Wn)``: one BLAS GEMM, then one pass for phi'.

    Replaces ``matmul`` + ``activation_backward`` (one call, one pass over ``out``).
    """
    gemm(False, False, type(out[0, 0])(1.0), Dn, Wn, type(out[0, 0])(0.0), out)
    activation_backward(code, Z, A, out)


@njit(cache=True, error_model="numpy", fastmath=False)
def output_delta(loss, code, Z, A, Y, D):
    """Fused output layer for a batch: ``D = dC/dZ`` row by row; returns the summed cost."""
    Zf, Af, Df = Z.reshape(Z.size), A.reshape(A.size), D.reshape(D.size)
    k = Z.shape[1]
    total = 0.0
    for r in range(Z.shape[0]):
        total += output_range(loss, code, Zf, Af, Df, r * k, Y, r, np.bool_(True))
    return total


@njit(cache=True, error_model="numpy", fastmath=False)
def loss_sum(loss, code, Z, A, Y):
    """The summed cost of a batch, no delta."""
    Zf, Af = Z.reshape(Z.size), A.reshape(A.size)
    k = Z.shape[1]
    total = 0.0
    for r in range(Z.shape[0]):
        total += output_range(loss, code, Zf, Af, Zf, r * k, Y, r, np.bool_(False))
    return total


@njit(cache=True, error_model="numpy", fastmath=False)
def add_bias(Z, b):
    """``Z += b`` on every row."""
    Zf = Z.reshape(Z.size)
    k = _U(b.size)
    for r in range(Z.shape[0]):
        base = _U(r) * k
        for j in range(k):
            Zf[base + j] += b[j]


@njit(cache=True, error_model="numpy", fastmath=False)
def bias_grad(D, out, alpha, accumulate):
    """``out (+)= alpha * D.sum(axis=0)``, row by row (each row a contiguous SIMD add)."""
    Df = D.reshape(D.size)
    k = _U(out.size)
    if not accumulate:
        out[:] = 0
    scale = accumulate and alpha != 1
    for r in range(D.shape[0]):
        base = _U(r) * k
        if scale:
            for j in range(k):
                out[j] += Df[base + j] * alpha
        else:
            for j in range(k):
                out[j] += Df[base + j]
    if not accumulate and alpha != 1:
        for j in range(k):
            out[j] *= alpha


@njit(cache=True, error_model="numpy", fastmath=False)
def hadamard(a, b, out):
    """``out = a * b`` elementwise (any C-contiguous shape)."""
    af, bf, of = a.reshape(a.size), b.reshape(b.size), out.reshape(out.size)
    for i in range(of.size):
        of[i] = af[i] * bf[i]


@njit(cache=True, error_model="numpy", fastmath=False)
def outer(x, y, out, alpha, accumulate):
    """``out (+)= alpha x y^T`` (x, y 1-D); ``(x_i y_j) alpha`` as in the reference."""
    of = out.reshape(out.size)
    n = _U(y.size)
    for i in range(x.size):
        xi = x[i]
        base = _U(i) * n
        if accumulate:
            for j in range(n):
                of[base + j] += xi * y[j] * alpha
        else:
            for j in range(n):
                of[base + j] = xi * y[j] * alpha


# ============================================================ the update rule (kernels/base.py UpdateRule)
# One elementwise step (``_rule_step``) serves the flat update after a batch and the fused
# per-example update, where each weight's gradient d_r x_k is formed and applied at once.


@njit(cache=True, error_model="numpy", fastmath=False)
def rule_scalars(hp, t, one):
    """The rule's per-step scalars in the model dtype (``one`` is its 1.0), for step ``t`` (1-based)."""
    return rule_scalars_at(hp, hp[HP_BETA1] ** t, hp[HP_BETA2] ** t, one)


@njit(cache=True, error_model="numpy", fastmath=False)
def rule_scalars_at(hp, b1_t, b2_t, one):
    """``rule_scalars`` from the bias-correction powers ``b1^t`` and ``b2^t`` themselves: the
    per-example epochs carry them along as running products (a pow per example cost more
    than a small network's whole step)."""
    T = type(one)
    kind = int(hp[HP_KIND])
    lr, wd = hp[HP_LR], hp[HP_WEIGHT_DECAY]
    b1, b2 = hp[HP_BETA1], hp[HP_BETA2]
    step_size, inv_bc2 = lr, 1.0
    if kind != SGD:
        step_size = lr / (1.0 - b1_t)
        inv_bc2 = 1.0 / np.sqrt(1.0 - b2_t)
    grad_decay = 0.0 if kind == ADAMW else wd  # AdamW decays the weights instead
    shrink = 1.0 - lr * wd if kind == ADAMW else 1.0
    return (kind, T(lr), T(hp[HP_MOMENTUM]), hp[HP_NESTEROV] != 0.0, T(grad_decay), T(shrink), T(b1), T(1.0 - b1),
            T(b2), T(1.0 - b2), T(hp[HP_EPS]), T(step_size), T(inv_bc2))


def _rounded_op(opname, doc):
    @intrinsic
    def op(typingctx, a, b):
        if not (isinstance(a, types.Float) and a == b):
            return None

        def codegen(context, builder, signature, args):
            # a flag set here (nsz: the sign of a zero result may differ) makes Numba's
            # fast-math pass leave the instruction alone: no contract, no reassoc on it
            return getattr(builder, opname)(args[0], args[1], flags=("nsz",))

        return a(a, b), codegen

    op.__doc__ = doc
    return op


# The update rules' arithmetic, each operation rounded on its own even where the rule is
# inlined into a fast-math kernel (the per-example ``rank1_step``): there a plain ``m * mom + g``
# would be contracted into an FMA and round unlike kernels/numpy.py's update.
_mul = _rounded_op("fmul", "``a * b``, never fused or reassociated")
_add = _rounded_op("fadd", "``a + b``, never fused or reassociated")
_sub = _rounded_op("fsub", "``a - b``, never fused or reassociated")
_div = _rounded_op("fdiv", "``a / b``, never fused or reassociated")


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _momentum_step_of(p, m, g, mom, lr):
    """Heavy-ball momentum for one parameter: the new ``(p, m)``."""
    m = _add(_mul(m, mom), g)
    return _sub(p, _mul(m, lr)), m


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _adam_step_of(p, m, v, g, b1, ob1, b2, ob2, eps, step_size, inv_bc2):
    """Adam for one parameter (bias corrections folded into ``step_size`` and ``inv_bc2``):
    the new ``(p, m, v)``."""
    m = _add(_mul(m, b1), _mul(g, ob1))
    v = _add(_mul(v, b2), _mul(_mul(g, g), ob2))
    return _sub(p, _mul(_div(m, _add(_mul(np.sqrt(v), inv_bc2), eps)), step_size)), m, v


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _rule_step(c, p, g, m, v, l2):
    """One parameter's step: returns the new ``(p, m, v)`` from its gradient ``g`` (same
    operation order as kernels/numpy.py's update, so the two round alike). The loops for the
    common undecayed rules call ``_momentum_step_of`` / ``_adam_step_of`` directly: without
    this function's branches they vectorize."""
    kind, lr, mom, nesterov, decay, shrink, b1, ob1, b2, ob2, eps, step_size, inv_bc2 = c
    if decay != 0:
        g = _add(g, _mul(p, decay))
    if l2 != 0:
        g = _add(g, _mul(p, l2))
    if kind == SGD:
        if mom != 0 and nesterov:
            m = _add(_mul(m, mom), g)
            return _sub(p, _mul(_add(g, _mul(m, mom)), lr)), m, v
        if mom != 0:
            p, m = _momentum_step_of(p, m, g, mom, lr)
            return p, m, v
        return _sub(p, _mul(g, lr)), m, v
    if kind == ADAMW:
        p = _mul(p, shrink)
    p, m, v = _adam_step_of(p, m, v, g, b1, ob1, b2, ob2, eps, step_size, inv_bc2)
    return p, m, v


@njit(cache=True, error_model="numpy", fastmath=False)
def heavy_ball(P, G, M, lo, hi, mom, lr):
    """Momentum without decay over ``[lo, hi)`` (``_momentum_step_of``, as a branch-free loop
    that vectorizes)."""
    for i in range(_U(lo), _U(hi)):
        P[i], M[i] = _momentum_step_of(P[i], M[i], G[i], mom, lr)


@njit(cache=True, error_model="numpy", fastmath=False)
def adam_range(P, G, M, V, lo, hi, adam):
    """Adam without decay over ``[lo, hi)`` (``_adam_step_of``; ``adam`` = the rule scalars from
    b1 on), as a branch-free loop that vectorizes."""
    b1, ob1, b2, ob2, eps, step_size, inv_bc2 = adam
    for i in range(_U(lo), _U(hi)):
        P[i], M[i], V[i] = _adam_step_of(P[i], M[i], V[i], G[i], b1, ob1, b2, ob2, eps, step_size, inv_bc2)


@njit(cache=True, error_model="numpy", fastmath=False)
def _update_range(c, P, G, S, lo, hi, l2):
    kind, mom = c[0], c[2]
    zero = type(l2)(0.0)
    lo, hi = _U(lo), _U(hi)
    plain = c[4] == 0 and l2 == 0  # no weight decay, no l2: the two common rules get loops with no branch
    if kind == SGD and mom == 0:  # no state to read or write
        for i in range(lo, hi):
            P[i], _, _ = _rule_step(c, P[i], G[i], zero, zero, l2)
    elif kind == SGD and plain and not c[3]:  # momentum: _rule_step's arithmetic, in its order
        heavy_ball(P, G, S[0], lo, hi, mom, c[1])
    elif kind == ADAM and plain:
        adam_range(P, G, S[0], S[1], lo, hi, c[6:])
    elif kind == SGD:
        M = S[0]
        for i in range(lo, hi):
            P[i], M[i], _ = _rule_step(c, P[i], G[i], M[i], zero, l2)
    else:
        M, V = S[0], S[1]
        for i in range(lo, hi):
            P[i], M[i], V[i] = _rule_step(c, P[i], G[i], M[i], V[i], l2)


# ============================================================ update passes on the BLAS threads
# An update pass streams every parameter and its state once per step (at 784-256-10, batch
# 64: P, M and V are 0.8 MB each); on one core the momentum pass took ~330 of a step's
# ~850 us after its GEMMs had pushed those arrays out of L2
# (benchmarks/results/momentum-pass-microbench-xeon-spr-20261203.json). Split into one
# contiguous part per thread it runs on both cores, as XLA runs its fused update. The team is
# MKL's own OpenMP pool: the kernels call libgomp's GOMP_parallel (through its address, a
# runtime value, so cached machine code does not link libgomp) with a C callback
# (``pass_callback``) that runs its part of the pass. Not Numba's parallel=True: a cached
# function calling a parallel one segfaults when loaded from the cache (numba#8578, seen here
# too), and its gufunc caching races across processes (numba#10128). Each part flushes
# denormals itself (workers do not inherit the caller's MXCSR), so a threaded pass rounds
# exactly as the one-thread pass. ``team`` = (threads, GOMP_parallel, omp_get_thread_num,
# omp_get_num_threads, the dtype's callback): threads 1 (or no libgomp) runs the pass here.
# A pass is cut into parts of at least PART_MIN parameters, one per thread asked for; a
# thread runs every part its number reaches, stepping by the threads the region really got
# (OMP_DYNAMIC, OMP_THREAD_LIMIT or a nested region can give fewer), so no part is lost and
# each part's arithmetic is the one-thread pass's. Only the common rules' passes go to the
# team (momentum and Adam without decay): the callback stays a small, quick compile.
TEAM_THREADS, TEAM_PARALLEL, TEAM_THREAD_NUM, TEAM_NUM_THREADS, TEAM_CALLBACK = range(5)
TEAM_SIZE = 5
# parameters a part: a team costs a few us to start and join, and measured a gain at two parts
# of 16k and more (2 cores only; benchmarks/results/team-passes-ab-20261203T084327Z.json)
PART_MIN = 1 << 14
PASS_ALIGN = 16  # part boundaries 64 bytes apart from lo: at most one cache line shared per boundary
# the block a pass hands its callback: int64 slots, the task's scalars as float64 bits
B_TASK, B_THREAD_NUM, B_NUM_THREADS, B_PARTS, B_LO, B_HI, B_N, B_P, B_G, B_M, B_V, B_SCALARS = range(12)
BLOCK = B_SCALARS + 7
# the passes a team runs: _scaled_velocity_pass (scalars lr, keep), heavy_ball (mom, lr) and
# adam_range (b1 .. inv_bc2); every other rule's pass stays on the calling thread
TASK_SCALED_VELOCITY, TASK_HEAVY_BALL, TASK_ADAM = 1, 2, 3


def alone() -> np.ndarray:
    """The team of this thread only."""
    team = np.zeros(TEAM_SIZE, np.int64)
    team[TEAM_THREADS] = 1
    return team


@intrinsic
def _omp_parallel(typingctx, fn, callback, data, threads):
    """``GOMP_parallel(callback, data, threads, 0)`` with the function at address ``fn``."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        cb_ty = ir.FunctionType(ir.VoidType(), [i8p])
        fn_ty = ir.FunctionType(ir.VoidType(), [cb_ty.as_pointer(), i8p, i32, i32])
        builder.call(builder.inttoptr(args[0], fn_ty.as_pointer()),
                     [builder.inttoptr(args[1], cb_ty.as_pointer()), builder.inttoptr(args[2], i8p),
                      builder.trunc(args[3], i32), ir.Constant(i32, 0)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_int(typingctx, fn):
    """The ``int`` returned by the no-argument C function at address ``fn`` (omp_get_thread_num)."""
    def codegen(context, builder, signature, args):
        fn_ty = ir.FunctionType(ir.IntType(32), [])
        return builder.sext(builder.call(builder.inttoptr(args[0], fn_ty.as_pointer()), []), ir.IntType(64))

    return types.int64(types.int64), codegen


@intrinsic
def _pointer_at(typingctx, address, like):
    """``address`` as a pointer to ``like``'s type (a scalar of the dtype wanted)."""
    if not isinstance(like, types.Float):
        return None
    ptr = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(types.int64, like), codegen


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _part(lo, hi, t, parts):
    """Part ``t`` of ``parts`` of ``[lo, hi)``."""
    n = hi - lo
    a = lo if t == 0 else lo + (n * t // parts) // PASS_ALIGN * PASS_ALIGN
    b = hi if t == parts - 1 else lo + (n * (t + 1) // parts) // PASS_ALIGN * PASS_ALIGN
    return a, b


@njit(cache=True, error_model="numpy", fastmath=False)
def _scaled_velocity_pass(P, M, lo, hi, lr, keep):
    """``p = p - m lr``, ``M = m keep`` over ``[lo, hi)`` (``_momentum_step``)."""
    for i in range(_U(lo), _U(hi)):
        m = M[i]
        P[i] = P[i] - m * lr
        M[i] = m * keep


@njit(cache=True, error_model="numpy", fastmath=False)
def _run_part(block, like):
    """This thread's part of the pass ``block`` describes (the callback's body)."""
    old = flush_denormals()
    f = carray(_pointer_at(block.ctypes.data, np.float64(0.0)), (BLOCK,))[B_SCALARS:]
    T = type(like)
    n, parts, task = block[B_N], block[B_PARTS], block[B_TASK]
    P, M = carray(_pointer_at(block[B_P], like), (n,)), carray(_pointer_at(block[B_M], like), (n,))
    for t in range(_call_int(block[B_THREAD_NUM]), parts, max(1, _call_int(block[B_NUM_THREADS]))):
        a, b = _part(block[B_LO], block[B_HI], t, parts)
        # the argument types of the one-thread calls (uint64 bounds in _update_range), so each
        # callee compiles once whichever caller comes first
        if task == TASK_SCALED_VELOCITY:
            _scaled_velocity_pass(P, M, a, b, T(f[0]), T(f[1]))
        elif task == TASK_HEAVY_BALL:
            heavy_ball(P, carray(_pointer_at(block[B_G], like), (n,)), M, _U(a), _U(b), T(f[0]), T(f[1]))
        elif task == TASK_ADAM:
            adam_range(P, carray(_pointer_at(block[B_G], like), (n,)), M, carray(_pointer_at(block[B_V], like), (n,)),
                       _U(a), _U(b), (T(f[0]), T(f[1]), T(f[2]), T(f[3]), T(f[4]), T(f[5]), T(f[6])))
    restore_denormals(old)


def _callback_float32(data):
    _run_part(carray(data, (BLOCK,), np.int64), np.float32(0.0))


def _callback_float64(data):
    _run_part(carray(data, (BLOCK,), np.int64), np.float64(0.0))


def pass_callback(dtype, kind="update") -> int:
    """Address of the C callback (``void (*)(void *)``) a team runs for ``dtype``: ``kind``
    "update" for the update passes, "example" for the per-example rows (``_run_example_rows``);
    compiled on first use, cached on disk."""
    key = (np.dtype(dtype).name, kind)
    if key not in _CALLBACKS:
        callback = _callback_object(key)
        callback.compile()  # from the disk cache where it is there
        _CALLBACKS[key] = callback
    return _CALLBACKS[key].address


def callback_loaded(dtype, kind) -> bool:
    """Whether this process holds ``pass_callback(dtype, kind)`` already."""
    return (np.dtype(dtype).name, kind) in _CALLBACKS


def callback_cached(dtype, kind):
    """Whether the disk cache holds ``pass_callback(dtype, kind)``: True/False, or None where this
    Numba's cache internals are not the ones read here."""
    try:
        callback = _callback_object((np.dtype(dtype).name, kind))
        cache = callback._cache
        key = cache._index_key(callback._sig, callback._targetdescr.target_context.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # pragma: no cover - another Numba's layout
        return None


def _callback_object(key):
    """The (not yet compiled) cfunc of ``key`` = (dtype name, kind), caching on disk."""
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    py = {("float32", "update"): _callback_float32, ("float64", "update"): _callback_float64,
          ("float32", "example"): _example_callback_float32, ("float64", "example"): _example_callback_float64}[key]
    sig = sigutils.normalize_signature(types.void(types.voidptr))
    callback = CFunc(py, sig, locals={}, options=dict(error_model="numpy", fastmath=False))
    callback.enable_caching()
    return callback


_CALLBACKS: dict = {}


@njit(cache=True, error_model="numpy", fastmath=False)
def _team_pass(team, parts, task, P, G, M, V, lo, hi, scalars):
    """``task`` over ``[lo, hi)`` cut into ``parts`` (``_team_parts``) on ``team``'s threads,
    this one included: the block the callback reads, then ``GOMP_parallel``. ``scalars``: 7 of
    the dtype, the task's first."""
    block = np.empty(BLOCK, np.int64)
    floats = block.view(np.float64)
    block[B_TASK], block[B_THREAD_NUM], block[B_NUM_THREADS] = task, team[TEAM_THREAD_NUM], team[TEAM_NUM_THREADS]
    block[B_PARTS], block[B_LO], block[B_HI], block[B_N] = parts, lo, hi, P.size
    block[B_P], block[B_G], block[B_M], block[B_V] = P.ctypes.data, G.ctypes.data, M.ctypes.data, V.ctypes.data
    for i in range(7):
        floats[B_SCALARS + i] = scalars[i]
    _team_run(team, block, parts)


@njit(cache=True, error_model="numpy", fastmath=False)
def _team_run(team, block, threads):
    """``GOMP_parallel`` of the team's callback on ``block``, asking for ``threads`` threads."""
    _omp_parallel(team[TEAM_PARALLEL], team[TEAM_CALLBACK], block.ctypes.data, threads)


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _team_parts(team, n):
    """How many parts a pass over ``n`` parameters is cut into on ``team`` (1: no team)."""
    if team.size < TEAM_SIZE or team[TEAM_THREADS] < 2:
        return 1
    return max(1, min(team[TEAM_THREADS], n // PART_MIN))


@njit(cache=True, error_model="numpy", fastmath=False)
def _apply_update(hp, step, sizes, params, grads, state, rows, team):
    """One optimizer step over the flat buffers, layer by layer (``l2`` reaches weights only),
    a layer's weights on ``team``'s threads where it has enough of them; advances ``step[0]``."""
    step[0] += 1
    c = rule_scalars(hp, step[0], type(params[0])(1.0))
    l2 = type(params[0])(hp[HP_L2] / rows)
    w_off, b_off, _ = layer_offsets(sizes)
    zero = type(l2)(0.0)
    kind, mom, plain = c[0], c[2], c[4] == 0 and l2 == 0
    task = TASK_HEAVY_BALL if kind == SGD and mom != 0 and plain and not c[3] else TASK_ADAM if kind == ADAM and plain else 0
    for l in range(sizes.size - 1):
        lo, hi = w_off[l], b_off[l]
        parts = _team_parts(team, hi - lo) if task else 1
        if parts > 1 and task == TASK_HEAVY_BALL:
            M = state[0]
            _team_pass(team, parts, task, params, grads, M, M, lo, hi, (mom, c[1], zero, zero, zero, zero, zero))
        elif parts > 1 and task == TASK_ADAM:
            _team_pass(team, parts, task, params, grads, state[0], state[1], lo, hi, c[6:])
        else:
            _update_range(c, params, grads, state, lo, hi, l2)
        _update_range(c, params, grads, state, hi, hi + sizes[l + 1], zero)


@njit(cache=True, error_model="numpy", fastmath=False)
def apply_update(hp, step, sizes, params, grads, state, rows, team):
    """``_apply_update`` with denormals flushed (``flush_denormals``)."""
    old = flush_denormals()
    _apply_update(hp, step, sizes, params, grads, state, rows, team)
    restore_denormals(old)


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def all_finite(a):
    """No NaN or Inf in ``a``: x - x is 0 for every finite x and NaN otherwise, so a block's
    sum of x - x is 0 exactly when the block is finite (a branch-free, SIMD loop; reassoc
    lets LLVM split the sum across lanes, NaN/Inf semantics untouched)."""
    af = a.reshape(a.size)
    if af.size == 0:
        return True
    n = _U(af.size)
    block = _U(4096)
    for lo in range(_U(0), n, block):
        hi = min(lo + block, n)
        acc = type(af[0])(0.0)
        for i in range(lo, hi):
            acc += af[i] - af[i]
        if acc != 0:
            return False
    return True


@njit(cache=True, error_model="numpy", fastmath=False)
def take_rows(src, index, out):
    """``out[:] = src[index]``, row by row; indices clipped into range (NumPy's mode="clip")."""
    k = _U(src.shape[1])
    last = src.shape[0] - 1
    sf, of = src.reshape(src.size), out.reshape(out.size)
    for r in range(index.size):
        i = min(max(index[r], 0), last)
        src_base, dst_base = _U(i) * k, _U(r) * k
        for j in range(k):
            of[dst_base + j] = sf[src_base + j]


# ============================================================ one layer, flat: the products
# Parameters live in one flat buffer [W1, b1, W2, b2, ...]; W of layer l starts at w_off[l]
# (row-major, n_out x n_in), b at b_off[l]. Activations/deltas are flat with offsets too.


@njit(cache=True, error_model="numpy", fastmath=False)
def layer_offsets(sizes):
    """``(w_off, b_off, u_off)``: parameter offsets per layer, and where layer l's units start
    in a per-example buffer holding every layer, inputs included (``u_off[-1] = sum(sizes)``)."""
    n_layers = sizes.size - 1
    w_off = np.empty(n_layers, np.int64)
    b_off = np.empty(n_layers, np.int64)
    u_off = np.empty(n_layers + 2, np.int64)
    pos = 0
    for l in range(n_layers):
        w_off[l] = pos
        pos += sizes[l] * sizes[l + 1]
        b_off[l] = pos
        pos += sizes[l + 1]
    units = 0
    for l in range(n_layers + 1):
        u_off[l] = units
        units += sizes[l]
    u_off[n_layers + 1] = units
    return w_off, b_off, u_off


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH)
def dense(P, wo, bo, n_out, n_in, x, xo, z, zo):
    """``z[zo:zo+n_out] = W x[xo:xo+n_in] + b`` for one example."""
    wo, bo, xo, zo, n_out, n_in = _U(wo), _U(bo), _U(xo), _U(zo), _U(n_out), _U(n_in)
    for r in range(n_out):
        base = wo + r * n_in
        acc = type(P[0])(0.0)
        for k in range(n_in):
            acc += P[base + k] * x[xo + k]
        z[zo + r] = acc + P[bo + r]


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH)
def dense_t(P, wo, n_out, n_in, d, do, out, oo):
    """``out[oo:oo+n_in] = W^T d[do:do+n_out]``; rows with d_r == 0 (off ReLUs) add nothing."""
    wo, do, oo, n_out, n_in = _U(wo), _U(do), _U(oo), _U(n_out), _U(n_in)
    for k in range(n_in):
        out[oo + k] = 0
    for r in range(n_out):
        dr = d[do + r]
        if dr != 0:
            base = wo + r * n_in
            for k in range(n_in):
                out[oo + k] += P[base + k] * dr


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH)
def rank1_update(P, wo, bo, n_out, n_in, d, do, x, xo, alpha):
    """``W += alpha d x^T``, ``b += alpha d``: an SGD step (alpha = -lr) or a gradient
    accumulation (alpha = 1) straight from one example; rows with d_r == 0 are untouched."""
    wo, bo, do, xo, n_out, n_in = _U(wo), _U(bo), _U(do), _U(xo), _U(n_out), _U(n_in)
    for r in range(n_out):
        step = d[do + r] * alpha
        if step != 0:
            base = wo + r * n_in
            for k in range(n_in):
                P[base + k] += step * x[xo + k]
            P[bo + r] += step


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH)
def rank1_step(c, P, S, wo, bo, n_out, n_in, d, do, x, xo, l2):
    """The optimizer step of one example's layer, fused: each weight's gradient ``d_r x_k``
    (and each bias's ``d_r``) goes through ``_rule_step`` where it is formed, replacing the
    outer product into a gradient buffer followed by ``apply_update``."""
    wo, bo, do, xo, n_out, n_in = _U(wo), _U(bo), _U(do), _U(xo), _U(n_out), _U(n_in)
    zero = type(l2)(0.0)
    kind, mom = c[0], c[2]
    plain = c[4] == 0 and l2 == 0  # no weight decay, no l2: momentum and Adam get loops with no branch
    if kind == SGD and mom != 0 and plain and not c[3]:  # as in _update_range
        M, lr = S[0], c[1]
        for r in range(n_out):
            dr = d[do + r]
            base = wo + r * n_in
            for k in range(n_in):
                P[base + k], M[base + k] = _momentum_step_of(P[base + k], M[base + k], dr * x[xo + k], mom, lr)
            P[bo + r], M[bo + r] = _momentum_step_of(P[bo + r], M[bo + r], dr, mom, lr)
        return
    if kind == ADAM and plain:
        M, V = S[0], S[1]
        b1, ob1, b2, ob2, eps, step_size, inv_bc2 = c[6], c[7], c[8], c[9], c[10], c[11], c[12]
        for r in range(n_out):
            dr = d[do + r]
            base = wo + r * n_in
            for k in range(n_in):
                i = base + k
                P[i], M[i], V[i] = _adam_step_of(P[i], M[i], V[i], dr * x[xo + k], b1, ob1, b2, ob2, eps, step_size,
                                                 inv_bc2)
            i = bo + r
            P[i], M[i], V[i] = _adam_step_of(P[i], M[i], V[i], dr, b1, ob1, b2, ob2, eps, step_size, inv_bc2)
        return
    for r in range(n_out):
        dr = d[do + r]
        base = wo + r * n_in
        if kind == SGD and mom == 0:  # no state
            for k in range(n_in):
                P[base + k], _, _ = _rule_step(c, P[base + k], dr * x[xo + k], zero, zero, l2)
            P[bo + r], _, _ = _rule_step(c, P[bo + r], dr, zero, zero, zero)
        elif kind == SGD:  # momentum: one buffer
            M = S[0]
            for k in range(n_in):
                i = base + k
                P[i], M[i], _ = _rule_step(c, P[i], dr * x[xo + k], M[i], zero, l2)
            P[bo + r], M[bo + r], _ = _rule_step(c, P[bo + r], dr, M[bo + r], zero, zero)
        else:
            M, V = S[0], S[1]
            for k in range(n_in):
                i = base + k
                P[i], M[i], V[i] = _rule_step(c, P[i], dr * x[xo + k], M[i], V[i], l2)
            P[bo + r], M[bo + r], V[bo + r] = _rule_step(c, P[bo + r], dr, M[bo + r], V[bo + r], zero)


# ============================================================ the compiled per-example loop
# A per-example workspace holds z, a and delta of every layer back to back, each laid out
# like the units (``u_off``): 3 * sum(sizes) entries; a[0:n_in] is the example itself.


@njit(cache=True, error_model="numpy", fastmath=False)
def _example_forward(sizes, hidden, P, w_off, b_off, u_off, X, s, zs, acts, first):
    """Example ``s``'s forward pass from layer ``first`` on (the layers below it done already)."""
    n_layers = sizes.size - 1
    for k in range(sizes[0]):
        acts[k] = X[s, k]
    for l in range(first, n_layers):
        dense(P, w_off[l], b_off[l], sizes[l + 1], sizes[l], acts, u_off[l], zs, u_off[l + 1])
        if l < n_layers - 1:  # the output layer's activation comes fused with its loss
            act_range(hidden, zs, acts, u_off[l + 1], sizes[l + 1])


@njit(cache=True, error_model="numpy", fastmath=False)
def _example_backward(sizes, hidden, P, w_off, u_off, zs, acts, ds, l):
    """The delta of layer l-1 from layer l's (with layer l's weights as they are now)."""
    dense_t(P, w_off[l], sizes[l + 1], sizes[l], ds, u_off[l + 1], ds, u_off[l])
    dact_range(hidden, zs, acts, ds, u_off[l], sizes[l])


@njit(cache=True, error_model="numpy", fastmath=False)
def loop_batch(sizes, hidden, output, loss, params, X, Y, grads, work, start, stop):
    """The textbook per-example loop over rows ``start:stop``: per example a vector forward,
    the output delta, the backward pass and ``dW += delta a^T``, ``db += delta``; then the
    sums are divided by the number of examples. Returns the summed cost (float64) and how many
    examples the outputs classified right."""
    n_layers = sizes.size - 1
    w_off, b_off, u_off = layer_offsets(sizes)
    units = u_off[n_layers + 1]
    zs, acts, ds = work[:units], work[units:2 * units], work[2 * units:3 * units]
    one = type(params[0])(1.0)
    grads[:] = 0
    total = 0.0
    correct = 0
    L = n_layers - 1
    for s in range(start, stop):
        _example_forward(sizes, hidden, params, w_off, b_off, u_off, X, s, zs, acts, 0)
        total += output_layer(loss, output, zs, acts, ds, u_off[n_layers], Y.shape[1], Y, s, one)
        correct += _row_correct(loss, acts, u_off[n_layers], Y, s)
        for l in range(L, -1, -1):
            rank1_update(grads, w_off[l], b_off[l], sizes[l + 1], sizes[l], ds, u_off[l + 1], acts, u_off[l], one)
            if l > 0:
                _example_backward(sizes, hidden, params, w_off, u_off, zs, acts, ds, l)
    n = stop - start
    if n > 0:
        for i in range(grads.size):
            grads[i] /= n
    return total, correct


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _row_correct(loss, a, lo, Y, row):
    """1 when one example's outputs ``a[lo:lo+k]`` classify like ``Y[row]`` (count_correct's rule)."""
    k = Y.shape[1]
    if loss == CROSS_ENTROPY:
        best_a, best_y = 0, 0
        for j in range(1, k):
            if a[lo + j] > a[lo + best_a]:
                best_a = j
            if Y[row, j] > Y[row, best_y]:
                best_y = j
        return 1 if best_a == best_y else 0
    if loss == LOG_LOSS:
        for j in range(k):
            if (a[lo + j] > 0.5) != (Y[row, j] > 0.5):
                return 0
        return 1
    return 0


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _plain_sgd(hp):
    """SGD with no momentum, decay or l2: per example its step skips a zero delta's row (``rank1_update``)."""
    return int(hp[HP_KIND]) == SGD and hp[HP_MOMENTUM] == 0 and hp[HP_WEIGHT_DECAY] == 0 and hp[HP_L2] == 0


# Per example, a wide first layer's rows are split among the team too (``team`` as for the
# update passes, with the "example" callback): each thread updates its rows of W and b for
# this example, then computes the same rows of the next example's first layer (z and its
# activation) with the weights it has just written, so a row and its velocity stay in one
# core's cache. Splitting the update alone ran 4x slower: the next forward pass, on this
# thread, pulled every row the other core had written back across (784-128-10 momentum,
# ~180 against ~40 us an example). Each row's arithmetic is the one-thread code's.
(E_THREAD_NUM, E_NUM_THREADS, E_PARTS, E_N_OUT, E_N_IN, E_N, E_P, E_S, E_S_ROWS, E_HP, E_STEP, E_WORK, E_UNITS,
 E_W, E_B, E_Z, E_HIDDEN, E_X, E_X_N, E_NEXT, E_L2) = range(21)
EBLOCK = 21


@njit(cache=True, error_model="numpy", fastmath=False)
def _run_example_rows(block, like):
    """This thread's rows of the first layer: the update from the example whose delta and
    input the workspace holds, then (``E_NEXT`` >= 0: the next example's offset in X) that
    example's z and activation for the same rows."""
    old = flush_denormals()
    parts, n_out, n_in = block[E_PARTS], block[E_N_OUT], block[E_N_IN]
    n, units, wo, bo, zo = block[E_N], block[E_UNITS], block[E_W], block[E_B], block[E_Z]
    P = carray(_pointer_at(block[E_P], like), (n,))
    S = carray(_pointer_at(block[E_S], like), (block[E_S_ROWS], n))
    work = carray(_pointer_at(block[E_WORK], like), (3 * units,))
    zs, acts, ds = work[:units], work[units:2 * units], work[2 * units:]
    hp = carray(_pointer_at(block[E_HP], np.float64(0.0)), (HP_L2 + 1,))
    l2 = type(like)(carray(_pointer_at(block.ctypes.data, np.float64(0.0)), (EBLOCK,))[E_L2])
    one = type(like)(1.0)
    c = rule_scalars(hp, block[E_STEP], one)
    plain = _plain_sgd(hp)
    neg_lr = -one * type(one)(hp[HP_LR])
    X = carray(_pointer_at(block[E_X], like), (block[E_X_N],))
    for t in range(_call_int(block[E_THREAD_NUM]), parts, max(1, _call_int(block[E_NUM_THREADS]))):
        r0, r1 = n_out * t // parts, n_out * (t + 1) // parts
        if plain:
            rank1_update(P, wo + r0 * n_in, bo + r0, r1 - r0, n_in, ds, zo + r0, acts, zo - zo, neg_lr)
        else:
            rank1_step(c, P, S, wo + r0 * n_in, bo + r0, r1 - r0, n_in, ds, zo + r0, acts, zo - zo, l2)
        if block[E_NEXT] >= 0:
            dense(P, wo + r0 * n_in, bo + r0, r1 - r0, n_in, X, block[E_NEXT], zs, zo + r0)
            act_range(block[E_HIDDEN], zs, acts, zo + r0, r1 - r0)
    restore_denormals(old)


def _example_callback_float32(data):
    _run_example_rows(carray(data, (EBLOCK,), np.int64), np.float32(0.0))


def _example_callback_float64(data):
    _run_example_rows(carray(data, (EBLOCK,), np.int64), np.float64(0.0))


def example_team(team, sizes, hidden, P, S, X, hp, work) -> np.ndarray:
    """``team`` with the per-example rows' block appended (built here, in Python: the
    addresses of this call's arrays, which outlive it; ``E_STEP`` and ``E_NEXT`` are set per
    example by the kernel)."""
    block = np.zeros(EBLOCK, np.int64)
    parts = min(_team_parts(team, sizes[0] * sizes[1]), int(sizes[1]))  # at least a row a part
    block[[E_THREAD_NUM, E_NUM_THREADS, E_PARTS]] = team[TEAM_THREAD_NUM], team[TEAM_NUM_THREADS], parts
    block[[E_N_OUT, E_N_IN]] = sizes[1], sizes[0]
    block[[E_N, E_P, E_S, E_S_ROWS]] = P.size, P.ctypes.data, S.ctypes.data, S.shape[0]
    block[[E_HP, E_WORK, E_UNITS]] = hp.ctypes.data, work.ctypes.data, work.size // 3
    block[[E_W, E_B, E_Z, E_HIDDEN]] = 0, sizes[0] * sizes[1], sizes[0], hidden  # layer 0: w_off, b_off, u_off[1]
    block[[E_X, E_X_N]] = X.ctypes.data, X.size
    block.view(np.float64)[E_L2] = hp[HP_L2]
    return np.concatenate([team, block])


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _examples_epoch(sizes, hidden, output, loss, params, X, Y, order, hp, step, state, work, team):
    """A whole epoch of per-example training (batch size 1) in one call, over the rows of
    ``X, Y`` in ``order`` (in place of a shuffled copy; empty: in their own order).

    Per example: forward, output delta, then from the top layer down: the delta of the layer
    below (with this layer's weights before their update), then this layer's update, applied
    where the gradient is formed (``rank1_update`` for plain SGD, which skips zero deltas;
    ``rank1_step`` for any other rule; a wide first layer's rows on ``team``'s threads, see
    ``_run_example_rows``). Returns ``(summed cost, examples done, correct)``; stops before
    the update of a non-finite cost.
    """
    n_layers = sizes.size - 1
    w_owned, b_owned, u_owned = layer_offsets(sizes)
    w_off, b_off, u_off = _borrowed(w_owned), _borrowed(b_owned), _borrowed(u_owned)  # no counting per example
    units = u_off[n_layers + 1]
    zs, acts, ds = work[:units], work[units:2 * units], work[2 * units:3 * units]
    one = type(params[0])(1.0)
    plain = _plain_sgd(hp)
    neg_lr = -one * type(one)(hp[HP_LR])
    l2 = type(one)(hp[HP_L2])  # rows = 1
    total = 0.0
    correct = 0
    L = n_layers - 1
    shuffled = order.size > 0
    block = team[TEAM_SIZE:]  # example_team's (empty where there is no team)
    # a softmax's rows are not independent: a part could not finish its activations alone
    rows_on_team = n_layers >= 2 and hidden != SOFTMAX and block.size == EBLOCK and block[E_PARTS] > 1
    ahead = 0  # the first layer of this example computed by the last team run
    for s in range(X.shape[0]):
        row = order[s] if shuffled else s
        _example_forward(sizes, hidden, params, w_off, b_off, u_off, X, row, zs, acts, ahead)
        ahead = 0
        cost = output_layer(loss, output, zs, acts, ds, u_off[n_layers], Y.shape[1], Y, row, one)
        if not np.isfinite(cost):
            return total, s, correct
        total += cost
        correct += _row_correct(loss, acts, u_off[n_layers], Y, row)
        step[0] += 1
        c = rule_scalars(hp, step[0], one)
        for l in range(L, -1, -1):
            if l > 0:
                _example_backward(sizes, hidden, params, w_off, u_off, zs, acts, ds, l)
            if l == 0 and rows_on_team:
                block[E_STEP] = step[0]
                block[E_NEXT] = -1 if s + 1 == X.shape[0] else (order[s + 1] if shuffled else s + 1) * sizes[0]
                _team_run(team, block, block[E_PARTS])
                ahead = 1 if s + 1 < X.shape[0] else 0
            elif plain:
                rank1_update(params, w_off[l], b_off[l], sizes[l + 1], sizes[l], ds, u_off[l + 1], acts, u_off[l],
                             neg_lr)
            else:
                rank1_step(c, params, state, w_off[l], b_off[l], sizes[l + 1], sizes[l], ds, u_off[l + 1], acts,
                           u_off[l], l2)
    _alive(w_owned)
    _alive(b_owned)
    _alive(u_owned)
    return total, X.shape[0], correct


@njit(cache=True, error_model="numpy", fastmath=False)
def examples_epoch(sizes, hidden, output, loss, params, X, Y, order, hp, step, state, work, team):
    """``_examples_epoch`` with denormals flushed (``flush_denormals``)."""
    old = flush_denormals()
    out = _examples_epoch(_borrowed(sizes), hidden, output, loss, _borrowed(params), _borrowed(X), _borrowed(Y),
                          _borrowed(order), _borrowed(hp), _borrowed(step), _borrowed(state), _borrowed(work),
                          _borrowed(team))
    restore_denormals(old)
    return out


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _phi(code, x):
    """One element of an elementwise activation (the hidden layers')."""
    if code == RELU:
        return type(x)(0.0) if x <= 0 else x
    if code == SIGMOID:
        return _sigmoid(x)
    if code == TANH:
        return np.tanh(x)
    if code == LEAKY_RELU:
        return x * type(x)(LEAKY_SLOPE) if x <= 0 else x
    return x


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _dphi(code, z, a, d):
    """``phi'(z) d`` for one element, as ``dact_range`` computes it."""
    if code == RELU:
        return d * 0 if z <= 0 else d
    if code == SIGMOID:
        return d * ((type(a)(1.0) - a) * a)
    if code == TANH:
        return d * (type(a)(1.0) - a * a)
    if code == LEAKY_RELU:
        return d * type(d)(LEAKY_SLOPE) if z <= 0 else d
    return d


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, nogil=True)
def shallow_epoch(sizes, hidden, output, loss, P, X, Y, order, hp, step, S, work):
    """``examples_epoch`` for one hidden layer, in one function: per example the hidden units'
    dot product, bias and activation, the output layer, the hidden deltas and the two layers'
    updates, with no per-layer calls between them (what made a 2-8-1 step cost hundreds of ns
    instead of tens). Same results as ``examples_epoch`` (``work`` is not needed). Without the
    GIL: it uses no shared buffer."""
    return shallow_body(sizes[0], sizes[1], sizes[2], hidden, output, loss, P, X, Y, order, hp, step, S, work,
                        np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.uint64))


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, nogil=True)
def shallow_epoch_drawing(sizes, hidden, output, loss, P, X, Y, order, hp, step, S, work, next_order, state_in,
                          state_out):
    """``shallow_epoch`` that also draws the next epoch's order (``shallow_body``)."""
    return shallow_body(sizes[0], sizes[1], sizes[2], hidden, output, loss, P, X, Y, order, hp, step, S, work,
                        next_order, state_in, state_out)


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _relayout(src, dst, n_in, H, to_hidden_major):
    """A shallow net's flat parameters (or a state row) copied with the first layer's weights
    stored (n_in, H) instead of (H, n_in) (``to_hidden_major``), or back: in ``_shallow_body``
    every loop over the hidden units then walks contiguous memory, which LLVM vectorizes."""
    for j in range(H):
        for k in range(n_in):
            if to_hidden_major:
                dst[k * H + j] = src[j * n_in + k]
            else:
                dst[j * n_in + k] = src[k * H + j]
    for i in range(H * n_in, src.size):
        dst[i] = src[i]


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, inline="always")
def _dot_split(P, lo, a, alo, n, zero):
    """``sum_j P[lo + j] a[alo + j]`` in four partial sums: a chain of n/4 multiply-adds, not n
    (a small net's output logit is on its per-example critical path)."""
    lo, alo, n = _U(lo), _U(alo), _U(n)
    one, four = _U(1), _U(4)
    s0, s1, s2, s3 = zero, zero, zero, zero
    j = _U(0)
    while j + four <= n:
        s0 += P[lo + j] * a[alo + j]
        s1 += P[lo + j + one] * a[alo + j + one]
        s2 += P[lo + j + _U(2)] * a[alo + j + _U(2)]
        s3 += P[lo + j + _U(3)] * a[alo + j + _U(3)]
        j += four
    while j < n:
        s0 += P[lo + j] * a[alo + j]
        j += one
    return (s0 + s1) + (s2 + s3)


# A small net's per-example kernel keeps everything it writes in one buffer ``B``, at offsets
# that are compile-time constants in the generated kernels (the sizes are): the hidden-major
# parameters, the gradient, the hidden units' z, a and delta, then the state rows. LLVM then
# knows no store to one of them changes another, which lets its SLP vectorizer turn the
# unrolled loops over the hidden units into vector code (separate arrays might overlap as far
# as it can tell, and it left them scalar).


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _small_offsets(n_in, H, n_out):
    """``(n_params, g, zh, ah, dh, s)``: where the gradient, the hidden units' z, a and delta and
    the state rows (as many as the state has, at least two) start in a small net's buffer."""
    n_params = _U(n_in) * _U(H) + _U(H) + _U(n_out) * _U(H) + _U(n_out)
    zh = _U(2) * n_params
    return n_params, n_params, zh, zh + _U(H), zh + _U(2) * _U(H), zh + _U(3) * _U(H)


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, inline="always")
def _shallow_body(n_in, H, n_out, hidden, output, loss, B, X, Y, order, hp, step, zo, ao, do, nxt, R):
    """``shallow_epoch``'s loop on the buffer ``B`` (``_small_offsets``: hidden-major parameters,
    ``_relayout``, their gradient and state), inlined where it is called: with the input and
    output sizes and the codes as compile-time constants (the generated modules,
    kernels/numba.py) LLVM unrolls the loops over them. ``zo``, ``ao``, ``do``: the output
    units' z, a and delta; ``nxt``: where to draw the next epoch's order (none: size 0) from
    the PCG64 state ``R`` (numba_random), one Fisher-Yates step per example. Returns
    ``(cost, examples done, correct, steps taken)``; the caller adds the steps to ``step``."""
    n_in, H, n_out = _U(n_in), _U(H), _U(n_out)
    n_params, g, zh, ah, dh, so = _small_offsets(n_in, H, n_out)
    w1, b1 = _U(0), H * n_in  # W1[k, j] at w1 + k H + j
    w2 = b1 + H
    b2 = w2 + n_out * H
    m, v = so, so + n_params  # the state rows
    one = type(B[0])(1.0)
    zero = one - one
    kind = int(hp[HP_KIND])
    undecayed = hp[HP_WEIGHT_DECAY] == 0 and hp[HP_L2] == 0
    plain = kind == SGD and hp[HP_MOMENTUM] == 0 and undecayed
    heavy = kind == SGD and hp[HP_MOMENTUM] != 0 and hp[HP_NESTEROV] == 0 and undecayed
    adam = kind == ADAM and undecayed
    neg_lr = -one * type(one)(hp[HP_LR])
    l2 = type(one)(hp[HP_L2])  # rows = 1
    b1_t, b2_t = hp[HP_BETA1] ** step[0], hp[HP_BETA2] ** step[0]
    P, G = B[:n_params], B[g:g + n_params]
    S = B[so:].reshape(((B.size - so) // n_params, np.int64(n_params)))
    total = 0.0
    correct = 0
    steps = 0
    shuffled = order.size > 0
    drawing = nxt.size > 0
    last = X.shape[0] - 1
    for s in range(X.shape[0]):
        row = order[s] if shuffled else s
        if drawing and s < last:  # its integer chain runs beside the example's floating-point one
            shuffle_step(R, nxt, last - s)
        for j in range(H):
            B[zh + j] = zero
        for k in range(n_in):
            xk = X[row, k]
            for j in range(H):
                B[zh + j] += B[w1 + k * H + j] * xk
        for j in range(H):
            z = B[zh + j] + B[b1 + j]
            B[zh + j] = z
            B[ah + j] = _phi(hidden, z)
        for o in range(n_out):
            z = _dot_split(B, w2 + o * H, B, ah, H, zero) + B[b2 + o]
            if not np.isfinite(z):
                return total, s, correct, steps
            zo[o] = z
        # the logits and deltas checked, and the cost only for mse: a branch on a log-loss or
        # softmax cost (its log's latency) slowed 2-8-1 by ~7%. With those finite so is the
        # cost, but for softmax logits farther apart than the float range, whose overflow
        # shows in the returned sum (no update here is then infinite).
        cost = output_layer(loss, output, zo, ao, do, np.int64(0), n_out, Y, row, one)
        for o in range(n_out):
            if not np.isfinite(do[o]):
                return total, s, correct, steps
        if loss == MSE and not np.isfinite(cost):  # finite deltas, an overflowing square
            return total, s, correct, steps
        total += cost
        correct += _row_correct(loss, ao, np.int64(0), Y, row)
        steps += 1
        b1_t *= hp[HP_BETA1]
        b2_t *= hp[HP_BETA2]
        for j in range(H):  # hidden deltas from the output weights before their update
            acc = zero
            for o in range(n_out):
                acc += B[w2 + o * H + j] * do[o]
            B[dh + j] = _dphi(hidden, B[zh + j], B[ah + j], acc)
        if plain:  # each step where its gradient is formed: no gradient buffer
            for o in range(n_out):
                st = do[o] * neg_lr
                for j in range(H):
                    B[w2 + o * H + j] += st * B[ah + j]
                B[b2 + o] += st
            for k in range(n_in):
                xk = X[row, k]
                for j in range(H):
                    B[w1 + k * H + j] += (B[dh + j] * neg_lr) * xk
            for j in range(H):
                B[b1 + j] += B[dh + j] * neg_lr
            continue
        # a stateful rule: the gradient into G, then one vectorized pass of the rule
        for o in range(n_out):
            d = do[o]
            for j in range(H):
                B[g + w2 + o * H + j] = d * B[ah + j]
            B[g + b2 + o] = d
        for k in range(n_in):
            xk = X[row, k]
            for j in range(H):
                B[g + w1 + k * H + j] = B[dh + j] * xk
        for j in range(H):
            B[g + b1 + j] = B[dh + j]
        c = rule_scalars_at(hp, b1_t, b2_t, one)
        # the common rules' loops inline, faster than a call on 2-8-1
        # (benchmarks/results/exact-update-ab-xeon-spr-20261202.json); _mul etc. keep their rounding
        _, lr, mom, _, _, _, beta1, obeta1, beta2, obeta2, eps, step_size, inv_bc2 = c
        if heavy:
            for i in range(n_params):
                B[i], B[m + i] = _momentum_step_of(B[i], B[m + i], B[g + i], mom, lr)
        elif adam:
            for i in range(n_params):
                B[i], B[m + i], B[v + i] = _adam_step_of(B[i], B[m + i], B[v + i], B[g + i], beta1, obeta1, beta2,
                                                         obeta2, eps, step_size, inv_bc2)
        elif l2 == 0:  # (all of _update_range inlined doubled the compile)
            _update_range(c, P, G, S, np.int64(0), np.int64(n_params), zero)
        else:  # l2 reaches the weights only (scikit-learn's alpha); hidden-major keeps W1 in [w1, b1)
            _update_range(c, P, G, S, np.int64(w1), np.int64(b1), l2)
            _update_range(c, P, G, S, np.int64(b1), np.int64(w2), zero)
            _update_range(c, P, G, S, np.int64(w2), np.int64(b2), l2)
            _update_range(c, P, G, S, np.int64(b2), np.int64(n_params), zero)
    return total, X.shape[0], correct, steps


@njit(cache=True, error_model="numpy", fastmath=_DOT_MATH, inline="always")
def shallow_body(n_in, H, n_out, hidden, output, loss, P, X, Y, order, hp, step, S, work, nxt, state_in, state_out):
    """``_shallow_body`` on a buffer holding hidden-major copies of ``P`` and ``S``
    (``_small_offsets``), written back after (also when it stops early), with denormals
    flushed (``flush_denormals``); inlined where it is called. The buffer and the output
    units' arrays are this call's own. With ``nxt`` not empty it also draws
    ``Generator.permutation(n)`` into it from PCG64 state ``state_in``, and writes the state
    after into ``state_out`` when the epoch ran to its end."""
    n_params, _, _, _, _, so = _small_offsets(n_in, H, n_out)
    B = np.zeros(so + max(2, S.shape[0]) * n_params, P.dtype)
    _relayout(P, B[:n_params], n_in, H, True)
    for b in range(S.shape[0]):
        _relayout(S[b], B[so + b * n_params:so + (b + 1) * n_params], n_in, H, True)
    zo, ao, do = np.empty(n_out, P.dtype), np.empty(n_out, P.dtype), np.empty(n_out, P.dtype)
    R = state_in.copy()
    for k in range(nxt.size):
        nxt[k] = k
    old = flush_denormals()
    total, done, correct, steps = _shallow_body(n_in, H, n_out, hidden, output, loss, _borrowed(B), _borrowed(X),
                                                _borrowed(Y), _borrowed(order), _borrowed(hp), _borrowed(step),
                                                _borrowed(zo), _borrowed(ao), _borrowed(do), _borrowed(nxt),
                                                _borrowed(R))
    restore_denormals(old)
    step[0] += steps  # counted here: a store to step inside the loop might alias the buffer for LLVM
    if nxt.size > 0 and done == X.shape[0]:
        state_out[:] = R
    _relayout(B[:n_params], P, n_in, H, False)
    for b in range(S.shape[0]):
        _relayout(B[so + b * n_params:so + (b + 1) * n_params], S[b], n_in, H, False)
    _alive(B)
    _alive(R)
    for kept in (zo, ao, do):
        _alive(kept)
    return total, done, correct


@njit(cache=True, error_model="numpy", fastmath=False)
def _batch_buffers(X, Y, order, batch_size):
    """Room for one batch's gathered rows of ``X`` and ``Y`` (none when ``order`` is empty)."""
    rows = min(batch_size, X.shape[0]) if order.size > 0 else 0
    return np.empty((rows, X.shape[1]), X.dtype), np.empty((rows, Y.shape[1]), Y.dtype)


@njit(cache=True, error_model="numpy", fastmath=False)
def _gather_rows(X, Y, order, start, stop, Xg, Yg):
    """Rows ``order[start:stop]`` of ``X`` and ``Y`` into the first rows of ``Xg``, ``Yg``
    (element loops: 2.4x faster than row-slice assignment here)."""
    for r in range(stop - start):
        i = order[start + r]
        for k in range(X.shape[1]):
            Xg[r, k] = X[i, k]
        for k in range(Y.shape[1]):
            Yg[r, k] = Y[i, k]


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _loop_epoch(sizes, hidden, output, loss, params, grads, X, Y, order, batch_size, hp, step, state, work, Xg, Yg):
    """A whole epoch of mini-batch training whose gradients come from the per-example loop,
    over the rows in ``order`` (empty: in their own order; else each batch gathered into
    ``Xg``, ``Yg``, see ``_batch_buffers``)."""
    n = X.shape[0]
    total = 0.0
    correct = 0
    shuffled = order.size > 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if shuffled:
            _gather_rows(X, Y, order, start, stop, Xg, Yg)
            cost, right = loop_batch(sizes, hidden, output, loss, params, Xg, Yg, grads, work, 0, stop - start)
        else:
            cost, right = loop_batch(sizes, hidden, output, loss, params, X, Y, grads, work, start, stop)
        if not np.isfinite(cost):
            return total, start, correct
        total += cost
        correct += right
        _apply_update(hp, step, sizes, params, grads, state, stop - start, step[:0])
    return total, n, correct


@njit(cache=True, error_model="numpy", fastmath=False)
def loop_epoch(sizes, hidden, output, loss, params, grads, X, Y, order, batch_size, hp, step, state, work):
    """``_loop_epoch`` with denormals flushed (``flush_denormals``)."""
    Xg, Yg = _batch_buffers(X, Y, order, batch_size)  # owned here, kept alive past the call (_alive)
    old = flush_denormals()
    out = _loop_epoch(_borrowed(sizes), hidden, output, loss, _borrowed(params), _borrowed(grads), _borrowed(X),
                      _borrowed(Y), _borrowed(order), batch_size, _borrowed(hp), _borrowed(step), _borrowed(state),
                      _borrowed(work), _borrowed(Xg), _borrowed(Yg))
    _alive(Xg)
    _alive(Yg)
    restore_denormals(old)
    return out


# ============================================================ the compiled mini-batch epoch
# Batch workspace: Z, A and D of every layer but the input, each (rows, units) row-major,
# back to back. Which products are hand loops and which BLAS GEMMs (np.dot) is decided by
# size, from ``plan = (forward_min, backward_min)`` in multiply-adds: a forward product below
# forward_min and a backward one below backward_min is a hand loop (a BLAS call costs more
# than the arithmetic there). Measured: OpenBLAS's small-matrix path wins from a few
# thousand multiply-adds on, even against hand loops that skip ReLU's zero deltas.
# plan[FIRST_TRANSPOSED] != 0: the first layer's weights (and their optimizer state) are held
# transposed, (n_in, n_out), for the epoch, so its two products are ``X @ Wt`` and
# ``Wt += -lr X^T D`` (no input delta is formed there); every product of that layer is then a
# GEMM, whatever the rows. The NumbaBackend sets it where that layout's GEMMs are faster.
FORWARD_MIN, BACKWARD_MIN, FIRST_TRANSPOSED, TEAM = 0, 1, 2, 3  # plan[TEAM:] is the update passes' team


def batch_plan(forward_min, backward_min, first_transposed=False, team=None) -> np.ndarray:
    """A mini-batch epoch's ``plan`` array, in the slot order above (``team``: the update
    passes' team, none by default)."""
    head = np.array([forward_min, backward_min, int(first_transposed)], np.int64)
    return head if team is None else np.concatenate([head, np.asarray(team, np.int64)])


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _first_transposed(plan):
    return plan.size > FIRST_TRANSPOSED and plan[FIRST_TRANSPOSED] != 0


@njit(cache=True, error_model="numpy", fastmath=False)
def _transpose_block(a, lo, rows, cols, tmp):
    """``a[lo:lo + rows*cols]``, a row-major (rows, cols) block, rewritten as its (cols, rows)
    transpose in place (through ``tmp``, at least rows*cols long)."""
    for i in range(rows * cols):
        tmp[i] = a[lo + i]
    for r in range(rows):
        for c in range(cols):
            a[lo + c * rows + r] = tmp[r * cols + c]


@njit(cache=True, error_model="numpy", fastmath=False)
def _transpose_first_layer(sizes, params, grads, state, to_transposed):
    """The first layer's weights in ``params``, ``grads`` and each row of ``state`` between
    (n_out, n_in) and (n_in, n_out) (``plan[FIRST_TRANSPOSED]``); the update rules are
    elementwise, so the state needs only the same layout as the weights."""
    n_in, n_out = sizes[0], sizes[1]
    rows, cols = (n_out, n_in) if to_transposed else (n_in, n_out)
    tmp = np.empty(n_in * n_out, params.dtype)
    _transpose_block(params, 0, rows, cols, tmp)
    if grads.size >= n_in * n_out:
        _transpose_block(grads, 0, rows, cols, tmp)
    for b in range(state.shape[0]):
        _transpose_block(state[b], 0, rows, cols, tmp)


@njit(cache=True, error_model="numpy", fastmath=False)
def _view_bases(work, sizes, u_off):
    """Where Z, A, D (rows 0, 1, 2) of each weight layer start in a batch workspace."""
    units = u_off[sizes.size] - sizes[0]
    cap = work.size // (3 * units)  # rows the workspace was made for
    bases = np.empty((3, sizes.size - 1), np.int64)
    for kind in range(3):
        for l in range(sizes.size - 1):
            bases[kind, l] = kind * cap * units + cap * (u_off[l + 1] - sizes[0])
    return bases


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _view(work, bases, sizes, n, kind, l):
    # Z, A or D (kind 0, 1, 2) of weight layer l: its first n rows
    base, k = bases[kind, l], sizes[l + 1]
    return work[base:base + n * k].reshape((n, k))


@njit(cache=True, error_model="numpy", fastmath=False)
def gemm(trans_a, trans_b, alpha, A, B, beta, C):
    """``C = alpha op(A) op(B) + beta C`` for row-major matrices (unit column stride), one BLAS
    ``?gemm`` (kernels/blas.py's library), with the alpha and beta that ``np.dot`` lacks: an
    update ``W += -lr D^T A`` is then one GEMM writing into the parameters (beta = 1), with no
    gradient buffer and no pass over it after."""
    m, n = C.shape
    if m == 0 or n == 0:
        return
    k = A.shape[0] if trans_a else A.shape[1]
    size = C.itemsize
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the operands swap
    ldb = max(1, B.strides[0] // size, B.shape[1])
    lda = max(1, A.strides[0] // size, A.shape[1])
    ldc = max(1, C.strides[0] // size, C.shape[1])
    _fortran_gemm(_T if trans_b else _N, _T if trans_a else _N, n, m, k, alpha, B, ldb, A, lda, beta, C, ldc)


@njit(cache=True, error_model="numpy", fastmath=False)
def gemm_loop(trans_a, trans_b, A, B, beta, C, reps):
    """``C = op(A) op(B) + beta C`` ``reps`` times back to back: one product alone, as the epochs
    call it (the benchmarks' GEMM-only time of a step)."""
    one = type(C[0, 0])(1.0)
    for _ in range(reps):
        gemm(trans_a, trans_b, one, A, B, beta, C)


@njit(cache=True, error_model="numpy", fastmath=False)
def _forward_product(A, P, wo, bo, W, Z, Anext, code, plan, transposed):
    """``Z = A @ W.T + b`` (``transposed``: W is held as W.T, ``Z = A @ W + b``) and, unless
    ``code < 0``, ``Anext = phi(Z)`` in the same pass as the bias."""
    n, n_in = A.shape
    n_out = Z.shape[1]
    Zf, Nf = Z.reshape(Z.size), Anext.reshape(Anext.size)
    if transposed or n * n_in * n_out >= plan[FORWARD_MIN]:
        gemm(False, not transposed, type(Z[0, 0])(1.0), A, W, type(Z[0, 0])(0.0), Z)
        _bias_act(code, Zf, P, bo, Nf, n, n_out)
        return
    Af = A.reshape(A.size)
    for s in range(n):
        dense(P, wo, bo, n_out, n_in, Af, s * n_in, Zf, s * n_out)
    if code >= 0:
        act_range(code, Zf, Nf, np.int64(0), Z.size)


@njit(cache=True, error_model="numpy", fastmath=False)
def _bias_act(code, Zf, P, bo, Af, n, k):
    """``Z += b`` row by row and, unless ``code < 0``, ``A = phi(Z)`` in the same pass:
    replaces ``add_bias`` + ``act_range`` (one pass over Z instead of two)."""
    k, bo = _U(k), _U(bo)
    for r in range(n):
        base = _U(r) * k
        if code == RELU:
            for j in range(k):
                z = Zf[base + j] + P[bo + j]
                Zf[base + j] = z
                Af[base + j] = z * 0 if z <= 0 else z
        elif code < 0:
            for j in range(k):
                Zf[base + j] += P[bo + j]
        else:
            for j in range(k):
                z = Zf[base + j] + P[bo + j]
                Zf[base + j] = z
            act_range(code, Zf, Af, np.int64(base), np.int64(k))


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _weight_gemm(alpha, D, A, beta, gW, transposed):
    """``gW = alpha dW + beta gW`` with ``dW = D^T A`` in W's layout, or ``A^T D`` where W is
    held transposed (``gW`` then its (n_in, n_out) view)."""
    if transposed:
        gemm(True, False, alpha, A, D, beta, gW)
    else:
        gemm(True, False, alpha, D, A, beta, gW)


@njit(cache=True, error_model="numpy", fastmath=False)
def _weight_step(D, A, G, wo, bo, gW, plan, neg_lr, transposed):
    """``dW = D^T @ A``, ``db = sum_rows D`` into the gradient buffer ``G`` (``gW`` its view of W)
    or, when ``neg_lr != 0`` (plain SGD), straight into the parameters ``G``: ``W += -lr D^T A``
    in the GEMM itself (beta = 1) and ``b += -lr sum_rows D``. ``transposed``: W is held as
    W.T (``gW`` its (n_in, n_out) view), its gradient ``A^T @ D``."""
    n, n_out = D.shape
    n_in = A.shape[1]
    fused = neg_lr != 0
    if not fused:
        for j in range(n_out):
            G[bo + j] = 0
    one = type(G[0])(1.0)
    if transposed or n * n_in * n_out >= plan[BACKWARD_MIN]:
        alpha, beta = (neg_lr, one) if fused else (one, type(G[0])(0.0))
        _weight_gemm(alpha, D, A, beta, gW, transposed)
        bias_grad(D, G[bo:bo + n_out], alpha, np.bool_(True))
        return
    if not fused:
        gW[:] = 0
    Df, Af = D.reshape(D.size), A.reshape(A.size)
    alpha = neg_lr if fused else one
    for s in range(n):
        rank1_update(G, wo, bo, n_out, n_in, Df, s * n_out, Af, s * n_in, alpha)


@njit(cache=True, error_model="numpy", fastmath=False)
def _input_delta(D, P, wo, W, out, plan):
    """``out = D @ W`` (the back-propagated delta before phi')."""
    n, n_out = D.shape
    n_in = out.shape[1]
    if n * n_in * n_out >= plan[BACKWARD_MIN]:
        gemm(False, False, type(out[0, 0])(1.0), D, W, type(out[0, 0])(0.0), out)
        return
    Df, Of = D.reshape(D.size), out.reshape(out.size)
    for s in range(n):
        dense_t(P, wo, n_out, n_in, Df, s * n_out, Of, s * n_in)


@njit(cache=True, error_model="numpy", fastmath=False)
def batch_forward(sizes, hidden, output, loss, params, Xb, Yb, work, plan, w_off, b_off, bases):
    """The forward pass and the fused output delta of the batch ``Xb``; returns the summed cost.

    The output delta is scaled by 1/n once, so every later product is already the mean's."""
    n_layers = sizes.size - 1
    n = Xb.shape[0]
    L = n_layers - 1
    a_prev = Xb
    for l in range(n_layers):
        Z, A = _view(work, bases, sizes, n, 0, l), _view(work, bases, sizes, n, 1, l)
        transposed = l == 0 and _first_transposed(plan)
        shape = (sizes[l], sizes[l + 1]) if transposed else (sizes[l + 1], sizes[l])
        W = params[w_off[l]:b_off[l]].reshape(shape)
        # hidden layers: bias and activation in one pass; the output's activation comes with its loss
        _forward_product(a_prev, params, w_off[l], b_off[l], W, Z, A, hidden if l < L else -1, plan, transposed)
        a_prev = A
    D = _view(work, bases, sizes, n, 2, L)
    Zf = _view(work, bases, sizes, n, 0, L).reshape(n * sizes[L + 1])
    Af, Df = a_prev.reshape(a_prev.size), D.reshape(D.size)
    return output_rows(loss, output, Zf, Af, Df, Yb, n, type(params[0])(1.0 / n))


@njit(cache=True, error_model="numpy", fastmath=False)
def _velocity_pass(P, G, M, lo, hi, beta, keep, lr):
    """``m = M beta + G``, ``p = p - m lr``, ``M = m keep`` over ``[lo, hi)``: ``heavy_ball``
    where ``beta`` = mom and ``keep`` = 1; ``keep`` = mom stores the velocity pre-scaled for a
    next step that adds its gradient with ``beta`` = 1 (``_momentum_step``)."""
    for i in range(_U(lo), _U(hi)):
        m = M[i] * beta + G[i]
        P[i] = P[i] - m * lr
        M[i] = m * keep


@njit(cache=True, error_model="numpy", fastmath=False)
def _momentum_step(D, A, P, G, M, wo, bo, plan, beta, keep, lr, transposed):
    """One layer's momentum step with the weight gradient formed in the GEMM that updates the
    velocity, ``M_W = beta M_W + D^T A`` (no gradient buffer written and read back for W), then
    ``p = p - m lr`` over W and b, storing ``M = m keep``.

    A BLAS GEMM with beta other than 0 or 1 costs a separate scaling pass over C (MKL: 2x the
    product's time at 784-256-10, benchmarks/results/momentum-beta-xeon-spr-20261202.json), so
    between the steps of an epoch the velocity is kept pre-scaled (``keep`` = mom, then
    ``beta`` = 1): the same products ``mom m`` rounded once, in the pass that reads m anyway.
    The first step of an epoch takes ``beta`` = mom, its last ``keep`` = 1, so the state between
    calls is the plain velocity. Products small enough for hand loops go the unfused way.
    ``transposed``: W is held as W.T (``_weight_step``), its velocity too.
    BLAS worker threads may run without this thread's denormal flushing; the pass reads each
    velocity in a flushing thread (this one, or a team's part, which flushes itself), so a
    denormal m becomes 0, as in ``heavy_ball``."""
    n, n_out = D.shape
    n_in = A.shape[1]
    hi = bo + n_out
    if not transposed and n * n_in * n_out < plan[BACKWARD_MIN]:
        _weight_step(D, A, G, wo, bo, G[wo:bo].reshape((n_out, n_in)), plan, type(lr)(0.0), False)
        _velocity_pass(P, G, M, wo, hi, beta, keep, lr)
        return
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    _weight_gemm(type(lr)(1.0), D, A, beta, M[wo:bo].reshape(shape), transposed)
    bias_grad(D, G[bo:hi], type(lr)(1.0), np.bool_(False))
    for j in range(_U(bo), _U(hi)):
        M[j] = M[j] * beta + G[j]
    team = plan[TEAM:]
    parts = _team_parts(team, hi - wo)
    if parts > 1:
        zero = lr - lr
        _team_pass(team, parts, TASK_SCALED_VELOCITY, P, G, M, M, wo, hi, (lr, keep, zero, zero, zero, zero, zero))
    else:
        _scaled_velocity_pass(P, M, wo, hi, lr, keep)


@njit(cache=True, error_model="numpy", fastmath=False)
def batch_backward(sizes, hidden, params, grads, Xb, work, plan, w_off, b_off, bases, neg_lr, beta, keep, M):
    """After ``batch_forward``: per layer from the top, ``D_prev = phi'(Z) (.) (D W)`` (with W
    before its update), then ``dW = D^T A``, ``db = sum D`` into ``grads`` -- or the step
    itself, for plain SGD (``neg_lr = -lr``, else 0) into ``params`` (``_weight_step``), for
    momentum without weight decay, l2 or Nesterov (``beta`` != 0, ``M`` its velocity) through
    ``_momentum_step``. With the first layer held transposed
    (``plan[FIRST_TRANSPOSED]``) its step is formed as ``A^T D`` into W.T."""
    n = Xb.shape[0]
    lr = -neg_lr
    for l in range(sizes.size - 2, -1, -1):
        D = _view(work, bases, sizes, n, 2, l)
        a_prev = Xb if l == 0 else _view(work, bases, sizes, n, 1, l - 1)
        transposed = l == 0 and _first_transposed(plan)  # no input delta there
        shape = (sizes[l], sizes[l + 1]) if transposed else (sizes[l + 1], sizes[l])
        if l > 0:
            D_prev = _view(work, bases, sizes, n, 2, l - 1)
            _input_delta(D, params, w_off[l], params[w_off[l]:b_off[l]].reshape(shape), D_prev, plan)
            activation_backward(hidden, _view(work, bases, sizes, n, 0, l - 1), a_prev, D_prev)
        if beta != 0:
            _momentum_step(D, a_prev, params, grads, M, w_off[l], b_off[l], plan, beta, keep, lr, transposed)
            continue
        target = params if neg_lr != 0 else grads
        _weight_step(D, a_prev, target, w_off[l], b_off[l], target[w_off[l]:b_off[l]].reshape(shape), plan, neg_lr,
                     transposed)


@njit(cache=True, error_model="numpy", fastmath=False)
def batch_gradients(sizes, hidden, output, loss, params, grads, Xb, Yb, work, plan, w_off, b_off, bases):
    """Gradients of the mean cost over the batch ``Xb`` into ``grads``; returns the summed cost.
    The weights are in their usual layout here: ``plan``'s FIRST_TRANSPOSED is not read (only
    ``batch_epoch`` transposes the first layer, for its own steps)."""
    plan = plan[:FIRST_TRANSPOSED]
    total = batch_forward(sizes, hidden, output, loss, params, Xb, Yb, work, plan, w_off, b_off, bases)
    zero = type(params[0])(0.0)
    batch_backward(sizes, hidden, params, grads, Xb, work, plan, w_off, b_off, bases, zero, zero, zero, params[:0])
    return total


@njit(cache=True, error_model="numpy", fastmath=False, inline="always")
def _batch_epoch(sizes, hidden, output, loss, params, grads, X, Y, order, batch_size, hp, step, state, work, plan,
                 Xg, Yg):
    """A whole epoch of mini-batch training in the matrix form, in one call, over the rows in
    ``order`` (each batch gathered into a buffer that stays in cache; empty: in their own
    order). Plain SGD and momentum without weight decay, l2 or Nesterov are fused into the
    weight-gradient GEMMs (``batch_backward``); any other rule gets the gradients and then
    ``apply_update``."""
    n = X.shape[0]
    w_owned, b_owned, u_owned = layer_offsets(sizes)
    bases_owned = _view_bases(work, sizes, u_owned)
    w_off, b_off, bases = _borrowed(w_owned), _borrowed(b_owned), _borrowed(bases_owned)  # no counting per step
    L = sizes.size - 2
    k = sizes[L + 1]
    one = type(params[0])(1.0)
    # plain SGD and momentum without decay are fused into the backward pass (batch_backward)
    undecayed = int(hp[HP_KIND]) == SGD and hp[HP_WEIGHT_DECAY] == 0 and hp[HP_L2] == 0
    plain = undecayed and hp[HP_MOMENTUM] == 0
    heavy = undecayed and hp[HP_MOMENTUM] != 0 and hp[HP_NESTEROV] == 0
    zero = one - one
    neg_lr = -one * type(one)(hp[HP_LR]) if plain or heavy else zero
    mom = type(one)(hp[HP_MOMENTUM]) if heavy else zero
    M = state[0] if heavy else params[:0]
    total = 0.0
    correct = 0
    shuffled = order.size > 0
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if shuffled:
            _gather_rows(X, Y, order, start, stop, Xg, Yg)
            Xb, Yb = Xg[:stop - start], Yg[:stop - start]
        else:
            Xb, Yb = X[start:stop], Y[start:stop]
        cost = batch_forward(sizes, hidden, output, loss, params, Xb, Yb, work, plan, w_off, b_off, bases)
        if not np.isfinite(cost):
            if heavy and start > 0:  # the plain velocity again (to an ulp; fit restores its snapshot anyway)
                for i in range(M.size):
                    M[i] = M[i] / mom
            return total, start, correct
        total += cost
        if loss != MSE:
            A = _view(work, bases, sizes, stop - start, 1, L).reshape((stop - start) * k)
            for r in range(stop - start):
                correct += _row_correct(loss, A, r * k, Yb, r)
        # momentum: the velocity stays pre-scaled between this epoch's steps (_momentum_step)
        beta = mom if start == 0 or not heavy else one
        keep = mom if heavy and stop < n else one
        batch_backward(sizes, hidden, params, grads, Xb, work, plan, w_off, b_off, bases, neg_lr, beta, keep, M)
        if plain or heavy:
            step[0] += 1
        else:
            _apply_update(hp, step, sizes, params, grads, state, stop - start, plan[TEAM:])
    _alive(w_owned)
    _alive(b_owned)
    _alive(u_owned)
    _alive(bases_owned)
    return total, n, correct


@njit(cache=True, error_model="numpy", fastmath=False)
def batch_epoch(sizes, hidden, output, loss, params, grads, X, Y, order, batch_size, hp, step, state, work, plan):
    """``_batch_epoch`` with denormals flushed (``flush_denormals``)."""
    Xg, Yg = _batch_buffers(X, Y, order, batch_size)  # owned here, kept alive past the call (_alive)
    old = flush_denormals()
    transposed = _first_transposed(plan)
    if transposed:
        _transpose_first_layer(sizes, params, grads, state, True)
    out = _batch_epoch(_borrowed(sizes), hidden, output, loss, _borrowed(params), _borrowed(grads), _borrowed(X),
                       _borrowed(Y), _borrowed(order), batch_size, _borrowed(hp), _borrowed(step), _borrowed(state),
                       _borrowed(work), _borrowed(plan), _borrowed(Xg), _borrowed(Yg))
    if transposed:  # every return of the epoch, a diverged one too, leaves the usual layout
        _transpose_first_layer(sizes, params, grads, state, False)
    _alive(Xg)
    _alive(Yg)
    restore_denormals(old)
    return out
