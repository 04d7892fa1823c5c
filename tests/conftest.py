import os

import numpy as np
import pytest

import fastbp as fb

# Every backend usable here; FASTBP_TEST_BACKENDS=numpy,numba narrows the list.
BACKENDS = [b for b in os.environ.get("FASTBP_TEST_BACKENDS", "").split(",") if b] or fb.available_backends()
# float64 agreement between two implementations of the same math, float32 looser
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=1e-5)}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test with each backend usable on this machine active."""
    with fb.use_backend(request.param) as be:
        yield be


def make_data(n, n_in, n_out, loss, seed=0, labels=False):
    """Random inputs and targets valid for ``loss`` (float64)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    if loss == "cross_entropy":
        k = rng.integers(0, n_out, size=n)
        return X, (k if labels else np.eye(n_out)[k])
    if loss == "log_loss":
        return X, rng.integers(0, 2, size=(n, n_out)).astype(float)
    return X, rng.normal(size=(n, n_out))


def target_rows(loss, shape, dtype, seed=1):
    """Kernel-level targets of ``shape`` (n, k) valid for ``loss``: one-hot, 0/1 or normal."""
    rng = np.random.default_rng(seed)
    if loss == "cross_entropy":
        return np.eye(shape[1], dtype=dtype)[rng.integers(0, shape[1], shape[0])]
    if loss == "log_loss":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
