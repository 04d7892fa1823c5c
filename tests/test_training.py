"""fit: per-example, mini-batch and full-batch gradient descent; allocation-free steps;
divergence handling; save/load; progress and logging."""

import logging
import tracemalloc

import numpy as np
import pytest

import fastbp as fb
from fastbp.kernels.base import OptimizerState, UpdateRule
from fastbp.training import _Trainer
from conftest import make_data
from reference import sgd_trajectory


def _params(net):
    W, b = net.get_params()
    return np.concatenate([p.ravel() for p in W + b])


@pytest.mark.parametrize("batch_size", [1, 4, None])
@pytest.mark.parametrize("loss,activation", [("mse", "tanh"), ("cross_entropy", "relu"), ("log_loss", "sigmoid")])
def test_fit_follows_the_reference_trajectory(backend, batch_size, loss, activation):
    X, Y = make_data(10, 3, 2, loss, seed=1)
    net = fb.MLP([3, 5, 2], activation=activation, loss=loss, dtype="float64", seed=0)
    W0, b0 = net.get_params()
    history = net.fit(X, Y, epochs=3, batch_size=batch_size, lr=0.3, seed=42, progress=False)

    rng, batches = np.random.default_rng(42), []
    step = batch_size or len(X)
    for _ in range(3):
        perm = rng.permutation(len(X))
        batches += [perm[i:i + step] for i in range(0, len(X), step)]
    W, b, costs = sgd_trajectory(W0, b0, activation, net.output, loss, X, Y, batches, lr=0.3)
    np.testing.assert_allclose(_params(net), np.concatenate([p.ravel() for p in W + b]), rtol=1e-9, atol=1e-12)
    per_epoch = len(batches) // 3
    sizes = np.array([len(i) for i in batches], dtype=float)
    expected = [np.dot(costs[e * per_epoch:(e + 1) * per_epoch], sizes[e * per_epoch:(e + 1) * per_epoch]) / len(X)
                for e in range(3)]
    np.testing.assert_allclose(list(history), expected, rtol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_loop_strategy_follows_the_vectorized_trajectory(backend, batch_size):
    X, Y = make_data(9, 4, 3, "cross_entropy", seed=2, labels=True)
    nets = [fb.MLP([4, 6, 3], activation="tanh", loss="cross_entropy", dtype="float64", seed=1) for _ in range(2)]
    hists = [net.fit(X, Y, epochs=4, batch_size=batch_size, lr=0.2, strategy=s, seed=7, progress=False)
             for net, s in zip(nets, ["vectorized", "loop"])]
    np.testing.assert_allclose(_params(nets[1]), _params(nets[0]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hists[1], hists[0], rtol=1e-10)


def test_full_batch_equals_batch_size_n_and_larger(backend):
    X, Y = make_data(12, 3, 1, "log_loss", seed=3)
    results = []
    for bs in (None, 12, 100):
        net = fb.LogisticRegression(3, dtype="float64", seed=0)
        results.append((list(net.fit(X, Y, epochs=5, batch_size=bs, lr=0.5, progress=False)), _params(net)))
    for hist, params in results[1:]:
        np.testing.assert_allclose(hist, results[0][0], rtol=1e-12)
        np.testing.assert_allclose(params, results[0][1], rtol=1e-12)


def test_training_reduces_loss_and_reports_validation(backend):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR-like quadrants: needs the hidden layer
    net = fb.MLP([2, 16, 2], activation="tanh", loss="cross_entropy", seed=0)
    hist = net.fit(X[:150], y[:150], epochs=60, batch_size=16, lr=0.5, validation_data=(X[150:], y[150:]),
                   progress=False)
    assert hist[-1] < 0.5 * hist[0]
    assert len(hist.history["val_loss"]) == 60 and hist.history["val_accuracy"][-1] > 0.85
    assert hist.history["loss"] == list(hist)


def test_shuffle_false_is_deterministic_order(backend):
    X, Y = make_data(6, 2, 1, "mse", seed=4)
    a, b = (fb.MLP([2, 3, 1], dtype="float64", seed=0) for _ in range(2))
    a.fit(X, Y, epochs=2, batch_size=2, shuffle=False, seed=1, progress=False)
    b.fit(X, Y, epochs=2, batch_size=2, shuffle=False, seed=2, progress=False)
    np.testing.assert_array_equal(_params(a), _params(b))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steady_state_steps_allocate_no_arrays(dtype, optimizer):
    """After warm-up, 100 mini-batch steps on the NumPy backend allocate no new arrays.

    tracemalloc also sees NumPy's fixed-size iterator buffers (8192 elements, made by
    broadcasting ufuncs such as the bias add); every array a step could allocate holds at
    least batch x 128 elements, so the peak must stay under half of the smallest one.
    """
    with fb.use_backend("numpy"):
        net = fb.MLP([32, 256, 128], activation="relu", loss="cross_entropy", dtype=dtype, seed=0)
        batch = 512
        X, y = make_data(100 * batch, 32, 128, "cross_entropy", labels=True)
        Xd, Yd = net._inputs_targets(X, y)
        opt = fb.optim.OPTIMIZERS[optimizer](lr=0.01)
        net.optimizer = opt
        opt._bind(net)
        trainer = _Trainer(net, opt, Xd, Yd, None, 1, batch, False, "vectorized", False, None, None, [])
        trainer.X, trainer.Y, trainer.n = Xd[:2 * batch], Yd[:2 * batch], 2 * batch
        trainer._epoch(None, opt.rule())  # warm-up
        trainer.X, trainer.Y, trainer.n = Xd, Yd, len(X)
        smallest_array = batch * 128 * np.dtype(dtype).itemsize
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            _, n_done, _ = trainer._epoch(None, opt.rule())
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n_done == len(X)
        assert peak - before < smallest_array // 2, f"{peak - before} bytes allocated during 100 steps"
        assert after - before < 4096  # and nothing kept


def test_divergence_stops_and_keeps_last_finite_parameters(backend):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(64, 4)) * 1e3, rng.normal(size=(64, 1)) * 1e3
    net = fb.MLP([4, 8, 1], activation="relu", loss="mse", seed=0)
    with pytest.raises(fb.TrainingDivergedError, match="NaN or Inf") as info:
        net.fit(X, Y, epochs=50, batch_size=8, lr=10.0, progress=False)
    assert np.isfinite(_params(net)).all()
    assert isinstance(info.value, FloatingPointError)
    assert all(np.isfinite(h) for h in info.value.history)


def test_save_load_round_trip_is_exact_across_backends(backend, tmp_path):
    net = fb.MLP([3, 4, 2], activation="leaky_relu", loss="cross_entropy", output="softmax", dtype="float64", seed=3)
    net.fit(*make_data(20, 3, 2, "cross_entropy", labels=True), epochs=2, progress=False)
    path = tmp_path / "model.npz"
    net.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary left behind
    for name in fb.available_backends():
        with fb.use_backend(name):
            loaded = fb.MLP.load(path)
        assert loaded.backend.name == name
        assert (loaded.sizes, loaded.activation, loaded.output, loaded.loss_name, loaded.dtype) == \
               (net.sizes, net.activation, net.output, net.loss_name, net.dtype)
        np.testing.assert_array_equal(_params(loaded), _params(net))


def test_logistic_regression_round_trip(tmp_path):
    lr = fb.LogisticRegression(5, seed=1)
    lr.save(tmp_path / "lr.npz")
    loaded = fb.LogisticRegression.load(tmp_path / "lr.npz")
    assert isinstance(loaded, fb.LogisticRegression) and loaded.dtype == np.float32
    np.testing.assert_array_equal(_params(loaded), _params(lr))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fastbp model"):
        fb.MLP.load(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="not a readable fastbp model"):
        fb.MLP.load(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastbp model: missing"):
        fb.MLP.load(foreign)
    net = fb.MLP([2, 2], seed=0)
    net.save(tmp_path / "ok.npz")
    data = dict(np.load(tmp_path / "ok.npz"))
    data["params"] = data["params"][:-1]
    np.savez(tmp_path / "truncated.npz", **data)
    with pytest.raises(ValueError, match="corrupt"):
        fb.MLP.load(tmp_path / "truncated.npz")


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    fb.MLP([2, 2], seed=0).save(path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        fb.MLP([2, 2], seed=1).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_progress_bar_and_logging(capsys, caplog):
    X, Y = make_data(32, 2, 1, "mse")
    net = fb.MLP([2, 4, 1], seed=0)
    with caplog.at_level(logging.INFO, logger="fastbp"):
        net.fit(X, Y, epochs=2, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "fastbp fit" in err and "loss=" in err and "samples_s=" in err and "2/2" in err
    assert f"backend={net.backend.name}" in caplog.text and "dtype=float32" in caplog.text
    net.fit(X, Y, epochs=2, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""


def test_pickle_round_trip_lands_on_the_active_backend(backend):
    import pickle

    net = fb.MLP([3, 4, 2], activation="tanh", loss="cross_entropy", dtype="float64", seed=2)
    X, y = make_data(10, 3, 2, "cross_entropy", labels=True)
    net.fit(X, y, epochs=1, progress=False)
    with fb.use_backend("numpy"):
        clone = pickle.loads(pickle.dumps(net))
    assert clone.backend.name == "numpy" and type(clone) is fb.MLP
    np.testing.assert_array_equal(_params(clone), _params(net))
    # the shuffle stream travels too: both continue identically
    h1 = net.fit(X, y, epochs=2, progress=False)
    with fb.use_backend(backend.name):
        clone = pickle.loads(pickle.dumps(clone))
        h2 = clone.fit(X, y, epochs=2, progress=False)
    np.testing.assert_allclose(h2, h1, rtol=1e-10)


def test_models_training_in_two_threads_match_sequential_runs(backend):
    """Backends keep no shared mutable scratch between models: threads cannot corrupt each other."""
    import threading

    X, y = make_data(2048, 256, 10, "cross_entropy", seed=5, labels=True)

    def train(out, i):
        net = fb.MLP([256, 256, 10], activation="tanh", loss="cross_entropy", dtype="float64", seed=i)
        net.fit(X, y, epochs=10, batch_size=256, lr=0.1, seed=i, progress=False)
        out[i] = _params(net)

    sequential, threaded = {}, {}
    for i in range(2):
        train(sequential, i)
    threads = [threading.Thread(target=train, args=(threaded, i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        np.testing.assert_allclose(threaded[i], sequential[i], rtol=1e-9, atol=1e-12)


def test_fit_threads_limits_blas_for_the_fit_and_restores_it(backend):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    seen = []
    X, Y = make_data(16, 3, 1, "mse")
    net = fb.MLP([3, 4, 1], seed=0)
    net.fit(X, Y, epochs=2, batch_size=4, threads=1, callbacks=[lambda e, logs: seen.append(blas_threads())])
    assert seen and all(t == 1 for threads in seen for t in threads)
    assert blas_threads() == before
    with pytest.raises(ValueError, match="threads out of range"):
        net.fit(X, Y, threads=0)


def test_backend_prints_its_name(backend):
    assert repr(fb.MLP([2, 1]).backend) == f"<fastbp {backend.name} backend>"


def test_leaky_relu_in_place_equals_out_of_place(backend):
    z = backend.asarray(np.linspace(-2, 2, 12).reshape(3, 4), np.float64)
    out = backend.empty(z.shape, np.float64)
    backend.activation("leaky_relu", z, out)
    backend.activation("leaky_relu", z, z)  # out is z: the scaled copy must not clobber z first
    np.testing.assert_array_equal(fb.to_numpy(z), fb.to_numpy(out))
    np.testing.assert_allclose(fb.to_numpy(out), np.where(np.linspace(-2, 2, 12) > 0, 1, 0.01).reshape(3, 4)
                               * np.linspace(-2, 2, 12).reshape(3, 4), rtol=1e-15)


def _per_example_fit(net, X, Y, seed, **kwargs):
    return net.fit(X, Y, epochs=4, batch_size=1, lr=0.05, seed=seed, progress=False, **kwargs)


def _same_with_and_without_kernel_draws(monkeypatch, fit, state_of=lambda rng: rng.bit_generator.state):
    """``fit(be)`` (returns the fitted net) with the backend drawing the next orders in its
    kernel and with NumPy drawing them: the same parameters and generator state."""
    pytest.importorskip("numba")
    runs = []
    with fb.use_backend("numba") as be:
        for drawing in (True, False):
            monkeypatch.setattr(type(be), "draws_next_order", lambda self, *a, drawing=drawing: drawing)
            net = fit(be)
            runs.append((_params(net), state_of(net._rng)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


@pytest.mark.parametrize("diverge", [False, True])
def test_the_next_shuffle_drawn_by_the_kernel_keeps_the_stream_and_the_result(monkeypatch, diverge):
    """Where the backend's epoch draws the next order (a small net per example on Numba), fit
    trains on the orders NumPy's permutation would draw and leaves the generator where drawing
    them in turn leaves it, also when an epoch diverges."""
    X, Y = make_data(200, 2, 1, "mse", seed=3)
    if diverge:
        X = X * 1e3

    def fit(be):
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        net._rng.integers(0, 10, dtype=np.uint32)  # a buffered half-draw in the state
        if diverge:
            with pytest.raises(fb.TrainingDivergedError):
                net.fit(X, Y, epochs=4, batch_size=1, lr=5.0, progress=False, seed=None)
        else:
            _per_example_fit(net, X, Y, seed=None)
        return net

    _same_with_and_without_kernel_draws(monkeypatch, fit)


def test_a_kernel_draw_not_used_is_undone_when_an_epoch_raises(monkeypatch):
    pytest.importorskip("numba")
    X, Y = make_data(50, 2, 1, "mse", seed=4)
    calls = []
    real = _Trainer._epoch

    def failing(self, order, rule, next_order=None):
        out = real(self, order, rule, next_order)
        calls.append(next_order is not None)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the kernel drew the third epoch's order
        return out

    with fb.use_backend("numba") as be:
        assert be.draws_next_order(fb.MLP([2, 6, 1], dtype="float64").spec, 1, "vectorized")
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        expected = np.random.default_rng(0)
        net._rng = np.random.default_rng(0)
        monkeypatch.setattr(_Trainer, "_epoch", failing)
        with pytest.raises(KeyboardInterrupt):
            net.fit(X, Y, epochs=5, batch_size=1, lr=0.05, progress=False)
    assert calls == [True, True]
    expected.permutation(50), expected.permutation(50)  # the two epochs begun; the third's draw undone
    assert net._rng.bit_generator.state == expected.bit_generator.state


def test_a_kernel_draw_is_undone_when_fit_raises_between_epochs():
    """The kernel of epoch 2 drew epoch 3's order; a schedule that raises after epoch 2 ends the
    fit before epoch 3 uses it: the generator is where two draws in turn leave it."""
    pytest.importorskip("numba")

    class Failing(fb.optim.Schedule):
        def next_lr(self, epoch, logs):
            if epoch == 1:
                raise RuntimeError("schedule failed")
            return self.base_lr

    X, Y = make_data(50, 2, 1, "mse", seed=8)
    with fb.use_backend("numba") as be:
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        assert be.draws_next_order(net.spec, 1, "vectorized")
        net._rng = np.random.default_rng(3)
        with pytest.raises(RuntimeError, match="schedule failed"):
            net.fit(X, Y, epochs=5, batch_size=1, lr=0.05, progress=False, schedule=Failing())
    expected = np.random.default_rng(3)
    expected.permutation(50), expected.permutation(50)
    assert net._rng.bit_generator.state == expected.bit_generator.state


def test_a_later_epoch_s_divergence_rolls_the_kernel_s_draws_back(monkeypatch):
    """Divergence in epoch 3 (a schedule raises the rate after epoch 2): the same parameters
    and generator state whether the kernel or NumPy drew the orders."""

    class Jump(fb.optim.Schedule):
        def next_lr(self, epoch, logs):
            return self.base_lr if epoch == 0 else 1e6

    X, Y = make_data(60, 2, 1, "mse", seed=9)

    def fit(be):
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        with pytest.raises(fb.TrainingDivergedError) as err:
            net.fit(X * 100, Y, epochs=5, batch_size=1, lr=0.01, progress=False, schedule=Jump())
        assert "epoch 1" not in str(err.value) and "epoch 2" not in str(err.value)
        return net

    _same_with_and_without_kernel_draws(monkeypatch, fit)


def test_fit_draws_with_numpy_for_a_generator_that_is_not_pcg64(monkeypatch):
    X, Y = make_data(80, 2, 1, "mse", seed=5)

    def fit(be):
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        net._rng = np.random.Generator(np.random.MT19937(11))
        _per_example_fit(net, X, Y, seed=None)
        return net

    _same_with_and_without_kernel_draws(monkeypatch, fit, state_of=lambda rng: rng.bit_generator.state["state"]["pos"])


def test_fit_draws_the_next_order_itself_where_the_epoch_is_not_compiled(monkeypatch):
    """A backend that draws, but runs this rule's epoch batch by batch: fit draws the order
    the kernel would have (numba_random.permutation_into), with the same result."""
    X, Y = make_data(70, 2, 1, "mse", seed=10)

    def fit(be):
        monkeypatch.setattr(type(be), "supports_epoch", lambda self, *a: False)
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        _per_example_fit(net, X, Y, seed=2)
        return net

    _same_with_and_without_kernel_draws(monkeypatch, fit)


def test_fit_passes_no_next_order_to_a_backend_that_draws_none(monkeypatch):
    """``next_order=`` reaches ``train_epoch`` only where ``draws_next_order`` holds: a Backend
    written before that keyword (its train_epoch without it) still trains."""
    pytest.importorskip("numba")
    X, Y = make_data(60, 2, 1, "mse", seed=6)
    seen = []
    with fb.use_backend("numba") as be:
        real = type(be).train_epoch

        def old_signature(self, spec, params, grads, X, Y, batch_size, rule, state, strategy, order=None):
            seen.append(order is not None)
            return real(self, spec, params, grads, X, Y, batch_size, rule, state, strategy, order=order)

        monkeypatch.setattr(type(be), "train_epoch", old_signature)
        monkeypatch.setattr(type(be), "draws_next_order", lambda self, *a: False)
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        _per_example_fit(net, X, Y, seed=1)
    assert seen == [True] * 4


def test_train_epoch_refuses_a_next_order_it_cannot_draw():
    pytest.importorskip("numba")
    with fb.use_backend("numba") as be:
        net = fb.MLP([2, 6, 1], activation="tanh", loss="mse", dtype="float64", seed=0)
        X, Y = make_data(10, 2, 1, "mse", seed=7)
        upd = UpdateRule("sgd", lr=0.01)
        state = OptimizerState(np.zeros((upd.n_buffers, net.spec.n_params)))
        before = net._params.copy()
        good = (np.empty(10, np.int64), np.zeros(5, np.uint64), np.zeros(5, np.uint64))
        for bad, batch in (((np.empty(9, np.int64),) + good[1:], 1), (good[:2] + (good[1],), 1),
                           ((good[0].astype(np.int32),) + good[1:], 1), (good, 4), (list(good), 1)):
            with pytest.raises(ValueError, match="next_order"):
                be.train_epoch(net.spec, net._params, net._grads, X, Y, batch, upd, state, "vectorized",
                               next_order=bad)
        np.testing.assert_array_equal(net._params, before)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_small_kernel_stops_before_an_update_whose_mse_overflows(dtype):
    """The small per-example kernel checks the logits and deltas, and for mse the cost too:
    finite outputs and targets whose squared error overflows stop the epoch at that example,
    parameters still finite (as the generic per-example epoch does)."""
    pytest.importorskip("numba")
    big = np.finfo(dtype).max
    X = np.array([[0.1, 0.2], [0.3, -0.1], [0.2, 0.2]], dtype)
    Y = np.array([[0.5], [big / 2 if dtype == "float64" else big], [0.1]], dtype)
    with fb.use_backend("numba") as be:
        net = fb.MLP([2, 3, 1], activation="tanh", loss="mse", dtype=dtype, seed=0)
        if dtype == "float64":  # the float64 square overflows with a finite delta
            Y[1, 0] = 1e200
        else:  # float32: the delta itself overflows
            net._params[-1] = -big / 2
            Y[1, 0] = big / 1.5
        upd = UpdateRule("sgd", lr=0.01)
        state = OptimizerState(np.zeros((upd.n_buffers, net.spec.n_params), dtype))
        before = net._params.copy()
        total, done, _ = be.train_epoch(net.spec, net._params, net._grads, X, Y, 1, upd, state, "vectorized")
    assert done == 1 and np.isfinite(total)
    assert np.all(np.isfinite(net._params)) and not np.array_equal(net._params, before)
