"""The kernel contract between ``fastbp/`` and the backends in ``kernels/``.

A backend is a subclass of :class:`Backend`. It provides the basic kernels the
backpropagation math needs; every kernel writes into a caller-owned output
buffer (``out=`` / in place), so a training step can run without allocating.

Conventions (all backends):

* Batches are row-major: activations ``A`` and deltas ``D`` of a layer with
  ``k`` units have shape ``(n_samples, k)``; ``W`` has shape ``(k, k_prev)``.
  In this layout the textbook's ``z = W a + b`` is ``Z = A_prev @ W.T + b``
  and ``dW = delta a^T`` summed over the batch is ``D.T @ A_prev``.
* ``loss_sum`` values are the *sum* of per-example costs (the model divides
  by ``n``); they may be device scalars on a GPU backend, so reading one back
  is the caller's choice.
* Activation names: ``sigmoid, relu, tanh, identity, leaky_relu`` (elementwise,
  usable anywhere) and ``softmax`` (row-wise, output layer only).
* Loss names: ``mse, log_loss, cross_entropy``. Targets ``Y`` reach the kernels
  as float arrays of shape ``(n_samples, n_outputs)`` (labels already one-hot).

Optional fast paths are advertised by capability flags, never by backend
name: ``has_compiled_loop`` (``loop_gradients``) and ``has_compiled_epoch``
(``supports_epoch`` / ``train_epoch``). A new backend works with the basic
kernels alone; the defaults below compose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ELEMENTWISE_ACTIVATIONS = ("sigmoid", "relu", "tanh", "identity", "leaky_relu")
ACTIVATIONS = ELEMENTWISE_ACTIVATIONS + ("softmax",)
LOSSES = ("mse", "log_loss", "cross_entropy")
LEAKY_SLOPE = 0.01  # negative-side slope of leaky_relu, as in PyTorch's default


@dataclass(frozen=True)
class NetSpec:
    """What a fused or compiled fast path needs to know about a network.

    Parameters live in one flat buffer laid out ``[W1, b1, W2, b2, ...]``;
    ``w_offsets[l]`` / ``b_offsets[l]`` are where layer ``l+1``'s weight
    (row-major, shape ``(sizes[l+1], sizes[l])``) and bias start.
    """

    sizes: tuple[int, ...]
    hidden: str
    output: str
    loss: str
    dtype: np.dtype

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def w_offsets(self) -> tuple[int, ...]:
        return self._offsets()[0]

    @property
    def b_offsets(self) -> tuple[int, ...]:
        return self._offsets()[1]

    @property
    def n_params(self) -> int:
        return sum(o * (i + 1) for i, o in zip(self.sizes[:-1], self.sizes[1:]))

    def activation(self, layer: int) -> str:
        """Activation of layer ``layer`` (0-based over the weight layers)."""
        return self.output if layer == self.n_layers - 1 else self.hidden

    def _offsets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w_off, b_off, pos = [], [], 0
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            w_off.append(pos)
            pos += fan_out * fan_in
            b_off.append(pos)
            pos += fan_out
        return tuple(w_off), tuple(b_off)


class Backend:
    """Base class: the kernel contract, with composed defaults for the optional parts."""

    name: str = "base"
    is_gpu: bool = False
    has_compiled_loop: bool = False
    has_compiled_epoch: bool = False
    xp: Any = np  # the array module (numpy or cupy)

    # ------------------------------------------------------------ arrays
    def asarray(self, x, dtype=None):
        """A C-contiguous array on this backend (copies only when needed)."""
        raise NotImplementedError

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""

    def all_finite(self, a) -> bool:
        return bool(self.xp.isfinite(a).all())

    def take_rows(self, src, index, out) -> None:
        """``out[:] = src[index]`` (a shuffled copy of a data set)."""
        self.xp.take(src, index, axis=0, out=out)

    def index_array(self, index: np.ndarray):
        """A host permutation as this backend's index array."""
        return self.xp.asarray(index)

    def info(self) -> dict:
        """Versions, threads and devices, for ``fastbp info`` and benchmark records."""
        return {"name": self.name}

    # ------------------------------------------------------------ basic kernels
    def matmul(self, a, b, out, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """``out = alpha * op(a) @ op(b) + beta * out``; ``op`` transposes when asked."""
        raise NotImplementedError

    def hadamard(self, a, b, out):
        """``out = a * b`` elementwise."""
        raise NotImplementedError

    def outer(self, x, y, out, *, alpha=1.0, accumulate=True):
        """``out += alpha * x y^T`` (or ``=`` when not accumulating); x, y are 1-D."""
        raise NotImplementedError

    def add_bias(self, z, b):
        """``z += b`` on every row, in place."""
        raise NotImplementedError

    def bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
        """``out (+)= alpha * delta.sum(axis=0)``."""
        raise NotImplementedError

    def activation(self, name, z, out):
        """``out = phi(z)``."""
        raise NotImplementedError

    def activation_backward(self, name, z, a, delta):
        """``delta = phi'(z) (.) delta`` in place (a vector-Jacobian product for softmax).

        ``a = phi(z)`` is passed too, since sigmoid/tanh/softmax derivatives are
        cheapest from it.
        """
        raise NotImplementedError

    def output_delta(self, loss, output, z, a, y, delta):
        """Fused output layer: ``delta = dC/dz^L`` per example; returns the summed cost.

        Computed from the logits ``z`` where the loss allows (sigmoid+log_loss,
        softmax+cross_entropy), so extreme logits give no NaN or Inf.
        """
        raise NotImplementedError

    def loss_sum(self, loss, output, z, a, y):
        """The summed cost alone (no delta), from logits where possible."""
        raise NotImplementedError

    def sgd_update(self, params, grads, lr):
        """``params -= lr * grads`` over the flat buffers."""
        raise NotImplementedError

    # ------------------------------------------------------------ composed (overridable)
    def hidden_delta(self, name, delta_next, w_next, z, a, out):
        """``out = phi'(z) (.) (delta_next @ W_next)``: the hidden-layer delta.

        A backend may fuse the Hadamard into the GEMM's epilogue; this default
        runs the GEMM then the in-place derivative.
        """
        self.matmul(delta_next, w_next, out)
        self.activation_backward(name, z, a, out)

    # ------------------------------------------------------------ optional fast paths
    def loop_gradients(self, spec: NetSpec, params, X, Y, grads):
        """Per-example loop in one compiled call; mean gradients into ``grads``,
        returns the summed cost. Only when ``has_compiled_loop``."""
        raise NotImplementedError

    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str) -> bool:
        return False

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, lr, strategy):
        """A whole epoch of mini-batch SGD over ``X, Y`` (already shuffled), in order.

        Returns ``(loss_sum, n_done)``: the summed pre-update cost of the batches
        run and how many examples they covered. Stops early (``n_done < n``) at
        the first batch whose cost is not finite, without applying its update.
        """
        raise NotImplementedError
