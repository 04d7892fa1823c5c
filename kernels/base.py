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

Parameters change in one place per backend: :meth:`Backend.update` applies an
:class:`UpdateRule` (SGD with momentum/Nesterov/weight decay, Adam, AdamW: torch.optim's
formulas) to the flat buffers, with the rule's state in an :class:`OptimizerState`; the
compiled and captured fast paths call it, or a fused form of the same formulas.

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

# The one numbering of activations, losses and update rules that every compiled backend uses
# (the Numba kernels import these; the CUDA sources get them as #defines from kernels/cupy.py).
ACT_CODE = {"sigmoid": 0, "relu": 1, "tanh": 2, "identity": 3, "leaky_relu": 4, "softmax": 5}
LOSS_CODE = {"mse": 0, "log_loss": 1, "cross_entropy": 2}
UPDATE_RULES = ("sgd", "adam", "adamw")
RULE_CODE = {"sgd": 0, "adam": 1, "adamw": 2}
# Layout of UpdateRule.hyper(), the float64 vector compiled kernels read the rule from.
HP_KIND, HP_LR, HP_MOMENTUM, HP_NESTEROV, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS, HP_L2 = range(9)
N_HYPER = 9


@dataclass(frozen=True)
class UpdateRule:
    """One parameter update, as data: what ``Backend.update`` applies to the flat buffers.

    torch.optim's formulas, every weight and bias in one group, with ``g`` the mean gradient
    of the batch and ``t`` the step count after this step (1 on the first step):

    * ``sgd``:   ``g += weight_decay p``; with momentum ``m = momentum m + g`` (``m = g`` on
      the first step) and ``g = g + momentum m`` (nesterov) or ``g = m``; ``p -= lr g``.
    * ``adam``:  ``g += weight_decay p``; ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
      ``p -= lr / (1-b1^t) * m / (sqrt(v) / sqrt(1-b2^t) + eps)``.
    * ``adamw``: ``p *= 1 - lr weight_decay`` (decoupled), then adam's step without it.

    ``l2`` is scikit-learn's ``alpha``: ``g += l2 / rows * W`` on weights only (biases
    untouched), ``rows`` being the batch's example count, as scikit-learn's MLP does.
    """

    kind: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    l2: float = 0.0

    @property
    def n_buffers(self) -> int:
        """State buffers the rule needs: momentum (1), Adam's two moments (2), none for plain SGD."""
        if self.kind == "sgd":
            return 1 if self.momentum != 0.0 else 0
        return 2

    @property
    def is_plain_sgd(self) -> bool:
        """``p -= lr g`` and nothing else: the case fast paths may fuse most aggressively."""
        return self.kind == "sgd" and self.momentum == 0.0 and self.weight_decay == 0.0 and self.l2 == 0.0

    def hyper(self) -> np.ndarray:
        """The rule as a float64 vector (``HP_*`` positions) for compiled kernels."""
        hp = np.zeros(N_HYPER)
        hp[[HP_KIND, HP_LR, HP_MOMENTUM, HP_NESTEROV, HP_WEIGHT_DECAY, HP_BETA1, HP_BETA2, HP_EPS, HP_L2]] = (
            RULE_CODE[self.kind], self.lr, self.momentum, float(self.nesterov), self.weight_decay,
            self.beta1, self.beta2, self.eps, self.l2)
        return hp


class OptimizerState:
    """A rule's state: ``buffers`` of shape ``(n_buffers, n_params)`` on the backend (momentum,
    or Adam's first and second moments, laid out like the flat parameters) and ``step``, a host
    int64 array of one element counting the updates applied (compiled kernels advance it)."""

    def __init__(self, buffers, step: int = 0) -> None:
        self.buffers = buffers
        self.step = np.array([step], dtype=np.int64)

    @property
    def steps(self) -> int:
        return int(self.step[0])


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

    def __repr__(self) -> str:
        return f"<fastbp {self.name} backend>"

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

    def update(self, spec: NetSpec, rule: UpdateRule, params, grads, state: OptimizerState, rows: int):
        """Apply ``rule`` once: ``params`` and ``state`` updated in place from the mean gradients
        ``grads`` of a batch of ``rows`` examples; ``state.step`` advances by one.

        The one place a backend writes the update formulas (see :class:`UpdateRule`); its fast
        paths call this or a fused form of the same arithmetic.
        """
        raise NotImplementedError

    def count_correct(self, loss, a, y) -> int:
        """Rows of the output activations ``a`` that classify like the targets ``y``: the argmax
        for cross_entropy, every output on the same side of 0.5 for log_loss (0 for mse)."""
        xp = self.xp
        if loss == "cross_entropy":
            return int((xp.argmax(a, axis=1) == xp.argmax(y, axis=1)).sum())
        if loss == "log_loss":
            return int(xp.all((a > 0.5) == (y > 0.5), axis=1).sum())
        return 0

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

    def supports_epoch(self, spec: NetSpec, batch_size: int, strategy: str, rule: UpdateRule) -> bool:
        """Whether :meth:`train_epoch` runs this combination (and is faster than the composed path)."""
        return False

    def draws_next_order(self, spec: NetSpec, batch_size: int, strategy: str) -> bool:
        """Whether :meth:`train_epoch` runs this combination and can draw the next epoch's
        order meanwhile (its ``next_order``)."""
        return False

    def train_epoch(self, spec: NetSpec, params, grads, X, Y, batch_size, rule: UpdateRule,
                    state: OptimizerState, strategy, order=None, next_order=None):
        """A whole epoch of mini-batch training over the rows of ``X, Y`` in ``order`` (a
        permutation from :meth:`index_array`; None: in their own order), each batch's gradient
        applied by ``rule`` exactly as :meth:`update` would -- the same as running it over
        ``X[order], Y[order]``.

        Returns ``(loss_sum, n_done, n_correct)``: the summed pre-update cost of the batches
        run, how many examples they covered, and how many of them the pre-update outputs
        classified right (:meth:`count_correct`; 0 for mse). Stops early (``n_done < n``) at
        the first batch whose cost is not finite, without applying its update.
        ``next_order``: ``(out, state_in, state_out)`` where :meth:`draws_next_order` holds:
        the epoch also draws ``Generator.permutation(n)`` into ``out`` (int64, n) from the
        PCG64 state ``state_in`` and writes the state after it into ``state_out`` (uint64, 5
        each, kernels/numba_random.py), the latter only when the epoch ran to its end.
        """
        raise NotImplementedError
