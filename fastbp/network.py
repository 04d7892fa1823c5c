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

import contextlib
import hashlib
import io
import json
import math
import os
import stat
import struct
import tempfile
import threading
import zipfile
import zlib

import numpy as np

from . import _validate as check
from .backend import get_backend, to_numpy
from .kernels.base import ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, LOSSES, NetSpec, OptimizerState

DEFAULT_OUTPUT = {"mse": "identity", "log_loss": "sigmoid", "cross_entropy": "softmax"}
INITS = ("auto", "he", "glorot", "normal")
STRATEGIES = ("vectorized", "loop")
DTYPES = check.FLOAT_DTYPES
FORMAT_VERSION = 2  # 2 adds the optimizer and its state; version 1 files still load

# Workspaces: what one thread keeps per model between calls, bounded in bytes. predict and
# loss run in chunks of rows whose Z and A fit _FORWARD_BYTES; gradients in chunks whose Z, A
# and D fit _BACKWARD_BYTES (one chunk for any ordinary training batch, so a steady-state step
# reuses its buffers and allocates nothing). A thread keeps one workspace of each kind per model,
# grown up to its chunk: at most _FORWARD_BYTES + _BACKWARD_BYTES (or one row, if a row is more).
_FORWARD_BYTES = 8 << 20
_BACKWARD_BYTES = 64 << 20


class _Workspace:
    """Z and A (and D, for backward) of every layer for up to ``rows`` examples.

    The first ``n`` rows serve any batch of ``n <= rows``: row slices of C-contiguous
    buffers stay C-contiguous, which every kernel path takes.
    """

    def __init__(self, backend, spec: NetSpec, rows: int, backward: bool) -> None:
        self.rows = rows
        self.Z, self.A, self.D = [], [], []
        for layer, width in enumerate(spec.sizes[1:]):
            z = backend.empty((rows, width), spec.dtype)
            self.Z.append(z)
            # identity keeps A = Z: no copy, and its derivative is a no-op
            self.A.append(z if spec.activation(layer) == "identity" else backend.empty((rows, width), spec.dtype))
            if backward:
                self.D.append(backend.empty((rows, width), spec.dtype))

    def view(self, n: int):
        """``(Z, A, D)`` of the first ``n`` rows (A[l] is Z[l] where the layer is identity)."""
        Z = [z[:n] for z in self.Z]
        A = [Z[l] if a is self.Z[l] else a[:n] for l, a in enumerate(self.A)]
        return Z, A, [d[:n] for d in self.D]


