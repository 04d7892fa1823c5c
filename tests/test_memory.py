"""Memory: what the backends and models keep between calls is bounded in bytes."""

import threading

import numpy as np
import pytest

import fastbp as fb
from conftest import make_data


@pytest.fixture
def numpy_backend(monkeypatch):
    """The registered NumPy backend with an empty scratch cache for this test (restored after)."""
    with fb.use_backend("numpy") as be:
        monkeypatch.setattr(be, "_local", threading.local())
        yield be


def _scratch(be):
    return be._local.__dict__.get("scratch", {})


def test_numpy_scratch_stays_within_its_byte_bound_over_many_input_sizes(numpy_backend, monkeypatch):
    """Every new batch size used to add its scratch for good (2167 entries, 177 MB after 429 sizes)."""
    be = numpy_backend
    monkeypatch.setattr(be, "SCRATCH_BYTES", 256 << 10)
    net = fb.MLP([20, 64, 3], activation="tanh", loss="cross_entropy", seed=0)
    rng = np.random.default_rng(0)
    for n in range(50, 450, 3):
        X, Y = rng.normal(size=(n, 20)), rng.integers(0, 3, n)
        net.loss(X, Y)
        net.gradients(X, Y)
        assert be.scratch_bytes() <= be.SCRATCH_BYTES
    kept = _scratch(be)
    assert be.scratch_bytes() == sum(b.nbytes for b in kept.values()) > 0


def test_numpy_scratch_larger_than_the_bound_is_not_kept(numpy_backend, monkeypatch):
    be = numpy_backend
    monkeypatch.setattr(be, "SCRATCH_BYTES", 64 << 10)
    z = np.random.default_rng(1).normal(size=(5000, 4))  # 160 kB per scratch buffer
    out = np.empty_like(z)
    be.activation("softmax", z, out)
    assert be.scratch_bytes() <= 64 << 10
    assert all(buf.nbytes <= 64 << 10 for buf in _scratch(be).values())


@pytest.mark.parametrize("loss,output", [("cross_entropy", "softmax"), ("log_loss", "sigmoid"), ("mse", "identity"),
                                         ("cross_entropy", "sigmoid"), ("log_loss", "tanh")])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_numpy_results_do_not_depend_on_what_the_scratch_keeps(numpy_backend, monkeypatch, loss, output,
                                                               activation):
    """Once the cache may drop a buffer, a kernel that fetched one twice and expected the same
    one back would read garbage. Here every fetch is a fresh NaN-filled array (what a dropped
    buffer can hold), and the numbers must not change."""
    be = numpy_backend
    X, Y = make_data(40, 5, 3, loss, seed=2)
    if output == "tanh":
        Y = np.clip(Y, 0.05, 0.95)
    net = fb.MLP([5, 6, 3], activation=activation, loss=loss, output=output, seed=3, dtype="float64")

    def run():
        return (net.loss(X, Y), net.gradients(X, Y), net.gradients(X, Y, strategy="loop"),
                net.predict(X))

    kept = run()
    monkeypatch.setattr(be, "_buf", lambda tag, shape, dtype: np.full(shape, np.nan if np.dtype(dtype).kind == "f"
                                                                      else True, dtype=dtype))
    fresh = run()
    assert fresh[0] == kept[0]
    for a, b in zip(sum(fresh[1] + fresh[2], []) + [fresh[3]], sum(kept[1] + kept[2], []) + [kept[3]]):
        np.testing.assert_array_equal(a, b)


def test_numpy_scratch_is_per_thread_and_goes_with_the_thread(numpy_backend):
    be = numpy_backend
    seen = {}

    def work():
        be.activation("softmax", np.ones((3, 4)), np.empty((3, 4)))
        seen["bytes"] = be.scratch_bytes()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["bytes"] > 0
    assert be.scratch_bytes() == 0  # this thread's cache is its own
