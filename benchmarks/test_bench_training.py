"""Training steps per backend and batch size, and one gradient by each strategy.

The model is the default of ``fastbp bench`` (784-128-10, sigmoid, MSE, float32)
on seeded synthetic data. A training benchmark times ``MLP.fit`` over one epoch
of ``steps`` mini-batches (``extra_info`` gives samples and steps, so samples/s =
samples / time), with plain SGD and with Adam (fastbp.bench.optimizer's specs, the
optimizer set by an untimed first fit and continued by the timed ones); batch 4096
is full-batch descent. Nothing asserts a speed.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp as fb
from fastbp.bench.optimizer import OptimizerSpec, default_lr, fit_kwargs

SIZES = [784, 128, 10]
DTYPE = "float32"
N_SAMPLES = 4096
BATCHES = [1, 16, 256, N_SAMPLES]
GRAD_BATCH = 256
ARCH = "-".join(map(str, SIZES))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.random((N_SAMPLES, SIZES[0])).astype(DTYPE)
    Y = np.zeros((N_SAMPLES, SIZES[-1]), dtype=DTYPE)
    Y[np.arange(N_SAMPLES), rng.integers(0, SIZES[-1], N_SAMPLES)] = 1
    return X, Y


def _model(kit, X, Y):
    kit.warm(DTYPE)
    with fb.use_backend(kit.be.name):
        net = fb.MLP(SIZES, activation="sigmoid", loss="mse", dtype=DTYPE, seed=0)
    return net, kit.be.asarray(X, DTYPE), kit.be.asarray(Y, DTYPE)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_training_epoch(benchmark, kit, data, batch, optimizer):
    net, X, Y = _model(kit, *data)
    full = batch >= N_SAMPLES
    n = N_SAMPLES if full else max(batch, 256)  # 256 per-example steps at batch 1; one step at full batch
    Xn, Yn = X[:n], Y[:n]
    spec = OptimizerSpec.make(optimizer, default_lr(optimizer, 0.05))
    size = None if full else batch
    net.fit(Xn[:batch], Yn[:batch], epochs=1, batch_size=size, progress=False,  # sets the optimizer, untimed
            **fit_kwargs(net, spec, first=True))
    benchmark.group = f"training, MLP {ARCH} {DTYPE}, batch {batch}{' (full)' if full else ''}"
    benchmark.extra_info.update(batch_size=batch, samples=n, steps=n // batch, full_batch=full,
                                optimizer=spec.describe())
    continued = fit_kwargs(net, spec, first=False)
    benchmark(kit.synced(lambda: net.fit(Xn, Yn, epochs=1, batch_size=size, shuffle=not full, progress=False,
                                         **continued)))


@pytest.mark.parametrize("strategy", ["vectorized", "loop"])
def test_gradient(benchmark, kit, data, strategy):
    net, X, Y = _model(kit, *data)
    Xb, Yb = X[:GRAD_BATCH], Y[:GRAD_BATCH]
    benchmark.group = f"one gradient, MLP {ARCH} {DTYPE}, batch {GRAD_BATCH}: loop vs vectorized"
    benchmark.extra_info.update(strategy=strategy, batch=GRAD_BATCH)
    benchmark(kit.synced(lambda: net.gradients(Xb, Yb, strategy=strategy)))
