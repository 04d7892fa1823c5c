"""Optimizers and per-epoch learning-rate schedules.

>>> import fastbp as fb
>>> net.fit(X, Y, optimizer=fb.optim.Adam(lr=1e-3), schedule=fb.optim.CosineAnnealingLR(T_max=20))

An optimizer is the update rule as data (its hyper-parameters) plus its state: the flat
buffers (momentum, or Adam's two moments, laid out like the flat parameters) and the step
count. The arithmetic is not here: each backend applies the rule once, in
``Backend.update`` (formulas in ``fastbp.kernels.base.UpdateRule``, torch.optim's), and
its compiled or captured fast paths call that or a fused form of it.

An optimizer instance trains one model: ``fit`` binds it to the model on first use, and the
state then persists across ``fit`` calls and is saved with the model.

Schedules are per epoch, like torch.optim.lr_scheduler stepped once an epoch: at the end of
epoch ``e`` (0-based) the schedule sets the learning rate of epoch ``e + 1`` from the rate the
fit started with.
"""

from __future__ import annotations

import math
import numbers
import weakref

import numpy as np

from .kernels.base import OptimizerState, UpdateRule

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "OPTIMIZERS",
    "Schedule", "ConstantLR", "StepLR", "ExponentialLR", "CosineAnnealingLR", "InverseScalingLR",
    "ReduceLROnPlateau",
]


