"""Threads: backend selection that stays in its thread, and models used from several threads."""

import io
import threading

import numpy as np
import pytest

import fastbp as fb
from conftest import BACKENDS, make_data


def _other_than_default():
    default = fb.get_backend().name
    others = [name for name in fb.available_backends() if name != default]
    if not others:
        pytest.skip("needs a usable backend besides the default")
    return default, others[0]


def test_gradcheck_does_not_switch_the_backend_of_other_threads(monkeypatch):
    """gradcheck builds its float64 copy under ``use_backend(net's backend)``; a thread looking
    at that very moment still sees its own backend."""
    default, other = _other_than_default()
    with fb.use_backend(other) as be:
        net = fb.MLP([3, 4, 2], loss="cross_entropy", seed=0)
    X, Y = make_data(6, 3, 2, "cross_entropy")
    inside, looked = threading.Event(), threading.Event()
    checker = {}
    real_asarray = be.asarray

    def pausing_asarray(*args, **kwargs):  # gradcheck's first backend call is inside its scope
        if threading.current_thread().name == "gradcheck" and not inside.is_set():
            inside.set()
            looked.wait(timeout=30)
        return real_asarray(*args, **kwargs)

    monkeypatch.setattr(be, "asarray", pausing_asarray)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("err", fb.gradcheck(net, X, Y)), name="gradcheck")
    worker.start()
    assert inside.wait(timeout=30), "gradcheck never reached the backend"
    checker["seen"] = (fb.get_backend().name, fb.MLP([2, 2]).backend.name)
    looked.set()
    worker.join(timeout=60)
    assert checker["seen"] == (default, default)
    assert result["err"] < 1e-6  # and gradcheck itself still checked net's backend


def test_gradcheck_in_a_scope_of_another_backend():
    """Called inside ``use_backend(b)`` for a model of another backend: checks the model's
    backend, and leaves the caller's scope as it was."""
    default, other = _other_than_default()
    net = fb.MLP([3, 4, 2], loss="cross_entropy", seed=0)  # on the default
    X, Y = make_data(6, 3, 2, "cross_entropy")
    with fb.use_backend(other):
        assert fb.gradcheck(net, X, Y) < 1e-6
        assert fb.get_backend().name == other
    assert fb.get_backend().name == default


@pytest.mark.parametrize("name", BACKENDS)
def test_threads_in_their_own_scopes_build_models_on_their_own_backend(name):
    """Many threads, half inside ``use_backend(name)``: each model lands on its thread's backend."""
    default = fb.get_backend().name
    barrier = threading.Barrier(6, timeout=30)
    wrong = []

    def work(scoped):
        want = name if scoped else default
        if scoped:
            with fb.use_backend(name):
                barrier.wait()
                wrong.extend(n for n in (fb.MLP([2, 2]).backend.name for _ in range(25)) if n != want)
        else:
            barrier.wait()
            wrong.extend(n for n in (fb.MLP([2, 2]).backend.name for _ in range(25)) if n != want)

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []



# ---------------------------------------------------------------- one model, several threads
def _pause_first_call(monkeypatch, be, method, thread_name):
    """Make ``thread_name``'s first call of ``be.method`` wait until released: the test then
    runs another thread's whole call on the same model in between, deterministically."""
    paused, release = threading.Event(), threading.Event()
    real = getattr(be, method)

    def wrapper(*args, **kwargs):
        if threading.current_thread().name == thread_name and not paused.is_set():
            paused.set()
            assert release.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(be, method, wrapper)
    return paused, release


def _interleaved(monkeypatch, be, method, first, second):
    """``first()`` in a thread paused inside ``be.method`` while ``second()`` runs whole; returns both."""
    paused, release = _pause_first_call(monkeypatch, be, method, "first")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("first", first()), name="first")
    t.start()
    assert paused.wait(timeout=30)
    out["second"] = second()
    release.set()
    t.join(timeout=60)
    return out["first"], out["second"]


@pytest.fixture
def model(backend):
    net = fb.MLP([6, 16, 16, 3], activation="tanh", loss="cross_entropy", seed=0, dtype="float64")
    rng = np.random.default_rng(1)
    X1, X2 = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))  # same size: they shared one workspace
    Y1, Y2 = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    return net, X1, X2, Y1, Y2


def test_predict_interleaved_with_another_threads_predict_on_one_model(backend, model, monkeypatch):
    """Two threads' predicts on one model used to share its workspaces: 6-13 wrong of 200."""
    net, X1, X2, _, _ = model
    want1, want2 = net.predict(X1), net.predict(X2)
    got1, got2 = _interleaved(monkeypatch, backend, "add_bias", lambda: net.predict(X1), lambda: net.predict(X2))
    np.testing.assert_array_equal(got1, want1)
    np.testing.assert_array_equal(got2, want2)


