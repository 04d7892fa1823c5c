"""Out-of-core training (fastbp.data): streamed batches are exactly the permutation's rows, a fit
on a np.memmap (or any row-indexable array) equals the in-memory fit, bad values are rejected
before anything changes, and memory stays bounded by the chunk, not the data set."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastbp as fb
from fastbp import data as fbdata
from fastbp import training
from conftest import make_data


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of about a kilobyte, so a small data set spans many of them (and the prefetch runs)."""
    monkeypatch.setattr(fbdata, "DEFAULT_CHUNK_BYTES", 1024)


def _memmap(tmp_path, name, array):
    np.save(tmp_path / name, array)
    return np.load(tmp_path / name, mmap_mode="r")


class RowsOnly:
    """A minimal row-indexable array, like an h5py dataset: slices or increasing unique indices."""

    def __init__(self, array) -> None:
        self._a, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads = 0

    def __getitem__(self, index):
        if not isinstance(index, slice):
            index = np.asarray(index)
            assert index.ndim == 1 and np.all(np.diff(index) > 0), "reads must be increasing and unique"
        self.reads += 1
        return self._a[index].copy()


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 7, 64, 203])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_stream_serves_each_ranks_share_of_every_batch(size, batch, shuffled, prefetch):
    rng = np.random.default_rng(0)
    n, k = 203, 3
    X = rng.normal(size=(n, 5)).astype(np.float32)
    labels = rng.integers(0, k, n)
    order = rng.permutation(n) if shuffled else None
    be = fb.get_backend()
    seen = []  # per rank: (X rows, Y rows, global size) of each batch
    for rank in range(size):
        stream = fbdata.BatchStream(X, labels, n_outputs=k, loss="cross_entropy", dtype="float64", batch=batch,
                                    backend=be, share=(rank, size), chunk_bytes=600, prefetch=prefetch)
        batches = []
        for chunk in stream.epoch(order):
            assert chunk.X.dtype == np.float64
            batches += [(fb.to_numpy(chunk.X[a:b]).copy(), fb.to_numpy(chunk.Y[a:b]).copy(), g)
                        for (a, b), g in zip(chunk.bounds, chunk.sizes)]
        seen.append(batches)
    rows = np.arange(n) if order is None else order
    n_batches = -(-n // batch)
    assert all(len(b) == n_batches for b in seen)
    for j in range(n_batches):
        want = rows[j * batch:(j + 1) * batch]
        got_x = np.concatenate([seen[r][j][0] for r in range(size)])
        got_y = np.concatenate([seen[r][j][1] for r in range(size)])
        np.testing.assert_array_equal(got_x, X[want].astype(np.float64))
        np.testing.assert_array_equal(got_y, np.eye(k)[labels[want]])
        assert {seen[r][j][2] for r in range(size)} == {len(want)}
        shares = [len(seen[r][j][0]) for r in range(size)]
        assert max(shares) - min(shares) <= 1


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_on_a_memmap_equals_the_in_memory_fit(backend, tmp_path, small_chunks, optimizer, shuffle):
    X, y = make_data(97, 6, 4, "cross_entropy", seed=3, labels=True)
    Xm, ym = _memmap(tmp_path, "X.npy", X), _memmap(tmp_path, "y.npy", y.astype(np.int32))

    def fit(Xf, yf):
        opt = fb.optim.SGD(lr=0.05, momentum=0.9, nesterov=True) if optimizer == "sgd_momentum" else optimizer
        net = fb.MLP([6, 8, 4], activation="relu", loss="cross_entropy", dtype="float64", seed=2)
        history = net.fit(Xf, yf, epochs=3, batch_size=10, optimizer=opt, shuffle=shuffle, seed=4, progress=False)
        return net, history

    ref, ref_history = fit(X, y)
    net, history = fit(Xm, ym)
    np.testing.assert_allclose(fb.to_numpy(net._params), fb.to_numpy(ref._params), rtol=1e-10, atol=1e-12)
    for key in ref_history.history:
        np.testing.assert_allclose(history.history[key], ref_history.history[key], rtol=1e-10)


def test_fit_on_a_row_indexable_array_and_validation_split(tmp_path, small_chunks):
    X, Y = make_data(60, 3, 1, "log_loss", seed=5)
    rows = RowsOnly(X.astype(np.float32))
    nets = [fb.LogisticRegression(3, dtype="float64", seed=0) for _ in range(2)]
    kw = dict(epochs=2, batch_size=8, lr=0.5, seed=1, validation_split=0.25, progress=False)
    ref = nets[0].fit(X.astype(np.float32), Y[:, 0], **kw)
    got = nets[1].fit(rows, _memmap(tmp_path, "y.npy", Y[:, 0]), **kw)
    assert rows.reads > 4  # read chunk by chunk
    np.testing.assert_allclose(fb.to_numpy(nets[1]._params), fb.to_numpy(nets[0]._params), rtol=1e-10)
    np.testing.assert_allclose(got.history["val_loss"], ref.history["val_loss"], rtol=1e-10)


def test_numba_compiled_epochs_run_chunk_by_chunk(tmp_path, small_chunks, monkeypatch):
    if "numba" not in fb.available_backends():
        pytest.skip("numba backend unavailable")
    with fb.use_backend("numba") as be:
        X, y = make_data(80, 5, 3, "cross_entropy", seed=6, labels=True)
        net, ref = (fb.MLP([5, 4, 3], activation="tanh", loss="cross_entropy", dtype="float64", seed=1)
                    for _ in range(2))
        ref.fit(X, y, epochs=2, batch_size=1, lr=0.1, seed=0, progress=False)
        calls = []
        compiled = be.train_epoch
        monkeypatch.setattr(be, "train_epoch", lambda *a, **k: calls.append(a[4].shape[0]) or compiled(*a, **k))
        net.fit(_memmap(tmp_path, "X.npy", X), y, epochs=2, batch_size=1, lr=0.1, seed=0, progress=False)
        assert len(calls) > 2 and sum(calls) == 2 * len(X)  # one compiled call per chunk
        np.testing.assert_allclose(net._params, ref._params, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad,message", [
    ("nan", r"X contains NaN or Inf \(first at row 41\)"),
    ("labels", r"Y has class labels out of range. Received: labels in \[0, 7\]"),
    ("fractional", "Y as class labels must be whole numbers"),
    ("shape", r"X has the wrong shape. Received: memmap of shape \(50, 5\)"),
    ("rows", r"Y has the wrong shape"),
    ("too_big", "X does not fit the model's dtype"),
])
def test_streamed_bad_values_are_rejected_before_anything_changes(tmp_path, small_chunks, bad, message):
    X, y = make_data(50, 4, 3, "cross_entropy", seed=7, labels=True)
    y = y.astype(np.float64)
    if bad == "nan":
        X[41, 1] = np.inf
    elif bad == "labels":
        y[30] = 7
    elif bad == "fractional":
        y[12] = 1.5
    elif bad == "shape":
        X = np.hstack([X, X[:, :1]])
    elif bad == "rows":
        y = y[:-1]
    elif bad == "too_big":
        X[20, 0] = 1e300
    net = fb.MLP([4, 5, 3], loss="cross_entropy", dtype="float32", seed=0)
    before, state = fb.to_numpy(net._params).copy(), net.optimizer
    with pytest.raises(ValueError, match=message):
        net.fit(_memmap(tmp_path, "X.npy", X), _memmap(tmp_path, "y.npy", y), epochs=1, progress=False)
    np.testing.assert_array_equal(fb.to_numpy(net._params), before)
    assert net.optimizer is state