# ---------------------------------------------------------------- argument checks
def _real(name: str, value, *, low: float, high: float = math.inf, low_open=False, high_open=False) -> float:
    """A finite real number in the range ``low..high`` (open ends where asked), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Received: {name}={value!r} ({type(value).__name__})")
    value = float(value)
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (math.isfinite(value) and lo_ok and hi_ok):
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected a finite number in "
                         f"{left}{low:g}, {high:g}{right}")
    return value


def _betas(value) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2). Received: betas={value!r}")
    return (_real("betas[0]", value[0], low=0.0, high=1.0, high_open=True),
            _real("betas[1]", value[1], low=0.0, high=1.0, high_open=True))


# ---------------------------------------------------------------- optimizers
class Optimizer:
    """Base class: hyper-parameters, the state buffers, and binding to one model."""

    kind = "base"
    _fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.state: OptimizerState | None = None
        self._owner = None  # weakref to the model the state belongs to

    # --- the learning rate is the one hyper-parameter fit and schedules change
    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = _real("lr", value, low=0.0, low_open=True)

    def rule(self, l2: float = 0.0) -> UpdateRule:
        """The update as ``Backend.update`` takes it (``l2``: scikit-learn's alpha, weights only)."""
        raise NotImplementedError

    def get_config(self) -> dict:
        """Constructor arguments: ``type(opt)(**opt.get_config())`` is the same rule, fresh state."""
        return {name: getattr(self, name) for name in self._fields}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    @property
    def steps(self) -> int:
        """Updates applied so far (torch's ``state['step']``)."""
        return 0 if self.state is None else self.state.steps

    # --- state
    def _check_owner(self, net) -> None:
        """An instance trains one model: once bound, another model is refused, whether the first
        is still alive or not (so the answer never depends on garbage collection)."""
        if self._owner is not None and self._owner() is not net:
            raise ValueError(f"optimizer {self!r} already trains another model. Received: an instance "
                             "bound to a different MLP. Expected a new instance (or copy.deepcopy of this one)")

    def _bind(self, net) -> OptimizerState:
        """The state for ``net``, allocated (zeros, step 0) the first time, when its buffers do not
        fit this model (an unpickled optimizer given to a model of another dtype or backend), or
        when the rule needs more buffers than it has (momentum switched on later)."""
        need = self.rule().n_buffers
        st = self.state
        fits = (st is not None and st.buffers.shape[1:] == (net.n_params,) and st.buffers.dtype == net.dtype
                and type(st.buffers) is type(net._params))
        if not fits:
            st = None
        if st is None or st.buffers.shape[0] < need:
            buffers = net.backend.zeros((need, net.n_params), net.dtype)
            if st is not None and st.buffers.shape[0]:
                buffers[:st.buffers.shape[0]] = st.buffers  # keep what there is (e.g. Adam moments)
            self.state = OptimizerState(buffers, 0 if st is None else st.steps)
        self._owner = weakref.ref(net)
        return self.state

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_owner"] = None  # re-bound by the model that unpickles it
        return d


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay
    (``torch.optim.SGD`` with dampening 0)."""

    kind = "sgd"
    _fields = ("lr", "momentum", "nesterov", "weight_decay")

    def __init__(self, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = _real("momentum", momentum, low=0.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool. Received: nesterov={nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0. Received: momentum=0.0. Expected momentum > 0")
        self.nesterov = bool(nesterov)
        self.weight_decay = _real("weight_decay", weight_decay, low=0.0)

    def rule(self, l2: float = 0.0) -> UpdateRule:
        return UpdateRule("sgd", lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                          weight_decay=self.weight_decay, l2=l2)


class Adam(Optimizer):
    """Adam with bias correction and L2 weight decay added to the gradient (``torch.optim.Adam``)."""

    kind = "adam"
    _fields = ("lr", "betas", "eps", "weight_decay")
    _default_decay = 0.0

    def __init__(self, lr=0.001, betas=(0.9, 0.999), eps=1e-8, weight_decay=None) -> None:
        super().__init__()
        self.lr = lr
        self.betas = _betas(betas)
        self.eps = _real("eps", eps, low=0.0)
        self.weight_decay = _real("weight_decay", self._default_decay if weight_decay is None else weight_decay,
                                  low=0.0)

    def rule(self, l2: float = 0.0) -> UpdateRule:
        return UpdateRule(self.kind, lr=self.lr, weight_decay=self.weight_decay, beta1=self.betas[0],
                          beta2=self.betas[1], eps=self.eps, l2=l2)


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``): ``p *= 1 - lr * weight_decay``."""

    kind = "adamw"
    _default_decay = 0.01


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def resolve(optimizer, lr, current: Optimizer | None) -> tuple[Optimizer, float | None]:
    """What ``fit(optimizer=..., lr=...)`` trains with, checked before anything changes.

    Returns ``(optimizer, lr_to_set)``: ``optimizer=None`` continues ``current`` (a new
    ``SGD(lr=0.1)`` when there is none); a name is a fresh instance; an instance is used as
    it is. ``lr`` (None = keep) goes with a name or with the current optimizer; an instance
    carries its own, so passing both is a ValueError.
    """
    if lr is not None:
        lr = _real("lr", lr, low=0.0, low_open=True)
    if optimizer is None:
        return (current if current is not None else SGD(lr=0.1)), lr
    if isinstance(optimizer, str):
        cls = OPTIMIZERS.get(optimizer)
        if cls is None:
            raise ValueError(f"unknown optimizer. Received: optimizer={optimizer!r}. "
                             f"Expected one of {sorted(OPTIMIZERS)} or an fb.optim.Optimizer instance")
        return (cls() if lr is None else cls(lr=lr)), None
    if isinstance(optimizer, Optimizer):
        if lr is not None:
            raise ValueError(f"lr given together with an optimizer instance. Received: lr={lr!r} and "
                             f"optimizer={optimizer!r}. Expected lr=None (the instance carries its lr)")
        return optimizer, None
    raise TypeError(f"optimizer must be a name or an fb.optim.Optimizer. Received: optimizer={optimizer!r} "
                    f"({type(optimizer).__name__}). Expected one of {sorted(OPTIMIZERS)}, an instance or None")


def from_config(kind: str, config: dict) -> Optimizer:
    """An optimizer of ``kind`` from :meth:`Optimizer.get_config` (used by ``MLP.load``)."""
    cls = OPTIMIZERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown optimizer kind {kind!r}; expected one of {sorted(OPTIMIZERS)}")
    return cls(**config)


# ---------------------------------------------------------------- schedules
MONITORS = ("loss", "val_loss", "accuracy", "val_accuracy")  # what History records and schedules may watch

class Schedule:
    """A per-epoch learning-rate schedule.

    ``start(lr)`` is called when a fit begins (``lr``: the optimizer's rate then);
    ``next_lr(epoch, logs)`` at the end of each epoch returns the rate for the next one
    (``logs``: that epoch's ``loss``, ``val_loss``, ... and ``samples_seen``).
    """

    def start(self, lr: float) -> None:
        self.base_lr = lr

    def next_lr(self, epoch: int, logs: dict) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "base_lr")
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    """The same rate every epoch."""

    def next_lr(self, epoch, logs):
        return self.base_lr


