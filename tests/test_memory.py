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


# ---------------------------------------------------------------- models: chunks and workspaces
def _kept_after(call):
    """Bytes still allocated (by NumPy, traced) after ``call()`` returns, less what it returned."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = call()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base - getattr(result, "nbytes", 0)
    finally:
        tracemalloc.stop()
    return kept, result


def test_predict_and_loss_on_many_rows_keep_little_memory(backend):
    """predict on 200000 x 20 (a 20-512-512-3 net) used to keep 1.6 GB of forward and backward
    buffers sized to the input; here 20-32-32-3 to stay fast, which kept 160 MB the same way."""
    net = fb.MLP([20, 32, 32, 3], activation="relu", loss="cross_entropy", seed=0)
    X = np.random.default_rng(0).normal(size=(200000, 20)).astype(np.float32)
    Y = np.zeros(200000, dtype=np.int64)
    kept, out = _kept_after(lambda: net.predict(X))
    assert out.shape == (200000, 3) and kept < 64 << 20, kept
    kept, _ = _kept_after(lambda: net.loss(X, Y))
    assert kept < 64 << 20, kept
    assert getattr(net._local, "backward", None) is None  # predict and loss keep no backward buffers


def test_chunked_predict_loss_and_gradients_equal_one_chunk(backend, monkeypatch):
    """Chunks change nothing but memory: tiny chunks give the numbers of one big one."""
    import fastbp.network as network

    X, Y = make_data(103, 7, 4, "cross_entropy", seed=4)
    args = dict(activation="tanh", loss="cross_entropy", seed=5, dtype="float64")
    whole = fb.MLP([7, 9, 4], **args)
    monkeypatch.setattr(network, "_FORWARD_BYTES", 7 * 8 * 10)  # a few rows per chunk
    monkeypatch.setattr(network, "_BACKWARD_BYTES", 7 * 8 * 10)
    small = fb.MLP([7, 9, 4], **args)
    assert small._rows[False] < 10 and small._rows[True] < 10 and whole._rows[False] > 103
    np.testing.assert_allclose(small.predict(X), whole.predict(X), rtol=1e-13, atol=1e-15)
    assert small.loss(X, Y) == pytest.approx(whole.loss(X, Y), rel=1e-13)
    for a, b in zip(sum(small.gradients(X, Y), []), sum(whole.gradients(X, Y), [])):
        np.testing.assert_allclose(fb.to_numpy(a), fb.to_numpy(b), rtol=1e-12, atol=1e-15)
    assert small._evaluate(*small._inputs_targets(X, Y)) == pytest.approx(whole._evaluate(*whole._inputs_targets(X, Y)))
    h1 = small.fit(X, Y, epochs=2, batch_size=None, progress=False, shuffle=False)  # full batch: chunked
    h2 = whole.fit(X, Y, epochs=2, batch_size=None, progress=False, shuffle=False)
    np.testing.assert_allclose(list(h1), list(h2), rtol=1e-12)


def test_workspaces_are_bounded_in_bytes_over_many_input_sizes(backend, monkeypatch):
    import fastbp.network as network

    monkeypatch.setattr(network, "_FORWARD_BYTES", 1 << 16)
    monkeypatch.setattr(network, "_BACKWARD_BYTES", 1 << 17)
    net = fb.MLP([10, 64, 5], activation="relu", seed=0)
    rng = np.random.default_rng(0)
    for n in range(1, 3000, 97):
        X, Y = rng.normal(size=(n, 10)), rng.normal(size=(n, 5))
        net.predict(X)
        net.gradients(X, Y)
        kept = sum(a.nbytes for kind in ("forward", "backward") for ws in [getattr(net._local, kind)]
                   for a in {id(x): x for x in ws.Z + ws.A + ws.D}.values())
        assert kept <= (1 << 16) + (1 << 17)


def test_workspaces_go_with_the_model_and_with_the_thread(backend):
    import gc
    import threading
    import weakref

    net = fb.MLP([5, 8, 2], seed=0)
    X = np.ones((30, 5))
    net.predict(X)
    buffer = weakref.ref(net._local.forward.Z[0])
    in_thread = {}

    def work():
        net.predict(X)
        in_thread["ref"] = weakref.ref(net._local.forward.Z[0])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    gc.collect()
    assert in_thread["ref"]() is None  # the thread's own workspace ended with it
    assert buffer() is not None
    del net
    gc.collect()
    assert buffer() is None  # and this thread's with the model
