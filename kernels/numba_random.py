"""NumPy's ``Generator.permutation`` for a PCG64 generator, compiled, bit for bit: the same
stream of draws, so a fit that shuffles in compiled code visits the rows in the order (and
leaves the generator in the state) that ``rng.permutation`` would.

NumPy draws ``permutation(n)`` as ``arange(n)`` shuffled by Fisher-Yates from the top,
``j = random_interval(i)`` for i = n-1 .. 1: the bits of ``next_uint32`` (or ``next_uint64``
above 2^32 - 1) masked to i's bit length, redrawn while above i. PCG64's ``next_uint32`` hands
out the low half of a 64-bit output and keeps the high half for the next call. A state is
five uint64: the 128-bit LCG state (high, low), its increment (high, low), and the buffered
half as ``has_uint32 << 32 | uinteger`` (``pcg64_state``).

Used by the small nets' per-example kernel to draw the next epoch's order while it trains
(the integer chain runs beside the floating-point one; drawn apart, the tiny net's permutation
was ~10% of its epoch). Numba's disk cache does not see an edit here in the kernels that inline
these functions: the generated small kernels carry this file's hash in their names
(kernels/numba.py), numba_kernels.shallow_epoch_drawing does not (clear kernels/__pycache__).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

PCG64_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645
_MASK64 = (1 << 64) - 1
_LOW32 = np.uint64(0xFFFFFFFF)
_HAS32 = np.uint64(1 << 32)


@intrinsic
def _pcg64_next(typingctx, s_hi, s_lo, i_hi, i_lo):
    """PCG64's step, ``s = s * MULTIPLIER + inc`` mod 2^128, and its XSL-RR output of the new
    state (xor of the halves rotated right by the top 6 bits): ``(s_hi, s_lo, output)``."""
    u64 = types.uint64
    if not all(t == u64 for t in (s_hi, s_lo, i_hi, i_lo)):
        return None

    def codegen(context, builder, signature, args):
        i64, i128 = ir.IntType(64), ir.IntType(128)

        def join(hi, lo):
            return builder.or_(builder.shl(builder.zext(hi, i128), ir.Constant(i128, 64)), builder.zext(lo, i128))

        s = builder.add(builder.mul(join(args[0], args[1]), ir.Constant(i128, PCG64_MULTIPLIER)),
                        join(args[2], args[3]))
        hi, lo = builder.trunc(builder.lshr(s, ir.Constant(i128, 64)), i64), builder.trunc(s, i64)
        x = builder.xor(hi, lo)
        fshr = builder.module.declare_intrinsic("llvm.fshr", [i64], ir.FunctionType(i64, [i64, i64, i64]))
        out = builder.call(fshr, [x, x, builder.lshr(hi, ir.Constant(i64, 58))])
        return context.make_tuple(builder, signature.return_type, [hi, lo, out])

    return types.UniTuple(u64, 3)(u64, u64, u64, u64), codegen


@njit(cache=True, fastmath=False, inline="always")
def random_interval(rs, top):
    """NumPy's ``random_interval(bitgen, top)`` for ``top >= 1`` (NumPy returns 0 for 0
    without drawing; Fisher-Yates never asks): uniform on [0, top] from PCG64 state ``rs``
    (advanced in place)."""
    top = np.uint64(top)
    mask = top
    for shift in (1, 2, 4, 8, 16, 32):
        mask |= mask >> np.uint64(shift)
    while True:
        if top <= _LOW32:  # next_uint32: the buffered half, else the low half of a new output
            if rs[4] >= _HAS32:
                v = rs[4] & _LOW32
                rs[4] = v  # has_uint32 = 0, uinteger kept (as NumPy keeps it)
            else:
                rs[0], rs[1], r = _pcg64_next(rs[0], rs[1], rs[2], rs[3])
                rs[4] = _HAS32 | (r >> np.uint64(32))
                v = r & _LOW32
        else:
            rs[0], rs[1], v = _pcg64_next(rs[0], rs[1], rs[2], rs[3])
        v &= mask
        if v <= top:
            return np.int64(v)


@njit(cache=True, fastmath=False, inline="always")
def shuffle_step(rs, out, i):
    """Fisher-Yates step ``i`` (n-1 down to 1) of ``permutation``: swap out[i] with a uniform
    out[j], j <= i."""
    j = random_interval(rs, i)
    t = out[i]
    out[i] = out[j]
    out[j] = t


@njit(cache=True, fastmath=False)
def permutation_into(rs, out):
    """``out[:] = rng.permutation(out.size)`` for the PCG64 generator whose state is ``rs``
    (advanced in place)."""
    n = out.size
    for k in range(n):
        out[k] = k
    for i in range(n - 1, 0, -1):
        shuffle_step(rs, out, i)


def pcg64_state(rng) -> np.ndarray | None:
    """``rng``'s state as the five uint64 above, or None when its bit generator is not PCG64."""
    bg = getattr(rng, "bit_generator", None)
    if type(bg) is not np.random.PCG64:
        return None
    d = bg.state
    s, inc = d["state"]["state"], d["state"]["inc"]
    return np.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, (d["has_uint32"] << 32) | d["uinteger"]],
                    np.uint64)


def pcg64_state_dict(rs: np.ndarray) -> dict:
    """State ``rs`` (from ``pcg64_state``, perhaps advanced) as ``bit_generator.state`` takes it."""
    hi, lo, inc_hi, inc_lo, half = (int(v) for v in rs)
    return {"bit_generator": "PCG64", "state": {"state": hi << 64 | lo, "inc": inc_hi << 64 | inc_lo},
            "has_uint32": half >> 32, "uinteger": half & 0xFFFFFFFF}
