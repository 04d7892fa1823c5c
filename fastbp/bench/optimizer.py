"""The optimizer a benchmark trains with, spelled once for each library that runs it.

A benchmark compares libraries on the same update rule, so the rule is data here
(:class:`OptimizerSpec`) and each library gets it in its own terms: fastbp's
``fb.optim`` instance, a ``torch.optim`` optimizer, pure JAX update functions written
with torch.optim's formulas (optax is not required), scikit-learn's MLP parameters.

    sgd       p <- p - lr * g
    momentum  b <- mu * b + g;  p <- p - lr * b              (torch.optim.SGD, dampening 0, b_0 = 0)
    adam      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
              p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (torch.optim.Adam)

No weight decay anywhere. torch starts the momentum buffer at the first gradient,
which equals ``mu * 0 + g``, so starting it at zero is the same rule.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

NAMES = ("sgd", "momentum", "adam")
DEFAULT_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAM_DEFAULT_LR = 1e-3  # torch.optim.Adam's and scikit-learn's default


def default_lr(name: str, sgd_lr: float) -> float:
    """The learning rate a benchmark uses when none is given: ``sgd_lr`` for SGD, 1e-3 for Adam."""
    return ADAM_DEFAULT_LR if name == "adam" else sgd_lr


@dataclass(frozen=True)
class OptimizerSpec:
    """One update rule with its hyper-parameters (see the module docstring for the formulas)."""

    name: str
    lr: float
    momentum: float = 0.0  # "momentum" only
    betas: tuple[float, float] = ADAM_BETAS  # "adam" only
    eps: float = ADAM_EPS  # "adam" only

    @classmethod
    def make(cls, name: str, lr: float, momentum: float = DEFAULT_MOMENTUM) -> "OptimizerSpec":
        """The spec for ``name`` ("sgd" | "momentum" | "adam") at learning rate ``lr``."""
        if name not in NAMES:
            raise ValueError(f"unknown optimizer. Received: optimizer={name!r}. Expected one of {list(NAMES)}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0. Received: lr={lr!r}")
        if name == "momentum":
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
                raise ValueError(f"momentum must be in (0, 1). Received: momentum={momentum!r}")
            return cls(name, float(lr), momentum=float(momentum))
        return cls(name, float(lr))

    def describe(self) -> dict[str, Any]:
        """The spec for a JSON record."""
        out: dict[str, Any] = {"name": self.name, "lr": self.lr, "weight_decay": 0.0}
        if self.name == "momentum":
            out.update(momentum=self.momentum, dampening=0.0, nesterov=False)
        elif self.name == "adam":
            out.update(betas=list(self.betas), eps=self.eps)
        return out

    # -- fastbp
    def fastbp(self):
        """A fresh ``fb.optim`` instance (ImportError when this fastbp has no ``fastbp.optim``)."""
        optim = importlib.import_module("fastbp.optim")
        if self.name == "adam":
            return optim.Adam(lr=self.lr, betas=self.betas, eps=self.eps)
        return optim.SGD(lr=self.lr, momentum=self.momentum)

    # -- torch
    def torch(self, torch, params):
        """The ``torch.optim`` optimizer over ``params``."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, dampening=0.0, nesterov=False,
                               weight_decay=0.0)

    # -- jax
    def jax(self, jnp) -> tuple[Callable, Callable]:
        """``(init, update)``: ``init(params) -> state``; ``update(params, grads, state) -> (params, state)``.

        ``params`` and ``grads`` are lists of arrays; pure functions, to be traced by ``jax.jit``.
        """
        lr = self.lr
        if self.name == "sgd":
            def init(params):
                return ()

            def update(params, grads, state):
                return [p - lr * g for p, g in zip(params, grads)], state
        elif self.name == "momentum":
            mu = self.momentum

            def init(params):
                return [jnp.zeros_like(p) for p in params]

            def update(params, grads, bufs):
                bufs = [mu * b + g for b, g in zip(bufs, grads)]
                return [p - lr * b for p, b in zip(params, bufs)], bufs
        else:
            (b1, b2), eps = self.betas, self.eps

            def init(params):
                return ([jnp.zeros_like(p) for p in params], [jnp.zeros_like(p) for p in params],
                        jnp.zeros((), params[0].dtype))

            def update(params, grads, state):
                m, v, t = state
                t = t + 1
                m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads)]
                v = [b2 * vi + (1 - b2) * g * g for vi, g in zip(v, grads)]
                step = lr / (1 - b1 ** t)
                root_c2 = jnp.sqrt(1 - b2 ** t)
                params = [p - step * mi / (jnp.sqrt(vi) / root_c2 + eps) for p, mi, vi in zip(params, m, v)]
                return params, (m, v, t)
        return init, update

    # -- scikit-learn
    def sklearn(self) -> dict[str, Any]:
        """``MLPClassifier`` / ``MLPRegressor`` parameters for this rule (``learning_rate_init`` apart)."""
        if self.name == "adam":
            return {"solver": "adam", "beta_1": self.betas[0], "beta_2": self.betas[1], "epsilon": self.eps}
        # scikit-learn's velocity form v <- mu v - lr g; p <- p + v is the same rule at a constant lr
        return {"solver": "sgd", "momentum": self.momentum, "nesterovs_momentum": False}


# ---------------------------------------------------------------------------- fastbp's fit
def fastbp_support(name: str) -> str | None:
    """Why this fastbp cannot train with ``name`` (None when it can): ``fit(optimizer=)`` and ``fb.optim``."""
    if name == "sgd":
        return None
    import fastbp as fb

    if "optimizer" not in inspect.signature(fb.MLP.fit).parameters:
        return f"this fastbp's MLP.fit has no optimizer= argument, so only 'sgd' runs (received {name!r})"
    try:
        importlib.import_module("fastbp.optim")
    except ImportError as exc:
        return f"fastbp.optim does not import here ({exc}), so only 'sgd' runs (received {name!r})"
    return None


def fit_kwargs(net, spec: OptimizerSpec, *, first: bool, threads: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``net.fit`` that train with ``spec``.

    ``first``: the call that sets the optimizer (a fresh instance, fresh state); later calls
    pass ``optimizer=None`` and so continue it, as a user's successive ``fit`` calls do. A
    fastbp whose ``fit`` has no ``optimizer=`` trains plain SGD with ``lr=``; any other rule
    is then a ValueError. ``threads`` is passed only when ``fit`` takes it.
    """
    params = inspect.signature(net.fit).parameters
    out: dict[str, Any] = {}
    if "optimizer" in params:
        out["optimizer"] = spec.fastbp() if first else None
    elif spec.name == "sgd":
        out["lr"] = spec.lr
    else:
        raise ValueError(fastbp_support(spec.name))
    if threads is not None and "threads" in params:
        out["threads"] = threads
    return out