def test_is_streamed():
    assert not fbdata.is_streamed(np.zeros((2, 2)))
    assert not fbdata.is_streamed([[1.0, 2.0]])
    assert fbdata.is_streamed(RowsOnly(np.zeros((2, 2))))
    assert not fbdata.is_streamed(object())


def test_memory_stays_bounded_by_the_chunk_not_the_data_set(tmp_path):
    """A 32 MB float32 memmap trained in a float64 model: no whole copy, no whole cast, no whole
    shuffle buffer. tracemalloc sees every NumPy allocation (the mapped file's pages are not ours)."""
    if fb.get_backend().is_gpu:
        pytest.skip("host allocations are measured")
    n, d = 65536, 128
    X = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 8192):
        X[start:start + 8192] = rng.standard_normal((8192, d), dtype=np.float32)
    y = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.float32, shape=(n,))
    y[:] = rng.integers(0, 2, n)
    X.flush(), y.flush()
    del X, y
    Xm, ym = np.load(tmp_path / "X.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    net = fb.LogisticRegression(d, dtype="float64", seed=0)
    chunk = 1 << 20
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fbdata, "DEFAULT_CHUNK_BYTES", chunk)
            history = net.fit(Xm, ym, epochs=1, batch_size=256, lr=0.1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(history[0])
    as_float64 = n * (d + 1) * 8  # what copying the data set into the model dtype would take (68 MB)
    # two model-dtype chunks, one source-dtype chunk, the permutation (n int64) and small things
    assert peak < 4 * chunk + n * 8 + (2 << 20), f"peak {peak / 2**20:.1f} MiB"
    assert peak < as_float64 / 8
