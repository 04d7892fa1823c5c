"""The same training on peer libraries, for benchmarks: PyTorch (eager) and scikit-learn.

Each function trains the model fastbp trains -- dense layers ``sizes``, the hidden
activation ``activation``, the loss's natural output, plain SGD (no momentum, no weight
decay, constant learning rate) on the mean cost of each mini-batch -- on the data given,
and reports how long it took. Both shuffle the examples every epoch, as ``MLP.fit`` does.

* :func:`torch_sgd_throughput` -- ``nn.Sequential`` of ``nn.Linear`` + activation modules,
  ``torch.optim.SGD(lr, momentum=0)``, the loss from the logits (``cross_entropy``:
  ``F.cross_entropy``; ``log_loss``: BCE-with-logits summed over outputs; ``mse``:
  ``1/2 sum_j (a_j - y_j)^2``), each the mean over the batch, exactly fastbp's costs.
* :func:`sklearn_mlp_fit` -- ``MLPClassifier`` (``cross_entropy``, ``log_loss``) or
  ``MLPRegressor`` (``mse``) with ``solver="sgd"``, ``momentum=0``, ``alpha=0``.

torch and scikit-learn are imported inside the functions, never by ``import fastbp``;
a missing one raises ImportError naming the pip command. Both functions accept the
keyword arguments ``fastbp bench --peers`` passes (sizes, activation, loss, X, Y,
batch_size, lr, epochs, dtype, seed, threads) and return a dict with ``samples_per_s``
and ``seconds``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

_DEFAULT_OUTPUT = {"mse": "identity", "log_loss": "sigmoid", "cross_entropy": "softmax"}
_SKLEARN_ACTIVATION = {"sigmoid": "logistic", "relu": "relu", "tanh": "tanh", "identity": "identity"}


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


def _check_common(sizes, loss, X, batch_size, epochs):
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least two entries. Received: sizes={sizes!r}")
    if loss not in _DEFAULT_OUTPUT:
        raise ValueError(f"unknown loss. Received: loss={loss!r}. Expected one of {sorted(_DEFAULT_OUTPUT)}")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != sizes[0]:
        raise ValueError(f"X must have shape (n_samples, {sizes[0]}). Received: shape {X.shape}")
    n = X.shape[0]
    batch = n if batch_size is None else max(1, min(int(batch_size), n))
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1. Received: epochs={epochs!r}")
    return sizes, X, n, batch, int(epochs)


def torch_sgd_throughput(sizes, activation, loss, X, Y, batch_size, lr, epochs, dtype="float32",
                         threads=None, *, seed=0, shuffle=True, warmup_batches=10) -> dict:
    """Train an MLP with PyTorch eager on the CPU, plain SGD, and time it.

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
    lr : float, the SGD learning rate.
    epochs : int, timed epochs over ``X``.
    dtype : "float32" or "float64".
    threads : int or None, ``torch.set_num_threads`` for the run (restored after);
        None keeps torch's default (one per core).
    seed : int, seeds the initialisation and the shuffles.
    shuffle : bool, a fresh permutation of the examples every epoch (as ``MLP.fit``).
    warmup_batches : int, untimed steps first (torch's lazy initialisation), after which
        the model and optimizer are reset to their initial state.

    Returns
    -------
    dict with ``samples_per_s``, ``seconds`` (the timed epochs), ``final_loss`` (the mean
    pre-update cost of the last epoch, as ``MLP.fit``'s history), ``epochs``,
    ``n_samples``, ``batch_size``, ``threads``, ``torch`` (version).
    """
    torch = _import("torch", "torch")
    sizes, X, n, batch, epochs = _check_common(sizes, loss, X, batch_size, epochs)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64'. Received: dtype={dtype!r}")
    act = {"sigmoid": torch.nn.Sigmoid, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh,
           "identity": torch.nn.Identity, "leaky_relu": lambda: torch.nn.LeakyReLU(0.01)}
    if activation not in act:
        raise ValueError(f"unknown activation. Received: activation={activation!r}. Expected one of {sorted(act)}")
    F = torch.nn.functional

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        tdtype = torch.float32 if dtype == "float32" else torch.float64
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(fan_in, fan_out, dtype=tdtype))
            if i < len(sizes) - 2:
                layers.append(act[activation]())
        model = torch.nn.Sequential(*layers)
        opt = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.0, weight_decay=0.0)

        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=dtype))
        if loss == "cross_entropy":
            Yt = torch.from_numpy(_labels(Y).astype(np.int64))

            def cost(out, y):  # mean over the batch of -log softmax(z)_y
                return F.cross_entropy(out, y)
        else:
            Ynp = np.asarray(Y, dtype=dtype)
            Yt = torch.from_numpy(np.ascontiguousarray(Ynp.reshape(n, -1)))
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
        return {"samples_per_s": n * epochs / seconds, "seconds": seconds,
                "final_loss": float(total) / n, "epochs": epochs, "n_samples": n,
                "batch_size": batch, "threads": torch.get_num_threads(), "dtype": dtype,
                "torch": torch.__version__}
    finally:
        torch.set_num_threads(previous_threads)


def sklearn_mlp_fit(sizes, activation, loss, X, Y, batch_size, lr, epochs, dtype="float32", threads=None, *,
                    seed=0, X_test=None, Y_test=None, shuffle=True) -> dict:
    """Train scikit-learn's MLP with plain SGD (same architecture, loss, lr) and time ``fit``.

    ``MLPClassifier`` for ``cross_entropy`` (softmax output; for two classes scikit-learn uses
    one logistic unit instead) and ``log_loss`` (independent sigmoid outputs); ``MLPRegressor``
    for ``mse`` with an identity output. scikit-learn's squared error is also averaged over
    the outputs, so its learning rate is ``lr * n_outputs`` to make the same updates.
    Settings: ``solver="sgd"``, ``momentum=0``, ``nesterovs_momentum=False``, ``alpha=0``,
    ``learning_rate="constant"``, ``max_iter=epochs`` with early stopping off (``tol=0``,
    ``n_iter_no_change > epochs``), so exactly ``epochs`` epochs run.

    Parameters are as :func:`torch_sgd_throughput`'s (``activation`` has no leaky_relu in
    scikit-learn); ``threads`` caps BLAS/OpenMP threads through threadpoolctl for the fit.
    ``X_test``, ``Y_test`` (optional) give the accuracy (classifiers) or R^2 (regressor)
    reported; without them it is measured on the training data.

    Returns
    -------
    dict with ``seconds`` (``fit`` alone, untimed warm-up fit first), ``samples_per_s``,
    ``accuracy`` (or ``r2``), ``final_loss`` (scikit-learn's ``loss_``), ``epochs``,
    ``n_samples``, ``batch_size``, ``sklearn`` (version).
    """
    sklearn = _import("sklearn", "scikit-learn")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    sizes, X, n, batch, epochs = _check_common(sizes, loss, X, batch_size, epochs)
    if activation not in _SKLEARN_ACTIVATION:
        raise ValueError(f"scikit-learn's MLP has no {activation!r} activation. "
                         f"Expected one of {sorted(_SKLEARN_ACTIVATION)}")
    X = np.ascontiguousarray(X, dtype=dtype)
    common = dict(hidden_layer_sizes=tuple(sizes[1:-1]), activation=_SKLEARN_ACTIVATION[activation],
                  solver="sgd", momentum=0.0, nesterovs_momentum=False, alpha=0.0,
                  learning_rate="constant", batch_size=batch, max_iter=epochs, shuffle=shuffle,
                  tol=0.0, n_iter_no_change=epochs + 1, early_stopping=False, random_state=seed)
    if loss == "mse":
        Yfit = np.asarray(Y, dtype=dtype).reshape(n, -1)
        k = Yfit.shape[1]
        Yfit = Yfit[:, 0] if k == 1 else Yfit
        make = lambda: MLPRegressor(learning_rate_init=float(lr) * k, **common)  # noqa: E731
    elif loss == "cross_entropy":
        Yfit = _labels(Y)
        make = lambda: MLPClassifier(learning_rate_init=float(lr), **common)  # noqa: E731
    else:  # log_loss: independent sigmoid outputs (a multilabel problem), or one binary label
        Yfit = np.asarray(Y).reshape(n, -1).astype(np.int64)
        Yfit = Yfit[:, 0] if Yfit.shape[1] == 1 else Yfit
        make = lambda: MLPClassifier(learning_rate_init=float(lr), **common)  # noqa: E731

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
              "epochs": int(model.n_iter_), "n_samples": n, "batch_size": batch, "sklearn": sklearn.__version__}
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
