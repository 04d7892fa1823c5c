"""The network: multilayer perceptrons and logistic regression, and their backpropagation.

The math is the textbook's, over a batch in row-major form (one row per example):

    Z^l = A^(l-1) W^l.T + b^l,   A^l = phi(Z^l)                      forward
    D^L = dC/dZ^L                                                    fused with the loss
    D^l = phi'(Z^l) (.) D^(l+1) W^(l+1)                             hidden deltas
    dW^l = D^l.T A^(l-1) / n,   db^l = sum_rows(D^l) / n            mean gradients

Parameters and gradients each live in one flat buffer ([W1, b1, W2, b2, ...]);
``weights`` and ``biases`` are views into it, so one SGD update, one copy or
one save covers them all. Every kernel call goes through ``self.backend``.
Training (the fit loop, optimizers, callbacks) lives in ``training.py`` and ``optim.py``;
``MLP.fit`` is the entry point to it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections import OrderedDict

import numpy as np

from . import _validate as check
from .backend import get_backend, to_numpy
from .kernels.base import ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, LOSSES, NetSpec, OptimizerState

DEFAULT_OUTPUT = {"mse": "identity", "log_loss": "sigmoid", "cross_entropy": "softmax"}
INITS = ("auto", "he", "glorot", "normal")
STRATEGIES = ("vectorized", "loop")
DTYPES = check.FLOAT_DTYPES
FORMAT_VERSION = 2  # 2 adds the optimizer and its state; version 1 files still load
_MAX_WORKSPACES = 8  # batch sizes kept warm; a fit uses at most two (full and remainder)


class _Workspace:
    """Per-batch-size buffers for one forward/backward pass, allocated once and reused."""

    def __init__(self, backend, spec: NetSpec, n: int) -> None:
        dtype = spec.dtype
        self.Z, self.A, self.D = [], [], []
        for layer, width in enumerate(spec.sizes[1:]):
            z = backend.empty((n, width), dtype)
            self.Z.append(z)
            # identity keeps A = Z: no copy, and its derivative is a no-op
            self.A.append(z if spec.activation(layer) == "identity" else backend.empty((n, width), dtype))
            self.D.append(backend.empty((n, width), dtype))


class MLP:
    """A multilayer perceptron trained by backpropagation and gradient descent.

    Parameters
    ----------
    sizes : sequence of int
        ``[n_inputs, n_hidden..., n_outputs]``, positive, at least two entries.
    activation : {"sigmoid", "relu", "tanh", "leaky_relu", "identity"}
        Hidden-layer activation.
    loss : {"mse", "log_loss", "cross_entropy"}
        Per-example cost; the model minimises its mean over the batch.
    output : str or None
        Output activation; None picks the loss's natural one (identity /
        sigmoid / softmax). Any activation name is allowed.
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds initialisation and the default shuffle of :meth:`fit`.
    init : {"auto", "he", "glorot", "normal"}
        "he": N(0, 2/fan_in) weights (the auto choice for relu/leaky_relu);
        "glorot": U(+-sqrt(6/(fan_in+fan_out))) weights (auto for the rest);
        biases zero for both. "normal": weights and biases N(0, 1), as in the textbook.

    The model lives on the backend active when it is made (``net.backend``).
    """

    def __init__(self, sizes, activation="sigmoid", loss="mse", output=None, dtype="float32",
                 seed=None, init="auto") -> None:
        sizes = _check_sizes(sizes)
        check.choice("activation", activation, ELEMENTWISE_ACTIVATIONS)
        check.choice("loss", loss, LOSSES)
        output = DEFAULT_OUTPUT[loss] if output is None else check.choice("output", output, ACTIVATIONS)
        dtype = check.float_dtype("dtype", dtype)
        seed = check.seed("seed", seed)
        check.choice("init", init, INITS)

        self.backend = get_backend()
        self.spec = NetSpec(tuple(sizes), activation, output, loss, dtype)
        self.seed, self.init = seed, init
        self._rng = np.random.default_rng(seed)
        self._params = self.backend.asarray(_initial_params(self.spec, init, self._rng), dtype)
        self._grads = self.backend.zeros(self.spec.n_params, dtype)
        self.weights, self.biases = _views(self.spec, self._params)
        self._grad_weights, self._grad_biases = _views(self.spec, self._grads)
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        self.optimizer = None  # fb.optim.Optimizer; the first fit makes SGD(lr=0.1) unless told otherwise

    # ------------------------------------------------------------ description
    sizes = property(lambda self: list(self.spec.sizes))
    activation = property(lambda self: self.spec.hidden)
    output = property(lambda self: self.spec.output)
    loss_name = property(lambda self: self.spec.loss)
    dtype = property(lambda self: self.spec.dtype)
    n_params = property(lambda self: self.spec.n_params)

    def __repr__(self) -> str:
        s = self.spec
        return (f"MLP(sizes={list(s.sizes)}, activation={s.hidden!r}, loss={s.loss!r}, output={s.output!r}, "
                f"dtype={s.dtype.name!r}, backend={self.backend.name!r})")

    # ------------------------------------------------------------ parameters
    def get_params(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """NumPy copies of ``(weights, biases)``; W^l has shape (n_l, n_(l-1)), b^l (n_l,)."""
        return [to_numpy(w).copy() for w in self.weights], [to_numpy(b).copy() for b in self.biases]

    def set_params(self, weights, biases) -> None:
        """Copy ``weights`` and ``biases`` (any backend's arrays or lists) into the model."""
        new_w = self._check_param_list("weights", weights, [(o, i) for i, o in zip(self.spec.sizes, self.spec.sizes[1:])])
        new_b = self._check_param_list("biases", biases, [(o,) for o in self.spec.sizes[1:]])
        for view, value in zip(self.weights + self.biases, new_w + new_b):
            view[...] = self.backend.asarray(value, self.dtype)

    def _check_param_list(self, name, values, shapes):
        if not isinstance(values, (list, tuple)) or len(values) != len(shapes):
            got = f"{type(values).__name__} of length {len(values)}" if isinstance(values, (list, tuple)) else repr(type(values).__name__)
            raise ValueError(f"{name} must be a list of {len(shapes)} arrays. Received: {got}")
        out = []
        for l, (value, shape) in enumerate(zip(values, shapes)):
            arr = check.numeric_array(f"{name}[{l}]", value, self.dtype)
            if tuple(arr.shape) != shape:
                raise ValueError(f"{name}[{l}] has the wrong shape. Received: {tuple(arr.shape)}. Expected {shape}")
            out.append(arr)
        return out

    # ------------------------------------------------------------ inputs
    def _inputs(self, X, name="X"):
        return self.backend.asarray(check.features(name, X, self.spec.sizes[0], self.dtype), self.dtype)

    def _inputs_targets(self, X, Y, names=("X", "Y")):
        Xc = check.features(names[0], X, self.spec.sizes[0], self.dtype)
        Yc = check.targets(names[1], Y, n_samples=Xc.shape[0], n_outputs=self.spec.sizes[-1],
                           loss=self.spec.loss, dtype=self.dtype)
        return self.backend.asarray(Xc, self.dtype), self.backend.asarray(Yc, self.dtype)

    def _workspace(self, n: int) -> _Workspace:
        ws = self._workspaces.get(n)
        if ws is None:
            ws = self._workspaces[n] = _Workspace(self.backend, self.spec, n)
            if len(self._workspaces) > _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(n)
        return ws

    # ------------------------------------------------------------ forward
    def _forward(self, X, ws: _Workspace):
        be, spec = self.backend, self.spec
        a_prev = X
        for l in range(spec.n_layers):
            be.matmul(a_prev, self.weights[l], ws.Z[l], trans_b=True)
            be.add_bias(ws.Z[l], self.biases[l])
            if ws.A[l] is not ws.Z[l]:
                be.activation(spec.activation(l), ws.Z[l], ws.A[l])
            a_prev = ws.A[l]
        return a_prev

    def forward(self, X):
        """Output activations ``a^L``, shape (n_samples, n_outputs), as a backend array.

        X : array of shape (n_samples, n_inputs) (NumPy, CuPy or nested lists).
        """
        Xd = self._inputs(X)
        return self._forward(Xd, self._workspace(Xd.shape[0])).copy()

    def predict(self, X):
        """The output activations (probabilities for sigmoid/softmax outputs) as a NumPy array."""
        return to_numpy(self.forward(X))

    def loss(self, X, Y) -> float:
        """The mean cost over the examples."""
        Xd, Yd = self._inputs_targets(X, Y)
        return self._loss(Xd, Yd)

    def _loss(self, Xd, Yd) -> float:
        ws = self._workspace(Xd.shape[0])
        self._forward(Xd, ws)
        last = self.spec.n_layers - 1
        return float(self.backend.loss_sum(self.spec.loss, self.spec.output, ws.Z[last], ws.A[last], Yd)) / Xd.shape[0]

    # ------------------------------------------------------------ backward
    def _backward(self, X, Y, ws: _Workspace, scale: float, accumulate: bool = False):
        """Output delta, then dW/db of every layer into the flat gradient buffer; returns the summed cost."""
        be, spec = self.backend, self.spec
        last = spec.n_layers - 1
        total = be.output_delta(spec.loss, spec.output, ws.Z[last], ws.A[last], Y, ws.D[last])
        for l in range(last, -1, -1):
            a_prev = X if l == 0 else ws.A[l - 1]
            if accumulate:  # the per-example loop: dW += delta a^T, one outer product per example
                be.outer(ws.D[l][0], a_prev[0], self._grad_weights[l], alpha=scale)
            else:
                be.matmul(ws.D[l], a_prev, self._grad_weights[l], trans_a=True, alpha=scale)
            be.bias_grad(ws.D[l], self._grad_biases[l], alpha=scale, accumulate=accumulate)
            if l > 0:
                be.hidden_delta(spec.hidden, ws.D[l], self.weights[l], ws.Z[l - 1], ws.A[l - 1], ws.D[l - 1])
        return total

    def _gradients_into(self, X, Y, strategy: str, count: bool = False):
        """Mean gradients of a batch into ``self._grads``; returns ``(summed cost, correct)``:
        ``correct`` counts the rows the pre-update outputs classify right when ``count`` (else 0)."""
        n, be = X.shape[0], self.backend
        if strategy == "vectorized":
            ws = self._workspace(n)
            self._forward(X, ws)
            correct = be.count_correct(self.spec.loss, ws.A[-1], Y) if count else 0
            return self._backward(X, Y, ws, 1.0 / n), correct
        if be.has_compiled_loop:
            correct = 0
            if count:
                correct = be.count_correct(self.spec.loss, self._forward(X, self._workspace(n)), Y)
            return be.loop_gradients(self.spec, self._params, X, Y, self._grads), correct
        # The naive way: one example at a time, accumulating outer products.
        ws = self._workspace(1)
        self._grads[...] = 0
        total, correct = 0.0, 0
        for i in range(n):
            x, y = X[i:i + 1], Y[i:i + 1]
            self._forward(x, ws)
            if count:
                correct += be.count_correct(self.spec.loss, ws.A[-1], y)
            total += self._backward(x, y, ws, 1.0 / n, accumulate=True)
        return total, correct

    def gradients(self, X, Y, strategy="vectorized"):
        """Gradients of the mean cost: ``(dWs, dbs)``, shaped like ``weights`` and ``biases``.

        strategy : "vectorized" (the batch matrix form) or "loop" (the per-example
            loop accumulating outer products: the same numbers, the naive way).
        """
        check.choice("strategy", strategy, STRATEGIES)
        Xd, Yd = self._inputs_targets(X, Y)
        self._gradients_into(Xd, Yd, strategy)
        grads = self._grads.copy()
        return _views(self.spec, grads)

    # ------------------------------------------------------------ training
    def fit(self, X, Y, epochs=1, batch_size=32, lr=None, optimizer=None, shuffle=True, strategy="vectorized",
            progress=None, validation_data=None, validation_split=0.0, seed=None, schedule=None,
            callbacks=None, threads=None):
        """Train by backpropagation and an optimizer on the mean cost; returns the per-epoch History.

        See :func:`fastbp.training.fit` for every argument.
        """
        from .training import fit

        return fit(self, X, Y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                   shuffle=shuffle, strategy=strategy, progress=progress, validation_data=validation_data,
                   validation_split=validation_split, seed=seed, schedule=schedule, callbacks=callbacks,
                   threads=threads)

    def _evaluate(self, Xd, Yd, prefix: str = "val_") -> dict[str, float]:
        """Mean cost (and accuracy for classification losses) of the model as it is now."""
        result = {prefix + "loss": self._loss(Xd, Yd)}
        if self.spec.loss != "mse":
            a = self._workspace(Xd.shape[0]).A[-1]
            result[prefix + "accuracy"] = int(self.backend.count_correct(self.spec.loss, a, Yd)) / Xd.shape[0]
        return result

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write a device-agnostic ``.npz`` (format version, architecture, dtype, parameters).

        The file is written beside ``path`` first and renamed into place, so a
        crash never leaves a half-written model.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        s = self.spec
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastbp-", suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, format_version=np.int64(FORMAT_VERSION), sizes=np.asarray(s.sizes, np.int64),
                         activation=np.str_(s.hidden), output=np.str_(s.output), loss=np.str_(s.loss),
                         dtype=np.str_(s.dtype.name), params=to_numpy(self._params), **self._optimizer_fields())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "MLP":
        """Read a model written by :meth:`save` onto the active backend."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no fastbp model at {path!r}")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path!r} is not a readable fastbp model (.npz): {exc}") from None
        missing = {"format_version", "sizes", "activation", "output", "loss", "dtype", "params"} - fields.keys()
        if missing:
            raise ValueError(f"{path!r} is not a fastbp model: missing {sorted(missing)}")
        try:
            version = int(fields["format_version"])
            meta = {"sizes": [int(v) for v in fields["sizes"]],
                    **{key: str(fields[key]) for key in ("activation", "loss", "output", "dtype")}}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} is corrupt: unreadable architecture fields ({exc})") from None
        if version > FORMAT_VERSION:
            raise ValueError(f"{path!r} has format version {version}; this fastbp reads up to {FORMAT_VERSION}")
        net = cls._rebuild(meta, fields["params"], origin=repr(path))
        net._restore_optimizer(fields, origin=repr(path))
        return net

    def _optimizer_fields(self) -> dict:
        """The optimizer as saved: its kind and hyper-parameters (JSON), step count and buffers."""
        opt = self.optimizer
        if opt is None:
            return {}
        st = opt.state
        buffers = np.zeros((0, self.n_params), self.dtype) if st is None else to_numpy(st.buffers)
        return {"optimizer": np.str_(json.dumps({"kind": opt.kind, "config": opt.get_config()})),
                "optimizer_step": np.int64(opt.steps), "optimizer_state": buffers}

    def _restore_optimizer(self, fields: dict, origin: str) -> None:
        """The saved optimizer back, so ``fit(optimizer=None)`` continues its trajectory."""
        if "optimizer" not in fields:  # a version-1 file, or a model never trained
            return
        from . import optim

        try:
            meta = json.loads(str(fields["optimizer"]))
            opt = optim.from_config(meta["kind"], meta["config"])
            step = int(fields["optimizer_step"])
            buffers = np.asarray(fields["optimizer_state"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{origin} is corrupt: unreadable optimizer fields ({exc})") from None
        if buffers.ndim != 2 or buffers.shape[1] != self.n_params or buffers.shape[0] > 2 or step < 0:
            raise ValueError(f"{origin} is corrupt: optimizer_state has shape {buffers.shape} and step {step}, "
                             f"expected (k <= 2, {self.n_params}) and step >= 0")
        if buffers.dtype.kind != "f" or not np.isfinite(buffers).all():
            raise ValueError(f"{origin} is corrupt: its optimizer state is not all finite floats")
        if buffers.shape[0] or step:
            opt.state = OptimizerState(self.backend.asarray(buffers, self.dtype), step)
        opt._bind(self)
        self.optimizer = opt

    @classmethod
    def _rebuild(cls, meta: dict, params: np.ndarray, origin: str) -> "MLP":
        """A model of class ``cls`` from saved architecture fields and a flat parameter array."""
        net = cls.__new__(cls)
        MLP.__init__(net, meta["sizes"], activation=meta["activation"], loss=meta["loss"], output=meta["output"],
                     dtype=meta["dtype"])
        if params.shape != (net.spec.n_params,):
            raise ValueError(f"{origin} is corrupt: params has shape {params.shape}, "
                             f"expected ({net.spec.n_params},) for sizes {net.sizes}")
        if params.dtype.kind != "f" or not np.isfinite(params).all():
            raise ValueError(f"{origin} is corrupt: its parameters are not all finite floats")
        net._params[...] = net.backend.asarray(params, net.dtype)
        return net

    def __getstate__(self) -> dict:
        """Pickled as architecture + NumPy parameters (device-agnostic, like :meth:`save`)."""
        s = self.spec
        return {"sizes": list(s.sizes), "activation": s.hidden, "loss": s.loss, "output": s.output,
                "dtype": s.dtype.name, "params": to_numpy(self._params).copy(), "seed": self.seed,
                "init": self.init, "rng": self._rng, **self._optimizer_fields()}

    def __setstate__(self, state: dict) -> None:
        """Unpickled onto the backend active now."""
        net = type(self)._rebuild(state, state["params"], origin="pickled MLP")
        net.seed, net.init, net._rng = state["seed"], state["init"], state["rng"]
        net._restore_optimizer(state, origin="pickled MLP")
        self.__dict__.update(net.__dict__)


class LogisticRegression(MLP):
    """Logistic regression: an MLP ``[n_features, 1]`` with a sigmoid output and log_loss.

    ``predict`` gives P(y = 1 | x), shape (n_samples, 1).
    """

    def __init__(self, n_features, dtype="float32", seed=None, init="auto") -> None:
        n_features = check.positive_int("n_features", n_features)
        super().__init__([n_features, 1], activation="sigmoid", loss="log_loss", output="sigmoid",
                         dtype=dtype, seed=seed, init=init)

    @classmethod
    def _rebuild(cls, meta: dict, params: np.ndarray, origin: str) -> "LogisticRegression":
        sizes = list(meta["sizes"])
        if len(sizes) != 2 or sizes[1] != 1 or (meta["loss"], meta["output"]) != ("log_loss", "sigmoid"):
            raise ValueError(f"{origin} holds an MLP {sizes} with {meta['loss']} and a {meta['output']} output, "
                             "not a LogisticRegression: load it with fb.MLP.load")
        return super()._rebuild(meta, params, origin)

    def __repr__(self) -> str:
        return f"LogisticRegression(n_features={self.spec.sizes[0]}, dtype={self.dtype.name!r}, backend={self.backend.name!r})"


# ---------------------------------------------------------------- helpers
def _check_sizes(sizes) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise TypeError(f"sizes must be a sequence of ints. Received: sizes={sizes!r}. "
                        "Expected e.g. [784, 128, 10]")
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least two entries (inputs, outputs). Received: sizes={sizes!r}")
    for i, s in enumerate(sizes):
        check.positive_int(f"sizes[{i}]", s)
    return [int(s) for s in sizes]


def _initial_params(spec: NetSpec, init: str, rng: np.random.Generator) -> np.ndarray:
    """Seeded float64 initial parameters (cast by the caller), the same on every backend."""
    if init == "auto":
        init = "he" if spec.hidden in ("relu", "leaky_relu") else "glorot"
    flat = np.zeros(spec.n_params)
    weights, biases = _views(spec, flat)
    for w, b in zip(weights, biases):
        fan_out, fan_in = w.shape
        if init == "he":
            w[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in), w.shape)
        elif init == "glorot":
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w[...] = rng.uniform(-bound, bound, w.shape)
        else:  # "normal"
            w[...] = rng.standard_normal(w.shape)
            b[...] = rng.standard_normal(b.shape)
    return flat


def _views(spec: NetSpec, flat) -> tuple[list, list]:
    """Per-layer ``(weights, biases)`` views into a flat ``[W1, b1, W2, b2, ...]`` buffer."""
    weights, biases = [], []
    for w_off, b_off, fan_in, fan_out in zip(spec.w_offsets, spec.b_offsets, spec.sizes[:-1], spec.sizes[1:]):
        weights.append(flat[w_off:b_off].reshape(fan_out, fan_in))
        biases.append(flat[b_off:b_off + fan_out])
    return weights, biases