def _chunk_rows(spec: NetSpec, backward: bool) -> int:
    """Rows per chunk so that one chunk's workspace fits its byte budget (at least one row)."""
    per_row = 0
    for layer, width in enumerate(spec.sizes[1:]):
        per_row += width * (1 + (spec.activation(layer) != "identity") + backward)
    per_row *= spec.dtype.itemsize
    return max(1, (_BACKWARD_BYTES if backward else _FORWARD_BYTES) // per_row)


class _Guard:
    """Who may use one model now: readers (predict, loss, gradients, get_params, save) run
    together, each thread on its own workspaces; a writer (fit, set_params) first waits for
    the readers in flight, then has the model to itself, and other threads' calls meanwhile
    are refused with a RuntimeError: the parameters change at every step, so an answer from
    them would be silently wrong. The writer's own thread may read (validation, callbacks)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread ident -> nesting depth
        self._writer = None  # (thread ident, thread name, what)
        self._depth = 0  # the writer's nesting (set_params from a callback inside its own fit)

    def _busy(self, what: str):
        _, name, doing = self._writer
        return RuntimeError(
            f"MLP.{what} refused: thread {name!r} is running MLP.{doing} on this model, which changes its "
            f"parameters as it goes, so the answer would belong to no single model. Wait for {doing} to "
            "return (e.g. join that thread), or use a copy made before it (copy.deepcopy(net))")

    @contextlib.contextmanager
    def reading(self, what: str):
        me = threading.get_ident()
        with self._cond:
            if self._writer is not None and self._writer[0] != me:
                raise self._busy(what)
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                depth = self._readers.pop(me) - 1
                if depth:
                    self._readers[me] = depth
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, what: str):
        me = threading.get_ident()
        with self._cond:
            if self._writer is not None and self._writer[0] != me:
                raise self._busy(what)
            if self._writer is None:
                if me in self._readers:  # e.g. fit from inside a predict on the same model
                    raise RuntimeError(f"MLP.{what} refused: this thread is still inside a call that reads "
                                       f"the model. Call {what} after it returns")
                self._writer = (me, threading.current_thread().name, what)  # new readers refused from here
                try:
                    self._cond.wait_for(lambda: not self._readers)  # and those in flight finish first
                except BaseException:  # interrupted while waiting: the model stays free
                    self._writer = None
                    raise
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()


# GPU backends share device scratch between threads (one stream, kernels queued in order), so
# their model calls from different threads run one at a time; the device is serial anyway.
_DEVICE_LOCK = threading.RLock()


def _device_lock(backend):
    return _DEVICE_LOCK if backend.is_gpu else contextlib.nullcontext()


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
        spec = _spec(sizes, activation, loss, output, dtype)
        seed = check.seed("seed", seed)
        check.choice("init", init, INITS)
        rng = np.random.default_rng(seed)
        self._setup(spec, _initial_params(spec, init, rng), seed, init, rng)

    def _setup(self, spec: NetSpec, params: np.ndarray, seed, init, rng) -> None:
        """The model's buffers on the active backend, holding the flat ``params`` (host array)."""
        self.backend = get_backend()
        self.spec = spec
        self.seed, self.init = seed, init
        self._rng = rng
        self._params = self.backend.asarray(params, spec.dtype)
        self._grads = self.backend.zeros(spec.n_params, spec.dtype)
        self.weights, self.biases = _views(spec, self._params)
        self._grad_weights, self._grad_biases = _views(spec, self._grads)
        self._local = threading.local()  # this thread's workspaces for this model; freed with either
        self._rows = {False: _chunk_rows(spec, False), True: _chunk_rows(spec, True)}
        self._guard = _Guard()
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
        with self._reading("get_params"):
            return [to_numpy(w).copy() for w in self.weights], [to_numpy(b).copy() for b in self.biases]

    def set_params(self, weights, biases) -> None:
        """Copy ``weights`` and ``biases`` (any backend's arrays or lists) into the model."""
        new_w = self._check_param_list("weights", weights, [(o, i) for i, o in zip(self.spec.sizes, self.spec.sizes[1:])])
        new_b = self._check_param_list("biases", biases, [(o,) for o in self.spec.sizes[1:]])
        with self._guard.writing("set_params"), _device_lock(self.backend):
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

    @contextlib.contextmanager
    def _reading(self, what: str):
        with self._guard.reading(what), _device_lock(self.backend):
            yield

    def _workspace(self, n: int, backward: bool) -> _Workspace:
        """This thread's workspace with room for ``n`` rows (``n`` at most one chunk)."""
        key = "backward" if backward else "forward"
        ws = getattr(self._local, key, None)
        if ws is None or ws.rows < n:
            setattr(self._local, key, None)  # the old one goes before the new one is made
            ws = _Workspace(self.backend, self.spec, n, backward)
            setattr(self._local, key, ws)
        return ws

    def _chunks(self, n: int, backward: bool):
        """``(workspace, [(lo, hi), ...])``: row ranges of at most one chunk each, covering ``n``."""
        rows = min(n, self._rows[backward])
        return self._workspace(rows, backward), [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]

    # ------------------------------------------------------------ forward
    def _forward(self, X, Z, A):
        """Forward pass of the rows ``X`` into ``Z``, ``A`` (per-layer arrays of X's rows); returns a^L."""
        be, spec = self.backend, self.spec
        a_prev = X
        for l in range(spec.n_layers):
            be.matmul(a_prev, self.weights[l], Z[l], trans_b=True)
            be.add_bias(Z[l], self.biases[l])
            if A[l] is not Z[l]:
                be.activation(spec.activation(l), Z[l], A[l])
            a_prev = A[l]
        return a_prev

    def _predict(self, Xd):
        """Output activations of ``Xd`` chunk by chunk into a new backend array."""
        n = Xd.shape[0]
        out = self.backend.empty((n, self.spec.sizes[-1]), self.dtype)
        ws, chunks = self._chunks(n, backward=False)
        for lo, hi in chunks:
            Z, A, _ = ws.view(hi - lo)
            out[lo:hi] = self._forward(Xd[lo:hi], Z, A)
        return out

    def forward(self, X):
        """Output activations ``a^L``, shape (n_samples, n_outputs), as a backend array.

        X : array of shape (n_samples, n_inputs) (NumPy, CuPy or nested lists). Runs in
        chunks of rows (no backward buffers kept), so memory does not grow with n_samples.
        Safe to call from several threads at once on one model.
        """
        with self._reading("forward"):
            return self._predict(self._inputs(X))

    def predict(self, X):
        """The output activations (probabilities for sigmoid/softmax outputs) as a NumPy array."""
        with self._reading("predict"):
            return to_numpy(self._predict(self._inputs(X)))

    def loss(self, X, Y) -> float:
        """The mean cost over the examples (computed in chunks of rows)."""
        with self._reading("loss"):
            Xd, Yd = self._inputs_targets(X, Y)
            return self._loss(Xd, Yd)

    def _forward_stats(self, Xd, Yd, cost: bool = True, count: bool = False):
        """``(summed cost, rows classified right)`` of the model as it is now, chunk by chunk."""
        be, spec = self.backend, self.spec
        total, correct = 0.0, 0
        ws, chunks = self._chunks(Xd.shape[0], backward=False)
        for lo, hi in chunks:
            Z, A, _ = ws.view(hi - lo)
            self._forward(Xd[lo:hi], Z, A)
            if cost:
                total = total + be.loss_sum(spec.loss, spec.output, Z[-1], A[-1], Yd[lo:hi])
            if count:
                correct += int(be.count_correct(spec.loss, A[-1], Yd[lo:hi]))
        return float(total), correct

    def _loss(self, Xd, Yd) -> float:
        return self._forward_stats(Xd, Yd)[0] / Xd.shape[0]

    # ------------------------------------------------------------ backward
    def _backward(self, X, Y, Z, A, D, grad_w, grad_b, scale: float, accumulate: bool = False,
                  per_example: bool = False):
        """Output delta, then dW/db of every layer into ``grad_w``/``grad_b``; returns the summed cost.

        accumulate : add to the gradients already there (a later chunk of the same batch).
        per_example : ``X`` is one example and dW += delta a^T is one outer product (the naive loop).
        """
        be, spec = self.backend, self.spec
        last = spec.n_layers - 1
        total = be.output_delta(spec.loss, spec.output, Z[last], A[last], Y, D[last])
        for l in range(last, -1, -1):
            a_prev = X if l == 0 else A[l - 1]
            if per_example:
                be.outer(D[l][0], a_prev[0], grad_w[l], alpha=scale)
            else:
                be.matmul(D[l], a_prev, grad_w[l], trans_a=True, alpha=scale, beta=1.0 if accumulate else 0.0)
            be.bias_grad(D[l], grad_b[l], alpha=scale, accumulate=accumulate or per_example)
            if l > 0:
                be.hidden_delta(spec.hidden, D[l], self.weights[l], Z[l - 1], A[l - 1], D[l - 1])
        return total

    def _gradients_into(self, X, Y, strategy: str, count: bool = False, grads=None):
        """Mean gradients of a batch into ``grads`` (``self._grads`` when None); returns ``(summed
        cost, correct)``: ``correct`` counts the rows the pre-update outputs classify right when
        ``count`` (else 0). A batch larger than one chunk is summed chunk by chunk."""
        n, be, spec = X.shape[0], self.backend, self.spec
        if grads is None:
            grads, grad_w, grad_b = self._grads, self._grad_weights, self._grad_biases
        else:
            grad_w, grad_b = _views(spec, grads)
        if strategy == "vectorized":
            ws, chunks = self._chunks(n, backward=True)
            total, correct = 0.0, 0
            for lo, hi in chunks:
                Z, A, D = ws.view(hi - lo)
                x, y = X[lo:hi], Y[lo:hi]
                self._forward(x, Z, A)
                if count:
                    correct += int(be.count_correct(spec.loss, A[-1], y))
                total = total + self._backward(x, y, Z, A, D, grad_w, grad_b, 1.0 / n, accumulate=lo > 0)
            return total, correct
        if be.has_compiled_loop:
            correct = self._forward_stats(X, Y, cost=False, count=True)[1] if count else 0
            return be.loop_gradients(spec, self._params, X, Y, grads), correct
        # The naive way: one example at a time, accumulating outer products.
        Z, A, D = self._workspace(1, backward=True).view(1)
        grads[...] = 0
        total, correct = 0.0, 0
        for i in range(n):
            x, y = X[i:i + 1], Y[i:i + 1]
            self._forward(x, Z, A)
            if count:
                correct += int(be.count_correct(spec.loss, A[-1], y))
            total += self._backward(x, y, Z, A, D, grad_w, grad_b, 1.0 / n, per_example=True)
        return total, correct

    def gradients(self, X, Y, strategy="vectorized"):
        """Gradients of the mean cost: ``(dWs, dbs)``, shaped like ``weights`` and ``biases``.

        strategy : "vectorized" (the batch matrix form) or "loop" (the per-example
            loop accumulating outer products: the same numbers, the naive way).

        Each call computes into its own buffer, so threads may call it on one model at once.
        """
        check.choice("strategy", strategy, STRATEGIES)
        with self._reading("gradients"):
            Xd, Yd = self._inputs_targets(X, Y)
            grads = self.backend.zeros(self.spec.n_params, self.dtype)
            self._gradients_into(Xd, Yd, strategy, grads=grads)
        return _views(self.spec, grads)

    # ------------------------------------------------------------ training
    def fit(self, X, Y, epochs=1, batch_size=32, lr=None, optimizer=None, shuffle=True, strategy="vectorized",
            progress=None, validation_data=None, validation_split=0.0, seed=None, schedule=None,
            callbacks=None, threads=None, comm=None):
        """Train by backpropagation and an optimizer on the mean cost; returns the per-epoch History.

        See :func:`fastbp.training.fit` for every argument.
        """
        from .training import fit

        # One writer: readers in other threads finish first, and are refused until fit returns.
        with self._guard.writing("fit"), _device_lock(self.backend):
            return fit(self, X, Y, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                       shuffle=shuffle, strategy=strategy, progress=progress, validation_data=validation_data,
                       validation_split=validation_split, seed=seed, schedule=schedule, callbacks=callbacks,
                       threads=threads, comm=comm)

    def _evaluate(self, Xd, Yd, prefix: str = "val_") -> dict[str, float]:
        """Mean cost (and accuracy for classification losses) of the model as it is now."""
        count = self.spec.loss != "mse"
        total, correct = self._forward_stats(Xd, Yd, count=count)
        result = {prefix + "loss": total / Xd.shape[0]}
        if count:
            result[prefix + "accuracy"] = correct / Xd.shape[0]
        return result

    # ------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write a device-agnostic ``.npz``: format version, architecture, dtype, parameters, and the
        optimizer with its state (so save -> load -> fit continues the same trajectory).

        path : str, os.PathLike, or a binary file object (e.g. ``io.BytesIO``) written as it is.
            A path is written as ``np.save`` writes one -- a new file gets the permissions the
            umask allows, an existing file keeps its own, a symlink is followed and its target
            replaced -- but through a temporary file beside the target, renamed into place, so a
            crash never leaves a half-written model. Temporary files that earlier saves of the
            same path left behind when they were killed are removed.
        """
        with self._reading("save"):
            fields = self._fields()
        if _is_file_object(path, "write"):
            if isinstance(path, io.TextIOBase):
                raise TypeError(f"path must be a binary file object. Received: a text stream {path!r}. "
                                "Expected one opened with mode 'wb' (or a path)")
            np.savez(path, **fields)
            return
        _save_atomically(_fspath(path), fields)

    def _fields(self) -> dict:
        s = self.spec
        return dict(format_version=np.int64(FORMAT_VERSION), sizes=np.asarray(s.sizes, np.int64),
                    activation=np.str_(s.hidden), output=np.str_(s.output), loss=np.str_(s.loss),
                    dtype=np.str_(s.dtype.name), params=to_numpy(self._params),
                    rng=np.str_(json.dumps(self._rng.bit_generator.state)), **self._optimizer_fields())

    @classmethod
    def load(cls, path) -> "MLP":
        """Read a model written by :meth:`save` onto the active backend.

        path : str, os.PathLike (symlinks followed), or a seekable binary file object.

        Safe on files from anywhere: nothing is unpickled, only the members a model file has
        are read, and their shapes and sizes are checked from the archive's headers before
        anything is allocated. A file that is not a fastbp model, or a damaged one, is a
        ValueError naming it and saying what is wrong; values are checked once cast to the
        model's dtype (a float32 model with parameters beyond float32 is refused, not Inf).
        Files of every format version up to this fastbp's load (version 1 had no optimizer).
        """
        if _is_file_object(path, "read"):
            name = getattr(path, "name", None)
            origin = repr(name) if isinstance(name, str) else f"the {type(path).__name__} file object"
            fields = _read_model(path, origin)
        else:
            path = _fspath(path)
            origin = repr(path)
            if not os.path.isfile(path):
                what = "a directory" if os.path.isdir(path) else "no such file"
                raise FileNotFoundError(f"no fastbp model at {origin}: {what}")
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise _os_error(exc, f"cannot read the fastbp model {origin}") from None
            with f:
                fields = _read_model(f, origin)
        net = cls._rebuild(fields, fields["params"], origin=origin)
        net._restore_optimizer(fields, origin=origin)
        if fields.get("rng") is not None:  # the shuffle stream goes on where it was saved
            net._rng = _generator_from_json(fields["rng"], origin)
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
        if fields.get("optimizer") is None:  # a version-1 file, or a model never trained
            return
        from . import optim

        try:
            meta = json.loads(str(fields["optimizer"]))
            opt = optim.from_config(meta["kind"], meta["config"])
            step = int(fields["optimizer_step"])
            buffers = np.asarray(fields["optimizer_state"])
            np.array([step], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise ValueError(f"{origin} is corrupt: unreadable optimizer fields ({exc})") from None
        if buffers.ndim != 2 or buffers.shape[1] != self.n_params or buffers.shape[0] > 2 or step < 0:
            raise ValueError(f"{origin} is corrupt: optimizer_state has shape {buffers.shape} and step {step}, "
                             f"expected (k <= 2, {self.n_params}) and step >= 0")
        state = _cast_finite(buffers, self.dtype, "optimizer_state", origin)
        if buffers.shape[0] or step:
            opt.state = OptimizerState(self.backend.asarray(state, self.dtype), step)
        opt._bind(self)
        self.optimizer = opt

    @classmethod
    def _rebuild(cls, meta: dict, params, origin: str) -> "MLP":
        """A model of class ``cls`` from saved architecture fields and a flat parameter array."""
        try:
            spec = _spec(meta["sizes"], meta["activation"], meta["loss"], meta["output"], meta["dtype"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{origin} is corrupt: {exc}") from None
        params = np.asarray(params)
        if params.shape != (spec.n_params,):
            raise ValueError(f"{origin} is corrupt: params has shape {params.shape}, "
                             f"expected ({spec.n_params},) for sizes {list(spec.sizes)}")
        flat = _cast_finite(params, spec.dtype, "params", origin)
        net = cls.__new__(cls)
        MLP._setup(net, spec, flat, None, "auto", np.random.default_rng())
        return net

    def __getstate__(self) -> dict:
        """Pickled as architecture + NumPy parameters (device-agnostic, like :meth:`save`)."""
        s = self.spec
        with self._reading("__getstate__"):
            return {"sizes": list(s.sizes), "activation": s.hidden, "loss": s.loss, "output": s.output,
                    "dtype": s.dtype.name, "params": to_numpy(self._params).copy(), "seed": self.seed,
                    "init": self.init, "rng": self._rng, **self._optimizer_fields()}

    def __setstate__(self, state: dict) -> None:
        """Unpickled onto the backend active now."""
        net = type(self)._rebuild(state, state["params"], origin="pickled MLP")
        net.seed, net.init, net._rng = state["seed"], state["init"], state["rng"]
        net._restore_optimizer(state, origin="pickled MLP")
        self.__dict__.update(net.__dict__)
        if self.optimizer is not None:  # bound to this model, not the temporary one it was rebuilt in
            self.optimizer._bind(self)


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
def _spec(sizes, activation, loss, output, dtype) -> NetSpec:
    """The checked architecture (every argument's ValueError/TypeError names it)."""
    sizes = check.sizes("sizes", sizes)
    check.choice("activation", activation, ELEMENTWISE_ACTIVATIONS)
    check.choice("loss", loss, LOSSES)
    output = DEFAULT_OUTPUT[loss] if output is None else check.choice("output", output, ACTIVATIONS)
    dtype = check.float_dtype("dtype", dtype)
    if loss == "cross_entropy" and sizes[-1] < 2:
        raise ValueError(f"loss='cross_entropy' needs at least 2 outputs (a softmax over one output is always 1, "
                         f"so nothing would train). Received: sizes={sizes!r}. Expected sizes[-1] >= 2, or "
                         "loss='log_loss' with one sigmoid output for a binary target")
    return NetSpec(tuple(sizes), activation, output, loss, dtype)


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


# ---------------------------------------------------------------- model files
# Every member a model file may hold: (dtype kinds, ndim). Nothing else in an archive is read.
_MEMBERS = {
    "format_version": ("iu", 0), "sizes": ("iu", 1), "activation": ("U", 0), "output": ("U", 0),
    "loss": ("U", 0), "dtype": ("U", 0), "params": ("f", 1),
    "optimizer": ("U", 0), "optimizer_step": ("iu", 0), "optimizer_state": ("f", 2),  # version 2
    "rng": ("U", 0),  # version 2: the shuffle generator's state (JSON), absent in older files
}
_REQUIRED = ("format_version", "sizes", "activation", "output", "loss", "dtype", "params")
_OPTIMIZER_MEMBERS = ("optimizer", "optimizer_step", "optimizer_state")
_MAX_TEXT = 1 << 16  # characters in a text member (an optimizer's JSON is ~200)
_MAX_LAYERS = 1 << 16  # entries of sizes
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this (RFC 1951's longest matches)
_KIND_NAMES = {"i": "integers", "u": "integers", "f": "floats", "U": "text", "b": "booleans", "c": "complex numbers",
               "S": "bytes", "O": "Python objects", "V": "raw records", "M": "dates", "m": "time deltas"}
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error,
                   NotImplementedError, RuntimeError, struct.error)


def _is_file_object(x, method: str) -> bool:
    return not isinstance(x, (str, bytes, os.PathLike)) and callable(getattr(x, method, None))


def _fspath(path) -> str:
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be a str, an os.PathLike or a binary file object. Received: {path!r} "
                        f"({type(path).__name__})") from None


def _os_error(exc: OSError, message: str) -> OSError:
    """``exc``'s kind (PermissionError, FileNotFoundError, ...) with a message naming the user's path."""
    if exc.errno is None:
        return type(exc)(f"{message}: {exc}")
    return type(exc)(exc.errno, f"{message}: {exc.strerror}")


def _cast_finite(values: np.ndarray, dtype: np.dtype, name: str, origin: str) -> np.ndarray:
    """``values`` cast to the model's dtype, refused unless every cast value is finite."""
    if values.dtype.kind != "f":
        raise ValueError(f"{origin} is corrupt: {name} holds {_KIND_NAMES.get(values.dtype.kind, values.dtype)}, "
                         "expected floats")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(dtype)
    bad = ~np.isfinite(cast)
    if bad.any():
        first = values.reshape(-1)[int(np.argmax(bad.reshape(-1)))]
        raise ValueError(f"{origin} is corrupt: {name} are not all finite in {dtype.name}: {int(bad.sum())} "
                         f"of {values.size} are NaN, Inf or beyond its range (e.g. {float(first)!r}; {dtype.name} "
                         f"holds magnitudes up to {float(np.finfo(dtype).max):.3g})")
    return cast


# ---- reading
def _read_model(f, origin: str) -> dict:
    """The checked fields of the model file open as ``f``: Python values, and NumPy arrays for
    ``params`` and ``optimizer_state``. Every problem is a ValueError naming ``origin``."""
    if not (callable(getattr(f, "seek", None)) and (not hasattr(f, "seekable") or f.seekable())):
        raise TypeError(f"a file object to load from must be seekable. Received: {f!r}. "
                        "Expected e.g. open(path, 'rb') or io.BytesIO(data)")
    try:
        start = f.tell()
        f.seek(0, os.SEEK_END)
        size = f.tell() - start
        f.seek(start)
        magic = f.read(8)
        f.seek(start)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{origin} could not be read ({exc})") from None
    if isinstance(magic, str):
        raise TypeError(f"the file object must be binary. Received: a text stream for {origin}. "
                        "Expected one opened with mode 'rb'")
    if not magic.startswith(b"PK"):
        raise ValueError(_not_a_model(origin, magic, size))
    try:
        archive = zipfile.ZipFile(f)
    except _ARCHIVE_ERRORS as exc:
        raise ValueError(f"{origin} is not a readable fastbp model: a damaged .npz (zip) archive ({exc})") from None
    with archive:
        return _read_members(archive, origin, size)


def _not_a_model(origin: str, magic: bytes, size: int) -> str:
    what = "not a .npz (zip) archive"
    if size == 0:
        what = "an empty file"
    elif magic.startswith(b"\x93NUMPY"):
        what = "a .npy file (one NumPy array, as np.save writes)"
    elif magic[:1] == b"\x80":
        what = "a Python pickle"
    elif magic.startswith(b"\x89HDF"):
        what = "an HDF5 file"
    elif magic.lstrip()[:1] in (b"{", b"["):
        what = "a JSON or text file"
    return f"{origin} is not a fastbp model file: it is {what}. Expected the .npz archive MLP.save writes"


def _read_members(archive: zipfile.ZipFile, origin: str, size: int) -> dict:
    infos = {}
    for info in archive.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else None
        if key in _MEMBERS:
            if key in infos:
                raise ValueError(f"{origin} is corrupt: it holds two {key!r} members")
            infos[key] = info
    missing = [key for key in _REQUIRED if key not in infos]
    if missing:
        found = sorted(archive.namelist())
        raise ValueError(f"{origin} is not a fastbp model: missing {missing} (it holds "
                         f"{found[:8]}{' ...' if len(found) > 8 else ''})")
    optimizer = [key for key in _OPTIMIZER_MEMBERS if key in infos]
    if optimizer and len(optimizer) != len(_OPTIMIZER_MEMBERS):
        raise ValueError(f"{origin} is corrupt: it has {optimizer} of the optimizer members "
                         f"{list(_OPTIMIZER_MEMBERS)} but not all of them")

    headers = {key: _member_header(archive, info, key, origin, size) for key, info in infos.items()}
    for key, (shape, dtype) in headers.items():
        kinds, ndim = _MEMBERS[key]
        if dtype.kind not in kinds or len(shape) != ndim:
            expected = {"iu": "integers", "f": "floats", "U": "text"}[kinds]
            what = "unreadable architecture: " if key in _REQUIRED[:6] else ""
            raise ValueError(f"{origin} is corrupt: {what}{key} holds {_KIND_NAMES.get(dtype.kind, str(dtype))} of shape "
                             f"{shape}; expected {expected} of {'one value' if ndim == 0 else f'{ndim} dimension(s)'}")
        if dtype.kind == "U" and dtype.itemsize // 4 > _MAX_TEXT:
            raise ValueError(f"{origin} is corrupt: {key} is {dtype.itemsize // 4} characters long; "
                             f"expected at most {_MAX_TEXT}")
    if not 2 <= headers["sizes"][0][0] <= _MAX_LAYERS:
        raise ValueError(f"{origin} is corrupt: sizes has {headers['sizes'][0][0]} entries; "
                         f"expected 2 to {_MAX_LAYERS}")

    small = {key: _member_values(archive, infos[key], key, origin)
             for key in infos if key not in ("params", "optimizer_state")}
    version = int(small["format_version"])
    if not 1 <= version <= FORMAT_VERSION:
        newer = " (written by a newer fastbp: upgrade fastbp to read it)" if version > FORMAT_VERSION else ""
        raise ValueError(f"{origin} has format version {version}{newer}; this fastbp reads versions 1 to "
                         f"{FORMAT_VERSION}")
    fields = {"sizes": [int(v) for v in small["sizes"]],
              **{key: str(small[key][()]) for key in ("activation", "output", "loss", "dtype")}}
    try:
        spec = _spec(fields["sizes"], fields["activation"], fields["loss"], fields["output"], fields["dtype"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{origin} is corrupt: {exc}") from None
    n = spec.n_params
    if headers["params"][0] != (n,):
        raise ValueError(f"{origin} is corrupt: params has shape {headers['params'][0]}, but sizes "
                         f"{list(spec.sizes)} need ({n},)")
    if optimizer:
        k = headers["optimizer_state"][0]
        if k[0] > 2 or k[1] != n:
            raise ValueError(f"{origin} is corrupt: optimizer_state has shape {k}; expected (k <= 2, {n})")
        fields.update(optimizer=str(small["optimizer"][()]), optimizer_step=int(small["optimizer_step"]),
                      optimizer_state=_member_values(archive, infos["optimizer_state"], "optimizer_state", origin))
    if "rng" in small:
        fields["rng"] = str(small["rng"][()])
    fields["params"] = _member_values(archive, infos["params"], "params", origin)
    return fields


def _generator_from_json(text: str, origin: str) -> np.random.Generator:
    """The shuffle generator saved by :meth:`MLP.save` (NumPy's PCG64 state as JSON)."""
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
            raise ValueError(f"expected a PCG64 state, got {str(state)[:80]}")
        bits = np.random.PCG64()
        bits.state = state
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as exc:
        raise ValueError(f"{origin} is corrupt: unreadable rng state ({exc})") from None
    return np.random.Generator(bits)


def _member_header(archive, info, key, origin, size):
    """``(shape, dtype)`` of one .npy member from its header alone, with its sizes checked:
    the zip entry's claimed sizes must be possible for this file, and the header's shape must
    account for exactly the bytes the entry holds."""
    if info.flag_bits & 0x1:
        raise ValueError(f"{origin} is corrupt: its {key} member is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"{origin} is corrupt: its {key} member uses zip compression method "
                         f"{info.compress_type}; expected stored or deflated (as numpy writes)")
    stored = info.compress_type == zipfile.ZIP_STORED
    if (info.compress_size > size or (stored and info.file_size != info.compress_size)
            or info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024):
        raise ValueError(f"{origin} is corrupt: its {key} member claims {info.file_size} bytes from "
                         f"{info.compress_size} compressed in a {size}-byte file")
    try:
        with archive.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header_bytes = fp.tell()
    except _ARCHIVE_ERRORS as exc:
        raise ValueError(f"{origin} is corrupt: its {key} member is not a readable array ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{origin} is not a fastbp model file: its {key} member holds Python objects "
                         "(pickled data), which fastbp never reads")
    data_bytes = math.prod(shape) * dtype.itemsize
    if header_bytes + data_bytes != info.file_size:
        raise ValueError(f"{origin} is corrupt: its {key} member declares shape {shape} of {dtype} "
                         f"({data_bytes} bytes) but holds {info.file_size - header_bytes}")
    return tuple(shape), dtype


def _member_values(archive, info, key, origin) -> np.ndarray:
    try:
        with archive.open(info) as fp:
            return np.lib.format.read_array(fp, allow_pickle=False)
    except _ARCHIVE_ERRORS as exc:
        raise ValueError(f"{origin} is corrupt: its {key} member could not be read ({exc})") from None


# ---- writing
_TEMP_SUFFIX = ".npz.tmp"
_ACTIVE_TEMPS: set[str] = set()  # this process's saves in progress
_TEMPS_LOCK = threading.Lock()


def _temp_prefix(name: str) -> str:
    """``.fastbp-<hash of the file name>.``: names the temporary files of saves of one path."""
    return f".fastbp-{hashlib.sha1(os.fsencode(name)).hexdigest()[:16]}."


def _save_atomically(path: str, fields: dict) -> None:
    """``np.savez`` to ``path`` through a temporary file beside it, renamed into place."""
    target = os.path.realpath(path)  # through symlinks: the link stays, the file it names is replaced
    directory, name = os.path.split(target)
    prefix = _temp_prefix(name)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its permissions ...
    except OSError:
        mode = 0o666 & ~_umask()  # ... a new one gets what open() would give it
    tmp = None
    try:
        with _TEMPS_LOCK:
            _remove_stale_temps(directory, prefix)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{prefix}{os.getpid()}.", suffix=_TEMP_SUFFIX)
            _ACTIVE_TEMPS.add(tmp)
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            np.savez(f, **fields)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp_done, tmp = tmp, None
        _ACTIVE_TEMPS.discard(tmp_done)
        _fsync_directory(directory)
    except OSError as exc:
        raise _os_error(exc, f"cannot save the fastbp model to {path!r}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _ACTIVE_TEMPS.discard(tmp)


def _remove_stale_temps(directory: str, prefix: str) -> None:
    """Delete ``<prefix><pid>.<random>.npz.tmp`` files whose save can no longer finish: their
    process is gone (killed mid-save), or it is this process and the save is not running."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    me = os.getpid()
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TEMP_SUFFIX)):
            continue
        pid, dot, rest = name[len(prefix):-len(_TEMP_SUFFIX)].partition(".")
        if not (pid.isdigit() and dot and rest and "." not in rest):
            continue
        full = os.path.join(directory, name)
        stale = full not in _ACTIVE_TEMPS if int(pid) == me else not _process_alive(int(pid))
        if stale:
            try:
                os.unlink(full)
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows: never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours, or cannot tell
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: the only portable way, briefly process-wide
    os.umask(old)
    return old


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); best effort."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
