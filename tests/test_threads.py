"""Threads: backend selection that stays in its thread, and models used from several threads."""

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