class StepLR(Schedule):
    """``lr = base * gamma ** ((epoch + 1) // step_size)`` (torch.optim.lr_scheduler.StepLR)."""

    def __init__(self, step_size, gamma=0.1) -> None:
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"step_size must be an int >= 1. Received: step_size={step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def next_lr(self, epoch, logs):
        return self.base_lr * self.gamma ** ((epoch + 1) // self.step_size)


class ExponentialLR(Schedule):
    """``lr = base * gamma ** (epoch + 1)`` (torch.optim.lr_scheduler.ExponentialLR)."""

    def __init__(self, gamma) -> None:
        self.gamma = _real("gamma", gamma, low=0.0, low_open=True)

    def next_lr(self, epoch, logs):
        return self.base_lr * self.gamma ** (epoch + 1)


class CosineAnnealingLR(Schedule):
    """``lr = eta_min + (base - eta_min) (1 + cos(pi e / T_max)) / 2`` for the e-th epoch after
    the first, the closed form of torch's CosineAnnealingLR (periodic beyond ``T_max``)."""

    def __init__(self, T_max, eta_min=0.0) -> None:
        if isinstance(T_max, bool) or not isinstance(T_max, numbers.Integral) or T_max < 1:
            raise ValueError(f"T_max must be an int >= 1. Received: T_max={T_max!r}")
        self.T_max = int(T_max)
        self.eta_min = _real("eta_min", eta_min, low=0.0)

    def next_lr(self, epoch, logs):
        e = epoch + 1
        lr = self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * e / self.T_max)) / 2
        return max(lr, np.finfo(np.float64).tiny)  # a rate of exactly 0 is not a valid lr


class InverseScalingLR(Schedule):
    """scikit-learn's ``learning_rate="invscaling"``: ``lr = base / (t + 1) ** power_t`` with ``t``
    the training examples seen so far (``offset`` adds those of earlier fits)."""

    def __init__(self, power_t=0.5, offset=0) -> None:
        self.power_t = _real("power_t", power_t, low=0.0)
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise ValueError(f"offset must be an int >= 0. Received: offset={offset!r}")
        self.offset = int(offset)

    def next_lr(self, epoch, logs):
        return self.base_lr / (self.offset + logs["samples_seen"] + 1) ** self.power_t


class ReduceLROnPlateau(Schedule):
    """Multiply the rate by ``factor`` once ``monitor`` has not improved by more than ``min_delta``
    for ``patience`` epochs in a row (Keras's ReduceLROnPlateau; scikit-learn's "adaptive" is
    ``factor=0.2``). Losses improve downwards, accuracies upwards. Never below ``min_lr``."""

    def __init__(self, monitor="loss", factor=0.1, patience=10, min_delta=1e-4, min_lr=0.0) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str. Received: monitor={monitor!r}")
        if monitor not in MONITORS:
            raise ValueError(f"unknown monitor. Received: monitor={monitor!r}. Expected one of {list(MONITORS)}")
        self.monitor = monitor
        self._sign = -1.0 if monitor.endswith("accuracy") else 1.0  # compared as "lower is better"
        self.factor = _real("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"patience must be an int >= 0. Received: patience={patience!r}")
        self.patience = int(patience)
        self.min_delta = _real("min_delta", min_delta, low=0.0)
        self.min_lr = _real("min_lr", min_lr, low=0.0)

    def start(self, lr):
        super().start(lr)
        self._lr, self._best, self._wait = lr, math.inf, 0

    def next_lr(self, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which this fit does not record. "
                             f"Received logs with {sorted(logs)}")
        value = self._sign * logs[self.monitor]
        if value < self._best - self.min_delta:
            self._best, self._wait = value, 0
        else:
            self._wait += 1
            if self._wait >= self.patience:
                self._lr, self._wait = max(self._lr * self.factor, self.min_lr, np.finfo(np.float64).tiny), 0
        return self._lr
