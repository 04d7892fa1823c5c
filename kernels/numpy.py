"""NumPy backend: the reference kernels, BLAS GEMMs and ufuncs writing into ``out=``.

Every kernel reads top to bottom as the math: an activation's forward sits beside
its derivative, a loss's value beside its fused output delta. Scratch buffers
(row maxima, softplus terms) are cached per shape and thread, up to
``SCRATCH_BYTES`` per thread, so steady-state training of ordinary size
allocates no arrays and a process seeing many input sizes keeps a bounded amount.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from .base import LEAKY_SLOPE, Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    # Scratch kept per thread, in bytes: enough for the steady state of a training step of
    # ordinary size; a buffer bigger than this is allocated for its call and never kept.
    SCRATCH_BYTES = 32 << 20

    def __init__(self) -> None:
        # Per thread: ufuncs release the GIL, so models training in two threads must not share.
        self._local = threading.local()

    def _buf(self, tag: str, shape: tuple, dtype) -> np.ndarray:
        """A scratch array for ``tag``, reused across calls of one shape (least recently used
        dropped past ``SCRATCH_BYTES``). Fetch it once per kernel call: a second fetch may
        return a different array once the first has been dropped."""
        local = self._local.__dict__
        scratch = local.get("scratch")
        if scratch is None:
            scratch = local["scratch"] = OrderedDict()
            local["bytes"] = 0
        key = (tag, shape, np.dtype(dtype).str)
        buf = scratch.get(key)
        if buf is not None:
            scratch.move_to_end(key)
            return buf
        buf = np.empty(shape, dtype=dtype)
        if buf.nbytes <= self.SCRATCH_BYTES:
            while scratch and local["bytes"] + buf.nbytes > self.SCRATCH_BYTES:
                local["bytes"] -= scratch.popitem(last=False)[1].nbytes
            scratch[key] = buf
            local["bytes"] += buf.nbytes
        return buf

    def scratch_bytes(self) -> int:
        """Bytes of scratch this thread keeps between calls (at most ``SCRATCH_BYTES``)."""
        return self._local.__dict__.get("bytes", 0)

    # ------------------------------------------------------------ arrays
    def asarray(self, x, dtype=None):
        if type(x).__module__.startswith("cupy"):
            x = x.get()
        return np.ascontiguousarray(x, dtype=dtype)

    def take_rows(self, src, index, out):
        # mode="clip" lets numpy write straight into `out` (mode="raise" buffers a copy).
        np.take(src, index, axis=0, out=out, mode="clip")

    def info(self) -> dict:
        from threadpoolctl import threadpool_info

        blas = [
            {k: p.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")}
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        ]
        return {"name": self.name, "numpy": np.__version__, "blas": blas}

    # ------------------------------------------------------------ basic kernels
    def matmul(self, a, b, out, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if beta == 0.0:
            np.matmul(a, b, out=out)
            if alpha != 1.0:
                out *= alpha
            return
        tmp = self._buf("matmul", out.shape, out.dtype)
        np.matmul(a, b, out=tmp)
        if beta != 1.0:
            out *= beta
        if alpha != 1.0:
            tmp *= alpha
        out += tmp

    def hadamard(self, a, b, out):
        np.multiply(a, b, out=out)

    def outer(self, x, y, out, *, alpha=1.0, accumulate=True):
        tmp = self._buf("outer", out.shape, out.dtype) if accumulate else out
        np.multiply(x[:, None], y[None, :], out=tmp)
        if alpha != 1.0:
            tmp *= alpha
        if accumulate:
            out += tmp

    def add_bias(self, z, b):
        z += b

    def bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
        if not accumulate:
            np.sum(delta, axis=0, out=out)
            if alpha != 1.0:
                out *= alpha
            return
        tmp = self._buf("bias", out.shape, out.dtype)
        np.sum(delta, axis=0, out=tmp)
        if alpha != 1.0:
            tmp *= alpha
        out += tmp

    # ---- activations: forward beside derivative
    def activation(self, name, z, out):
        if name == "sigmoid":
            # exp(-log(1 + e^-z)): no overflow for any z, full relative precision near 0.
            np.negative(z, out=out)
            np.logaddexp(0.0, out, out=out)
            np.negative(out, out=out)
            np.exp(out, out=out)
        elif name == "tanh":
            np.tanh(z, out=out)
        elif name == "relu":
            np.maximum(z, 0.0, out=out)
        elif name == "leaky_relu":  # max(z, slope z); the scaled copy must not overwrite z itself
            scaled = out if out is not z else self._buf("leaky", z.shape, z.dtype)
            np.multiply(z, LEAKY_SLOPE, out=scaled)
            np.maximum(z, scaled, out=out)
        elif name == "identity":
            if out is not z:
                np.copyto(out, z)
        elif name == "softmax":
            rows = self._buf("rows", (z.shape[0], 1), z.dtype)
            np.max(z, axis=1, keepdims=True, out=rows)
            np.subtract(z, rows, out=out)
            np.exp(out, out=out)
            np.sum(out, axis=1, keepdims=True, out=rows)
            out /= rows
        else:
            raise ValueError(f"unknown activation {name!r}")

    def activation_backward(self, name, z, a, delta):
        if name == "sigmoid":  # a (1 - a)
            tmp = self._buf("act", delta.shape, delta.dtype)
            np.subtract(1.0, a, out=tmp)
            tmp *= a
            delta *= tmp
        elif name == "tanh":  # 1 - a^2
            tmp = self._buf("act", delta.shape, delta.dtype)
            np.multiply(a, a, out=tmp)
            np.subtract(1.0, tmp, out=tmp)
            delta *= tmp
        elif name in ("relu", "leaky_relu"):  # 1 where z > 0, else 0 (relu) or the slope
            mask = self._buf("mask", z.shape, np.bool_)
            np.less_equal(z, 0.0, out=mask)
            np.multiply(delta, LEAKY_SLOPE if name == "leaky_relu" else 0.0, out=delta, where=mask)
        elif name == "identity":
            pass
        elif name == "softmax":  # J^T g = a (.) (g - <a, g>) per row
            rows = self._buf("rows", (delta.shape[0], 1), delta.dtype)
            tmp = self._buf("act", delta.shape, delta.dtype)
            np.multiply(a, delta, out=tmp)
            np.sum(tmp, axis=1, keepdims=True, out=rows)
            delta -= rows
            delta *= a
        else:
            raise ValueError(f"unknown activation {name!r}")

    # ---- losses: value beside fused output delta
    def output_delta(self, loss, output, z, a, y, delta):
        if loss == "mse":  # c = 1/2 |a - y|^2, dc/da = a - y
            np.subtract(a, y, out=delta)
            total = 0.5 * _sum_of_squares(delta, self._buf("loss", delta.shape, delta.dtype))
            self.activation_backward(output, z, a, delta)
            return total
        if loss == "log_loss" and output == "sigmoid":  # dc/dz = a - y exactly
            total = self.loss_sum(loss, output, z, a, y)
            np.subtract(a, y, out=delta)
            return total
        if loss == "cross_entropy" and output == "softmax":  # dc/dz = a sum(y) - y
            total = self.loss_sum(loss, output, z, a, y)
            rows = self._buf("rows", (y.shape[0], 1), y.dtype)
            np.sum(y, axis=1, keepdims=True, out=rows)
            np.multiply(a, rows, out=delta)
            delta -= y
            return total
        # Any other output activation: dc/da on the clipped activation, then phi'.
        total = self.loss_sum(loss, output, z, a, y)
        ac = self._clipped(a)
        if loss == "log_loss":  # dc/da = (a - y) / (a (1 - a))
            tmp = self._buf("ce", a.shape, a.dtype)
            np.subtract(1.0, ac, out=tmp)
            tmp *= ac
            np.subtract(ac, y, out=delta)
            delta /= tmp
        else:  # cross_entropy: dc/da = -y / a
            np.divide(y, ac, out=delta)
            np.negative(delta, out=delta)
        # The cost saw the clipped a, which is flat where clipping bit: no gradient there.
        clipped = self._buf("mask", a.shape, np.bool_)
        np.not_equal(a, ac, out=clipped)
        np.copyto(delta, 0.0, where=clipped)
        self.activation_backward(output, z, a, delta)
        return total

    def loss_sum(self, loss, output, z, a, y):
        tmp = self._buf("loss", z.shape, z.dtype)
        if loss == "mse":
            np.subtract(a, y, out=tmp)
            return 0.5 * _sum_of_squares(tmp, tmp)
        if loss == "log_loss" and output == "sigmoid":
            # -[y log s(z) + (1-y) log(1-s(z))] = (1-y) softplus(z) + y softplus(-z):
            # no cancellation, so a tiny cost keeps its relative precision.
            tmp2 = self._buf("loss2", z.shape, z.dtype)
            np.logaddexp(0.0, z, out=tmp)
            np.subtract(1.0, y, out=tmp2)
            tmp *= tmp2
            np.negative(z, out=tmp2)
            np.logaddexp(0.0, tmp2, out=tmp2)
            tmp2 *= y
            tmp += tmp2
            return float(tmp.sum(dtype=np.float64))
        if loss == "cross_entropy" and output == "softmax":
            # -sum_j y_j log softmax_j = sum_j y_j (logsumexp(z) - z_j)
            # computed as (max - z_j) + log sum exp(z - max): no cancellation against max
            rows = self._buf("rows", (z.shape[0], 1), z.dtype)
            np.max(z, axis=1, keepdims=True, out=rows)
            np.subtract(z, rows, out=tmp)
            lse = self._buf("lse", (z.shape[0], 1), z.dtype)
            exps = self._buf("loss2", z.shape, z.dtype)
            np.exp(tmp, out=exps)
            np.sum(exps, axis=1, keepdims=True, out=lse)
            np.log(lse, out=lse)
            np.subtract(lse, tmp, out=tmp)
            tmp *= y
            return float(tmp.sum(dtype=np.float64))
        ac = self._clipped(a)
        if loss == "log_loss":
            tmp2 = self._buf("loss2", z.shape, z.dtype)
            np.log(ac, out=tmp)
            tmp *= y
            np.subtract(1.0, ac, out=tmp2)
            np.log(tmp2, out=tmp2)
            one_minus_y = self._buf("loss3", z.shape, z.dtype)
            np.subtract(1.0, y, out=one_minus_y)
            tmp2 *= one_minus_y
            tmp += tmp2
            return -float(tmp.sum(dtype=np.float64))
        np.log(ac, out=tmp)
        tmp *= y
        return -float(tmp.sum(dtype=np.float64))

    def _clipped(self, a):
        """``a`` clipped into ``[eps, 1 - eps]`` so logs and divisions stay finite."""
        eps = np.finfo(a.dtype).eps
        out = self._buf("clip", a.shape, a.dtype)
        np.clip(a, eps, 1.0 - eps, out=out)
        return out

    def update(self, spec, rule, params, grads, state, rows):
        """The optimizer step of :class:`~fastbp.kernels.base.UpdateRule`, in place, in the model
        dtype, layer segment by segment (scikit-learn's ``l2`` reaches weights only)."""
        t = int(state.step[0]) + 1
        T = params.dtype.type
        g = self._buf("upd_g", params.shape, params.dtype)
        tmp = self._buf("upd_tmp", params.shape, params.dtype)
        decay = rule.weight_decay if rule.kind != "adamw" else 0.0
        np.copyto(g, grads)
        if decay:  # torch: g = g + wd * p (every weight and bias)
            np.multiply(params, T(decay), out=tmp)
            g += tmp
        if rule.l2:  # scikit-learn: g += alpha / rows * W (weights only)
            for lo, hi in zip(spec.w_offsets, spec.b_offsets):
                np.multiply(params[lo:hi], T(rule.l2 / rows), out=tmp[lo:hi])
                g[lo:hi] += tmp[lo:hi]
        if rule.kind == "sgd":
            if rule.momentum:
                m = state.buffers[0]
                m *= T(rule.momentum)  # m = momentum m + g  (m = g on the first step: m starts at 0)
                m += g
                if rule.nesterov:
                    np.multiply(m, T(rule.momentum), out=tmp)
                    g += tmp
                else:
                    np.copyto(g, m)
            np.multiply(g, T(rule.lr), out=tmp)
            params -= tmp
        else:
            if rule.kind == "adamw" and rule.weight_decay:
                params *= T(1.0 - rule.lr * rule.weight_decay)
            m, v = state.buffers[0], state.buffers[1]
            b1, b2 = rule.beta1, rule.beta2
            m *= T(b1)  # m = b1 m + (1 - b1) g
            np.multiply(g, T(1.0 - b1), out=tmp)
            m += tmp
            v *= T(b2)  # v = b2 v + (1 - b2) g^2
            np.multiply(g, g, out=tmp)
            tmp *= T(1.0 - b2)
            v += tmp
            step_size = rule.lr / (1.0 - b1 ** t)
            inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** t)
            np.sqrt(v, out=tmp)  # denom = sqrt(v) / sqrt(1 - b2^t) + eps
            tmp *= T(inv_sqrt_bc2)
            tmp += T(rule.eps)
            np.divide(m, tmp, out=tmp)
            tmp *= T(step_size)
            params -= tmp
        state.step[0] = t



def _sum_of_squares(x, scratch) -> float:
    """sum(x^2) accumulated in float64 (a float32 sum of huge costs would overflow first)."""
    np.multiply(x, x, out=scratch)
    return float(scratch.sum(dtype=np.float64))


def create() -> NumpyBackend:
    """The NumPy backend is always usable."""
    return NumpyBackend()
