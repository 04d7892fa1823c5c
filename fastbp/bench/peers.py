"""The same training on peer libraries, for benchmarks: PyTorch (eager), JAX (jit) and scikit-learn.

Each function trains the model fastbp trains -- dense layers ``sizes``, the hidden
activation ``activation``, the loss's natural output -- with the optimizer named by
``optimizer`` ("sgd" | "momentum" | "adam", torch.optim's formulas, no weight decay,
constant learning rate; see :mod:`fastbp.bench.optimizer`) on the mean cost of each
mini-batch, on the data given, and reports how long it took. Each shuffles the
examples every epoch, as ``MLP.fit`` does.

* :func:`torch_throughput` -- ``nn.Sequential`` of ``nn.Linear`` + activation modules and the
  ``torch.optim`` optimizer; the loss from the logits (``cross_entropy``: ``F.cross_entropy``;
  ``log_loss``: BCE-with-logits summed over outputs; ``mse``: ``1/2 sum_j (a_j - y_j)^2``),
  each the mean over the batch, exactly fastbp's costs.
* :func:`jax_throughput` -- the same model and costs as pure functions under ``jax.jit``, in
  one of two forms: ``"jit"``, one jitted step per batch called from a Python loop, and
  ``"scan"``, the whole epoch (the shuffle's gather, every batch, the update) one jitted
  ``lax.scan``; each epoch's permutation is drawn by NumPy, as ``MLP.fit`` draws its own.
  Compile time is measured apart (the first call minus a steady one) and excluded.
* :func:`sklearn_mlp_fit` -- ``MLPClassifier`` (``cross_entropy``, ``log_loss``) or
  ``MLPRegressor`` (``mse``) with ``alpha=0`` and the optimizer's own solver.

torch, jax and scikit-learn are imported inside the functions, never by ``import fastbp``;
a missing one raises ImportError naming the pip command. Every function accepts the
keyword arguments ``fastbp bench --peers`` passes (sizes, activation, loss, X, Y,
batch_size, lr, epochs, dtype, threads, seed, optimizer, momentum) and returns a dict
with ``samples_per_s`` and ``seconds``. ``params`` (a list of ``(W, b)`` NumPy pairs, ``W``
of shape (n_out, n_in)) starts torch and JAX from given parameters, and ``return_params``
returns the trained ones, so their trajectories can be compared step by step.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings

import numpy as np

from .optimizer import DEFAULT_MOMENTUM, OptimizerSpec

_DEFAULT_OUTPUT = {"mse": "identity", "log_loss": "sigmoid", "cross_entropy": "softmax"}
_SKLEARN_ACTIVATION = {"sigmoid": "logistic", "relu": "relu", "tanh": "tanh", "identity": "identity"}
_ACTIVATIONS = ("sigmoid", "relu", "tanh", "leaky_relu", "identity")
JAX_FORMS = ("jit", "scan")
_JAX_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"
# XLA's CPU backend compiles a while loop (a lax.scan) whose body touches fewer bytes than this
# limit as one kernel, and otherwise runs the body op by op (a thunk per fused op). Its default
# limit is tiny: the 2-8-1 net's SGD loop fits, its momentum and Adam loops do not and run
# 9x / 7x slower (~2400 / ~3100 ns a step instead of ~260 / ~410), and 784-128-10 at batch 1
# runs 2.4-3x slower. Loops with XNNPACK-fused GEMMs (batch > 1) are never compiled this way.
_JAX_SMALL_LOOP_OPTION = "xla_cpu_small_while_loop_byte_threshold"
_JAX_SMALL_LOOP_BYTES = 100_000_000
_JAX_SMALL_LOOPS = f"--xla_backend_extra_options={_JAX_SMALL_LOOP_OPTION}={_JAX_SMALL_LOOP_BYTES}"


def _import(name: str, pip: str):
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"{name} is needed for this peer benchmark but is not installed "
                          f"({exc}). Install it with: pip install {pip}") from exc


def _labels(Y) -> np.ndarray:
    """Integer class labels from labels (n,) or one-hot / probability rows (n, k)."""
    Y = np.asarray(Y)
    return Y.argmax(axis=1) if Y.ndim == 2 else Y.astype(np.int64)


def _targets(loss: str, Y, n: int, n_out: int, dtype: str) -> np.ndarray:
    """Targets as a float (n, n_out) array: one-hot rows for cross_entropy."""
    if loss == "cross_entropy":
        labels = _labels(Y)
        out = np.zeros((n, n_out), dtype=dtype)
        out[np.arange(n), labels] = 1
        return out
    return np.ascontiguousarray(np.asarray(Y, dtype=dtype).reshape(n, -1))


def _check_common(sizes, activation, loss, X, batch_size, epochs, dtype):
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least two entries. Received: sizes={sizes!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation. Received: activation={activation!r}. Expected one of "
                         f"{list(_ACTIVATIONS)}")
    if loss not in _DEFAULT_OUTPUT:
        raise ValueError(f"unknown loss. Received: loss={loss!r}. Expected one of {sorted(_DEFAULT_OUTPUT)}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64'. Received: dtype={dtype!r}")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != sizes[0]:
        raise ValueError(f"X must have shape (n_samples, {sizes[0]}). Received: shape {X.shape}")
    n = X.shape[0]
    batch = n if batch_size is None else max(1, min(int(batch_size), n))
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1. Received: epochs={epochs!r}")
    return sizes, np.ascontiguousarray(X, dtype=dtype), n, batch, int(epochs)


def init_params(sizes, seed: int = 0, dtype: str = "float32") -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W, b)`` per layer drawn as ``nn.Linear`` does: uniform in +-1/sqrt(n_in), seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        out.append((rng.uniform(-bound, bound, (fan_out, fan_in)).astype(dtype),
                    rng.uniform(-bound, bound, fan_out).astype(dtype)))
    return out


def _check_params(params, sizes, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(params) != len(sizes) - 1:
        raise ValueError(f"params needs one (W, b) pair per layer. Received: {len(params)} pairs for sizes {sizes}")
    out = []
    for (W, b), fan_in, fan_out in zip(params, sizes[:-1], sizes[1:]):
        W, b = np.asarray(W, dtype=dtype), np.asarray(b, dtype=dtype)
        if W.shape != (fan_out, fan_in) or b.shape != (fan_out,):
            raise ValueError(f"params: a layer {fan_in} -> {fan_out} needs W {(fan_out, fan_in)} and b "
                             f"{(fan_out,)}. Received: W {W.shape}, b {b.shape}")
        out.append((W.copy(), b.copy()))
    return out


# ---------------------------------------------------------------------------- PyTorch
def torch_throughput(sizes, activation, loss, X, Y, batch_size, lr, epochs, dtype="float32", threads=None, *,
                     seed=0, shuffle=True, optimizer="sgd", momentum=DEFAULT_MOMENTUM, warmup_batches=10,
                     params=None, return_params=False) -> dict:
    """Train an MLP with PyTorch eager on the CPU and time it.

    Parameters
    ----------
    sizes : sequence of int, ``[n_inputs, n_hidden..., n_outputs]``.
    activation : {"sigmoid", "relu", "tanh", "leaky_relu", "identity"}, hidden layers.
    loss : {"mse", "log_loss", "cross_entropy"}, with the loss's default output
        (identity / sigmoid / softmax), computed from the logits.
    X : array of shape (n_samples, n_inputs).
    Y : array of shape (n_samples, n_outputs) (one-hot for cross_entropy), or integer
        labels of shape (n_samples,) for cross_entropy.
    batch_size : int or None (full batch).
    lr : float, the learning rate.
    epochs : int, timed epochs over ``X``.
    dtype : "float32" or "float64".
    threads : int or None, ``torch.set_num_threads`` for the run (restored after);
        None keeps torch's default (one per core).
    seed : int, seeds the initialisation and the shuffles.
    shuffle : bool, a fresh permutation of the examples every epoch (as ``MLP.fit``).
    optimizer : {"sgd", "momentum", "adam"}; momentum : float, for "momentum".
    warmup_batches : int, untimed steps first (torch's lazy initialisation), after which
        the model and optimizer are reset to their initial state.
    params : list of ``(W, b)`` or None, the initial parameters (None: torch's own init).
    return_params : bool, add the trained ``params`` to the result.

    Returns
    -------
    dict with ``samples_per_s``, ``seconds`` (the timed epochs), ``final_loss`` (the mean
    pre-update cost of the last epoch, as ``MLP.fit``'s history), ``epochs``,
    ``n_samples``, ``batch_size``, ``threads``, ``optimizer``, ``torch`` (version).
    """
    sizes, X, n, batch, epochs = _check_common(sizes, activation, loss, X, batch_size, epochs, dtype)
    spec = OptimizerSpec.make(optimizer, lr, momentum)
    init = None if params is None else _check_params(params, sizes, dtype)
    torch = _import("torch", "torch")
    act = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh,
           "identity": torch.nn.Identity, "leaky_relu": lambda: torch.nn.LeakyReLU(0.01)}
    F = torch.nn.functional

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        tdtype = torch.float32 if dtype == "float32" else torch.float64
        layers, linears = [], []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linears.append(torch.nn.Linear(fan_in, fan_out, dtype=tdtype))
            layers.append(linears[-1])
            if i < len(sizes) - 2:
                layers.append(act[activation]())
        model = torch.nn.Sequential(*layers)
        if init is not None:
            with torch.no_grad():
                for lin, (W, b) in zip(linears, init):
                    lin.weight.copy_(torch.from_numpy(W))
                    lin.bias.copy_(torch.from_numpy(b))
        opt = spec.torch(torch, model.parameters())

        Xt = torch.from_numpy(X)
        if loss == "cross_entropy":
            Yt = torch.from_numpy(_labels(Y).astype(np.int64))

            def cost(out, y):  # mean over the batch of -log softmax(z)_y
                return F.cross_entropy(out, y)
        else:
            Yt = torch.from_numpy(_targets(loss, Y, n, sizes[-1], dtype))
            if loss == "log_loss":
                def cost(out, y):  # sum over outputs, mean over the batch
                    return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]
            else:
                def cost(out, y):  # 1/2 sum_j (a_j - y_j)^2, mean over the batch
                    return 0.5 * F.mse_loss(out, y, reduction="sum") / out.shape[0]

        def step(xb, yb):
            opt.zero_grad(set_to_none=True)
            value = cost(model(xb), yb)
            value.backward()
            opt.step()
            return value

        state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
        for i in range(max(0, int(warmup_batches))):
            lo = (i * batch) % n
            step(Xt[lo:lo + batch], Yt[lo:lo + batch])
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])

        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(epochs):
            if shuffle:
                perm = torch.randperm(n, generator=gen)
                Xe, Ye = Xt[perm], Yt[perm]
            else:
                Xe, Ye = Xt, Yt
            total = torch.zeros((), dtype=torch.float64)
            for lo in range(0, n, batch):
                xb, yb = Xe[lo:lo + batch], Ye[lo:lo + batch]
                total.add_(step(xb, yb).detach(), alpha=xb.shape[0])  # the epoch's summed cost
        seconds = time.perf_counter() - t0
        result = {"samples_per_s": n * epochs / seconds, "seconds": seconds,
                  "final_loss": float(total) / n, "epochs": epochs, "n_samples": n,
                  "batch_size": batch, "threads": torch.get_num_threads(), "dtype": dtype,
                  "optimizer": spec.describe(), "torch": torch.__version__}
        if return_params:
            result["params"] = [(lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy())
                                for lin in linears]
        return result
    finally:
        torch.set_num_threads(previous_threads)


# ---------------------------------------------------------------------------- JAX
def _import_jax(threads):
    """jax, with XLA's CPU pool cut to one thread when asked, and small loops compiled whole.

    XLA reads its flags once, at import, so both apply only when jax is not imported yet.
    XLA has a switch for one thread only (``--xla_cpu_multi_thread_eigen=false``); and
    ``_JAX_SMALL_LOOPS`` raises the size under which XLA compiles a whole ``lax.scan`` as one
    kernel (the same arithmetic, bit for bit; see the comment there), unless ``XLA_FLAGS``
    already has ``--xla_backend_extra_options`` of its own. Returns ``(jax, note)``, the note
    saying which thread setting is in effect (:func:`_jax_loops_note` says the other).
    """
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        extra = []
        if threads is not None and int(threads) == 1 and _JAX_ONE_THREAD not in flags:
            extra.append(_JAX_ONE_THREAD)
        if "--xla_backend_extra_options" not in flags:
            extra.append(_JAX_SMALL_LOOPS)
        if extra:
            os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    jax = _import("jax", "jax")
    one = _JAX_ONE_THREAD in os.environ.get("XLA_FLAGS", "")
    if threads is None:
        note = "1 (XLA_FLAGS)" if one else "XLA's default pool (one thread per core)"
    elif int(threads) == 1:
        note = "1 (XLA_FLAGS)" if one else "not applied: jax was imported before threads=1 was asked"
    else:
        note = f"not applied: XLA has no setting for {threads} threads; its default pool" + (
            " is cut to 1 by XLA_FLAGS" if one else "")
    return jax, note


def _jax_loops_note() -> str:
    """Which limit XLA compiles a whole loop under, as ``XLA_FLAGS`` set it (read at jax's import)."""
    found = re.search(rf"{_JAX_SMALL_LOOP_OPTION}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if found:
        return f"loops whose body touches under {int(found.group(1))} bytes compiled as one kernel (XLA_FLAGS)"
    return ("XLA's default small-loop limit (XLA_FLAGS had its own --xla_backend_extra_options, or jax was "
            "imported before fastbp.bench.peers could set it)")


_JAX_FUNCTIONS: dict[tuple, dict] = {}  # jitted functions per model / optimizer / form, reused across calls
_JAX_COMPILE_S: dict[tuple, float] = {}  # compile seconds per (functions, data shapes) already run


def _jax_functions(jax, sizes, activation, loss, batch, shuffle, spec: OptimizerSpec, form: str, seed: int = 0):
    """The jitted functions of one model / optimizer / form (``seed`` is unused: the shuffles are drawn outside).

    Two things keep them lean, each measured on the 2-8-1 net at batch 1 (XOR data, 4000
    rows, SGD), where the step itself is ~160 ns and any overhead shows:

    * a layer is ``dot_general(a, W)`` contracting ``W``'s input axis, not ``a @ W.T``: inside
      the scan (and the jitted step) ``W`` changes every step, and ``.T`` made XLA write out
      its transpose every step -- for 784-128-10 at batch 1 a 400 kB copy a step (2.4x the
      time per example), and for the tiny net enough to push the loop over XLA's default
      small-loop limit (see ``_JAX_SMALL_LOOPS``), ~1000 ns a step instead of ~160;
    * the epoch's permutation comes in as an argument (drawn by NumPy on the host, as
      ``MLP.fit`` draws its own; ~50 us for 4000 rows, overlapping the previous epoch's
      asynchronous run) instead of ``jax.random.permutation`` inside: that is two rounds of
      XLA's CPU sort, ~3 ms for 4000 rows, ~700 ns per example on the tiny net.
    """
    key = (tuple(sizes), activation, loss, batch, shuffle, spec, form)
    if key in _JAX_FUNCTIONS:
        return key, _JAX_FUNCTIONS[key]
    jnp, lax = jax.numpy, jax.lax
    phi = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh, "identity": lambda z: z,
           "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.01)}[activation]
    opt_init, opt_update = spec.jax(jnp)
    n_layers = len(sizes) - 1

    def cost(params, xb, yb):
        a = xb
        for layer in range(n_layers):  # a @ W.T + b, with no transpose of W written out
            z = lax.dot_general(a, params[2 * layer], (((1,), (1,)), ((), ()))) + params[2 * layer + 1]
            a = phi(z) if layer < n_layers - 1 else z
        if loss == "cross_entropy":
            return -jnp.sum(yb * jax.nn.log_softmax(a, axis=-1)) / xb.shape[0]
        if loss == "log_loss":  # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z
            return jnp.sum(jax.nn.softplus(a) - yb * a) / xb.shape[0]
        return 0.5 * jnp.sum((a - yb) ** 2) / xb.shape[0]

    value_and_grad = jax.value_and_grad(cost)

    def grad_step(params, state, xb, yb):
        value, grads = value_and_grad(params, xb, yb)
        params, state = opt_update(params, grads, state)
        return params, state, value

    def shuffled(X, Y, perm):
        if perm is None:
            return X, Y
        # a permutation: in bounds and unique, so no clamping of the indices
        take = lambda A: A.at[perm].get(mode="promise_in_bounds", unique_indices=True)  # noqa: E731
        return take(X), take(Y)

    fns: dict = {"init": opt_init}
    if form == "scan":
        def epoch_fn(params, state, X, Y, perm):
            n = X.shape[0]
            n_full, rem = divmod(n, batch)
            Xe, Ye = shuffled(X, Y, perm)
            xs = Xe[:n_full * batch].reshape(n_full, batch, X.shape[1])
            ys = Ye[:n_full * batch].reshape(n_full, batch, Y.shape[1])

            def body(carry, xy):
                p, s, v = grad_step(carry[0], carry[1], xy[0], xy[1])
                return (p, s), v

            (params, state), values = lax.scan(body, (params, state), (xs, ys))
            total = jnp.sum(values) * batch
            if rem:  # the last, smaller batch, as MLP.fit takes it
                params, state, v = grad_step(params, state, Xe[n_full * batch:], Ye[n_full * batch:])
                total = total + v * rem
            return params, state, total

        fns["epoch"] = jax.jit(epoch_fn, donate_argnums=(0, 1))
    else:
        # Each step also adds its summed cost to the epoch's total, on the device: no extra dispatch;
        # and it counts its batches there too (a device scalar in and out dispatches ~15% faster
        # at batch 1 than a Python int converted every call).
        def step_fn(params, state, total, Xe, Ye, i):
            xb = lax.dynamic_slice_in_dim(Xe, i * batch, batch)
            yb = lax.dynamic_slice_in_dim(Ye, i * batch, batch)
            params, state, v = grad_step(params, state, xb, yb)
            return params, state, total + v * batch, i + 1

        def tail_fn(params, state, total, Xe, Ye):
            n_full = Xe.shape[0] // batch
            params, state, v = grad_step(params, state, Xe[n_full * batch:], Ye[n_full * batch:])
            return params, state, total + v * (Xe.shape[0] - n_full * batch)

        fns["shuffle"] = jax.jit(shuffled)
        fns["step"] = jax.jit(step_fn, donate_argnums=(0, 1, 2, 5))
        fns["tail"] = jax.jit(tail_fn, donate_argnums=(0, 1, 2))
    _JAX_FUNCTIONS[key] = fns
    return key, fns


def jax_throughput(sizes, activation, loss, X, Y, batch_size, lr, epochs, dtype="float32", threads=None, *,
                   seed=0, shuffle=True, optimizer="sgd", momentum=DEFAULT_MOMENTUM, form="scan",
                   params=None, return_params=False) -> dict:
    """Train an MLP with JAX (``jax.jit``, on its default device: the CPU here) and time it.

    ``form="jit"``: one jitted training step per batch (forward, gradient, update; the batch
    cut from the epoch's shuffled arrays on the device), called from a Python loop; each
    epoch's shuffle is one jitted gather. ``form="scan"``: the whole epoch one jitted call, the
    gather and a ``lax.scan`` over the batches (and one more step for a last, smaller batch).
    Each epoch's permutation is a fresh ``numpy.random.Generator.permutation`` (seeded by
    ``seed``), as ``MLP.fit`` shuffles; it is drawn while the previous epoch still runs.
    Parameters and optimizer state are donated to each call, so XLA updates them in place.

    The jitted functions are built once per model, optimizer and form and reused by later
    calls; the first run at a data shape compiles, and is timed apart: ``compile_s`` is that
    first call minus a steady one, never part of ``seconds``. Dispatch is asynchronous, so
    the timed region ends with ``block_until_ready`` on the results.

    Parameters are as :func:`torch_throughput`'s (``threads``: 1 cuts XLA's pool to one
    thread if jax is not imported yet; ``threads_note`` in the result says what applied),
    plus ``form``. A float64 run turns on ``jax_enable_x64`` for the process.

    Returns
    -------
    dict with ``samples_per_s``, ``seconds``, ``compile_s``, ``compiled_now`` (whether this
    call compiled), ``final_loss``, ``form``, ``epochs``, ``n_samples``, ``batch_size``,
    ``optimizer``, ``threads_note``, ``loops_note`` (whether XLA compiles the scan whole),
    ``device``, ``jax`` (version).
    """
    if form not in JAX_FORMS:
        raise ValueError(f"unknown form. Received: form={form!r}. Expected one of {list(JAX_FORMS)}")
    sizes, X, n, batch, epochs = _check_common(sizes, activation, loss, X, batch_size, epochs, dtype)
    spec = OptimizerSpec.make(optimizer, lr, momentum)
    init = init_params(sizes, seed, dtype) if params is None else _check_params(params, sizes, dtype)
    jax, threads_note = _import_jax(threads)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    key, fns = _jax_functions(jax, sizes, activation, loss, batch, bool(shuffle), spec, form, int(seed))
    Xd = jax.device_put(X)
    Yd = jax.device_put(_targets(loss, Y, n, sizes[-1], dtype))
    n_full, rem = divmod(n, batch)

    def fresh():
        flat = [jnp.asarray(a) for pair in init for a in pair]
        return flat, fns["init"](flat)

    def run(params, state, n_epochs, rng):
        """``n_epochs`` epochs; returns the new params, state and each epoch's summed cost (on the device)."""
        losses = []
        for _ in range(n_epochs):
            # drawn while the previous epoch's dispatched work still runs
            perm = rng.permutation(n).astype(np.int32) if shuffle else None
            if form == "scan":
                params, state, total = fns["epoch"](params, state, Xd, Yd, perm)
                losses.append(total)
            else:
                Xe, Ye = fns["shuffle"](Xd, Yd, perm)
                total, i = jnp.zeros((), X.dtype), jnp.zeros((), jnp.int32)
                for _ in range(n_full):
                    params, state, total, i = fns["step"](params, state, total, Xe, Ye, i)
                if rem:
                    params, state, total = fns["tail"](params, state, total, Xe, Ye)
                losses.append(total)
        return params, state, losses

    shapes = (key, X.shape, X.dtype.str)
    compiled_now = shapes not in _JAX_COMPILE_S
    if compiled_now:  # the first epoch compiles; a second one is the steady reference
        params_, state_ = fresh()
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        params_, state_, warm = run(params_, state_, 1, rng)
        jax.block_until_ready((params_, warm))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        params_, state_, warm = run(params_, state_, 1, rng)
        jax.block_until_ready((params_, warm))
        _JAX_COMPILE_S[shapes] = max(0.0, first - (time.perf_counter() - t0))
    params_, state_ = fresh()
    rng = np.random.default_rng(seed)
    jax.block_until_ready(params_)
    t0 = time.perf_counter()
    params_, state_, losses = run(params_, state_, epochs, rng)
    jax.block_until_ready((params_, losses))
    seconds = time.perf_counter() - t0
    result = {"samples_per_s": n * epochs / seconds, "seconds": seconds, "compile_s": _JAX_COMPILE_S[shapes],
              "compiled_now": compiled_now, "final_loss": float(losses[-1]) / n, "form": form, "epochs": epochs,
              "n_samples": n, "batch_size": batch, "dtype": dtype, "optimizer": spec.describe(),
              "threads_note": threads_note, "loops_note": _jax_loops_note(), "device": str(jax.devices()[0]),
              "jax": jax.__version__}
    if return_params:
        host = [np.asarray(a) for a in params_]
        result["params"] = [(host[2 * i], host[2 * i + 1]) for i in range(len(host) // 2)]
    return result


def jax_matmul_rate(n: int = 4096, dtype: str = "float32", repeat: int = 5, threads=None) -> dict:
    """XLA's own GEMM rate here: a jitted ``n x n @ n x n``, best of ``repeat`` (compile and warm-up first).

    XLA brings its own GEMM kernels (not the BLAS NumPy and fastbp use), so this is the
    ceiling JAX's figures are to be read against, beside NumPy's.
    """
    jax, threads_note = _import_jax(threads)
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.random((n, n), dtype=np.dtype(dtype).type)) for _ in range(2))
    gemm = jax.jit(lambda x, y: x @ y)
    gemm(a, b).block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        gemm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    gflops = [2.0 * n**3 / t / 1e9 for t in times]
    return {"how": f"jax.jit(x @ y), {n}x{n} @ {n}x{n} {dtype}, {jax.devices()[0]}", "n": n, "times_s": times,
            "gflops": gflops, "gflops_best": max(gflops), "gflops_median": float(np.median(gflops)),
            "threads_note": threads_note, "jax": jax.__version__}


# ---------------------------------------------------------------------------- scikit-learn
def sklearn_mlp_fit(sizes, activation, loss, X, Y, batch_size, lr, epochs, dtype="float32", threads=None, *,
                    seed=0, optimizer="sgd", momentum=DEFAULT_MOMENTUM, X_test=None, Y_test=None,
                    shuffle=True) -> dict:
    """Train scikit-learn's MLP (same architecture, loss, optimizer, lr) and time ``fit``.

    ``MLPClassifier`` for ``cross_entropy`` (softmax output; for two classes scikit-learn uses
    one logistic unit instead) and ``log_loss`` (independent sigmoid outputs); ``MLPRegressor``
    for ``mse`` with an identity output. scikit-learn's squared error is also averaged over
    the outputs, so for SGD its learning rate is ``lr * n_outputs`` to make the same updates
    (Adam's steps do not depend on the gradient's scale). Settings: ``alpha=0``,
    ``learning_rate="constant"``, ``solver`` and its parameters from the optimizer,
    ``max_iter=epochs`` with early stopping off (``tol=0``, ``n_iter_no_change > epochs``),
    so exactly ``epochs`` epochs run. scikit-learn's Adam adds ``eps`` to the bias-corrected
    ``sqrt(v)`` in a slightly different place than torch; the same rule otherwise.

    Parameters are as :func:`torch_throughput`'s (``activation`` has no leaky_relu in
    scikit-learn); ``threads`` caps BLAS/OpenMP threads through threadpoolctl for the fit.
    ``X_test``, ``Y_test`` (optional) give the accuracy (classifiers) or R^2 (regressor)
    reported; without them it is measured on the training data.

    Returns
    -------
    dict with ``seconds`` (``fit`` alone, untimed warm-up fit first), ``samples_per_s``,
    ``accuracy`` (or ``r2``), ``final_loss`` (scikit-learn's ``loss_``), ``epochs``,
    ``n_samples``, ``batch_size``, ``optimizer``, ``sklearn`` (version).
    """
    sizes, X, n, batch, epochs = _check_common(sizes, activation, loss, X, batch_size, epochs, dtype)
    if activation not in _SKLEARN_ACTIVATION:
        raise ValueError(f"scikit-learn's MLP has no {activation!r} activation. Received: "
                         f"activation={activation!r}. Expected one of {sorted(_SKLEARN_ACTIVATION)}")
    spec = OptimizerSpec.make(optimizer, lr, momentum)
    sklearn = _import("sklearn", "scikit-learn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    common = dict(hidden_layer_sizes=tuple(sizes[1:-1]), activation=_SKLEARN_ACTIVATION[activation],
                  alpha=0.0, learning_rate="constant", batch_size=batch, max_iter=epochs, shuffle=shuffle,
                  tol=0.0, n_iter_no_change=epochs + 1, early_stopping=False, random_state=seed,
                  **spec.sklearn())
    if loss == "mse":
        Yfit = np.asarray(Y, dtype=dtype).reshape(n, -1)
        k = Yfit.shape[1]
        Yfit = Yfit[:, 0] if k == 1 else Yfit
        scale = 1 if spec.name == "adam" else k
        make = lambda: MLPRegressor(learning_rate_init=spec.lr * scale, **common)  # noqa: E731
    elif loss == "cross_entropy":
        Yfit = _labels(Y)
        make = lambda: MLPClassifier(learning_rate_init=spec.lr, **common)  # noqa: E731
    else:  # log_loss: independent sigmoid outputs (a multilabel problem), or one binary label
        Yfit = np.asarray(Y).reshape(n, -1).astype(np.int64)
        Yfit = Yfit[:, 0] if Yfit.shape[1] == 1 else Yfit
        make = lambda: MLPClassifier(learning_rate_init=spec.lr, **common)  # noqa: E731

    from contextlib import nullcontext

    if threads is not None:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=int(threads))
    else:
        limits = nullcontext()
    with limits, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm = make().set_params(max_iter=1, n_iter_no_change=2)
        warm.fit(X[:min(n, 4 * batch)], Yfit[:min(n, 4 * batch)])
        model = make()
        t0 = time.perf_counter()
        model.fit(X, Yfit)
        seconds = time.perf_counter() - t0

    result = {"seconds": seconds, "samples_per_s": n * model.n_iter_ / seconds, "final_loss": float(model.loss_),
              "epochs": int(model.n_iter_), "n_samples": n, "batch_size": batch, "optimizer": spec.describe(),
              "sklearn": sklearn.__version__}
    Xe = X if X_test is None else np.ascontiguousarray(X_test, dtype=dtype)
    Ye = Y if Y_test is None else Y_test
    if loss == "mse":
        ye = np.asarray(Ye, dtype=dtype).reshape(len(Xe), -1)
        result["r2"] = float(model.score(Xe, ye[:, 0] if ye.shape[1] == 1 else ye))
    elif loss == "cross_entropy":
        result["accuracy"] = float(model.score(Xe, _labels(Ye)))
    else:
        ye = np.asarray(Ye).reshape(len(Xe), -1).astype(np.int64)
        result["accuracy"] = float(model.score(Xe, ye[:, 0] if ye.shape[1] == 1 else ye))
    return result