def test_loss_and_gradients_interleaved_on_one_model(backend, model, monkeypatch):
    net, X1, X2, Y1, Y2 = model
    want = net.loss(X1, Y1), net.gradients(X1, Y1), net.loss(X2, Y2), net.gradients(X2, Y2)
    got1, got2 = _interleaved(monkeypatch, backend, "output_delta",
                              lambda: net.gradients(X1, Y1), lambda: net.gradients(X2, Y2))
    for got, ref in ((got1, want[1]), (got2, want[3])):
        for a, b in zip(sum(got, []), sum(ref, [])):
            np.testing.assert_array_equal(fb.to_numpy(a), fb.to_numpy(b))
    got1, got2 = _interleaved(monkeypatch, backend, "loss_sum", lambda: net.loss(X1, Y1), lambda: net.loss(X2, Y2))
    assert (got1, got2) == (want[0], want[2])


def test_many_threads_predicting_on_one_model_agree_with_one_thread(backend, model):
    net, X1, X2, _, _ = model
    batches = [X1, X2, X1[:17], X2[::2]]
    want = [net.predict(X) for X in batches]
    barrier = threading.Barrier(4, timeout=30)
    wrong = []

    def work(i):
        barrier.wait()
        for _ in range(30):  # BLAS may round differently when called from two threads at once
            if not np.allclose(net.predict(batches[i]), want[i], rtol=1e-12, atol=1e-14):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _fit_in_thread(net, X, Y, **kwargs):
    """Start ``net.fit`` in a thread held inside its first epoch; returns (thread, release, result)."""
    inside, release = threading.Event(), threading.Event()

    def hold(epoch, logs):
        if epoch == 0:
            inside.set()
            assert release.wait(timeout=30)

    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "history", net.fit(X, Y, epochs=2, batch_size=8, callbacks=[hold], progress=False, **kwargs)), name="fitter")
    t.start()
    assert inside.wait(timeout=30)
    return t, release, result


def test_calls_during_another_threads_fit_are_refused_clearly(backend, model):
    """A fit with predicts in another thread used to end at a wrong loss, silently."""
    net, X1, X2, Y1, _ = model
    t, release, result = _fit_in_thread(net, X1, Y1)
    try:
        for call in (lambda: net.predict(X2), lambda: net.loss(X1, Y1), lambda: net.gradients(X1, Y1),
                     lambda: net.get_params(), lambda: net.fit(X1, Y1, progress=False),
                     lambda: net.set_params(*net.get_params()), lambda: net.save(io.BytesIO())):
            with pytest.raises(RuntimeError, match=r"refused: thread 'fitter' is running MLP.fit on this model.*"
                                                   r"Wait for fit to return"):
                call()
    finally:
        release.set()
        t.join(timeout=60)
    assert len(result["history"]) == 2
    net.predict(X2)  # free again


def test_fit_waits_for_predicts_in_flight_and_predict_sees_one_model(backend, model, monkeypatch):
    """A predict that started before the fit finishes on the parameters it started with."""
    net, X1, X2, Y1, _ = model
    before = net.predict(X2)
    paused, release = _pause_first_call(monkeypatch, backend, "add_bias", "reader")
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("p", net.predict(X2)), name="reader")
    reader.start()
    assert paused.wait(timeout=30)
    fitter = threading.Thread(target=lambda: out.setdefault("h", net.fit(X1, Y1, epochs=1, progress=False)))
    fitter.start()
    fitter.join(timeout=0.3)
    assert fitter.is_alive() and "h" not in out  # fit is waiting for the predict in flight
    release.set()
    reader.join(timeout=60)
    fitter.join(timeout=60)
    np.testing.assert_array_equal(out["p"], before)
    assert len(out["h"]) == 1
    assert not np.array_equal(net.predict(X2), before)  # and fit did train afterwards


def test_fit_callbacks_may_use_the_model_in_the_fitting_thread(backend, model):
    net, X1, _, Y1, _ = model
    seen = []
    net.fit(X1, Y1, epochs=2, batch_size=8, progress=False,
            callbacks=[lambda epoch, logs: seen.append((net.loss(X1, Y1), net.predict(X1[:2]).shape))])
    assert len(seen) == 2 and seen[0][1] == (2, 3)


def test_threads_with_their_own_models_train_independently(backend):
    """Two models fitted in two threads at once end where one thread alone takes them."""
    X, Y = make_data(48, 5, 3, "cross_entropy", labels=True)

    def train():
        net = fb.MLP([5, 12, 3], activation="relu", loss="cross_entropy", seed=3, dtype="float64")
        net.fit(X, Y, epochs=3, batch_size=8, optimizer="adam", seed=0, progress=False)
        return fb.to_numpy(net._params).copy()

    alone = train()
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, train())) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:  # to rounding: BLAS may block a GEMM differently when two run at once
        np.testing.assert_allclose(r, alone, rtol=1e-11, atol=1e-13)
