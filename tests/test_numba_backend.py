"""The Numba backend against the NumPy reference backend: every kernel, the compiled
per-example loop and the compiled epochs.

Tolerances: float64 agrees to rounding (rtol 1e-12 elementwise; 1e-10 where a GEMM or a
whole trajectory sums in another order). float32 elementwise kernels agree to a few ulps
(rtol 1e-5); float32 GEMM-based results and trajectories to rtol 2e-4, atol 1e-5 (the
summation order of a length-k dot product differs between BLAS and a hand loop).
"""

import os

import numpy as np
import pytest

pytest.importorskip("numba")
import fastbp as fb  # noqa: E402
from conftest import target_rows  # noqa: E402
from fastbp.errors import BackendUnavailableError  # noqa: E402
from fastbp.kernels.base import (ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, LOSSES, NetSpec,  # noqa: E402
                                 OptimizerState, UpdateRule)

if "numba" not in fb.available_backends():  # e.g. scipy missing: create() says why
    pytest.skip(f"numba backend unusable: {fb.backend_status()['numba']}", allow_module_level=True)

DTYPES = ["float64", "float32"]
ELEM = {"float64": dict(rtol=1e-12, atol=1e-14), "float32": dict(rtol=1e-5, atol=1e-7)}
GEMM = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=1e-5)}


def _backend(name):
    with fb.use_backend(name) as be:
        return be


NB, REF = _backend("numba"), _backend("numpy")


def _z(shape, dtype, seed=0, scale=3.0):
    """Logits with exact zeros and +-1e4 extremes mixed in."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * scale
    flat = z.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = 1e4
    flat[2::13] = -1e4
    return z.astype(dtype)


# ---------------------------------------------------------------- elementwise kernels

@pytest.mark.parametrize("rows", [3, 300])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_forward_and_backward(name, dtype, rows):
    z = _z((rows, 64), dtype)
    a_nb, a_ref = np.empty_like(z), np.empty_like(z)
    NB.activation(name, z, a_nb)
    REF.activation(name, z, a_ref)
    assert np.isfinite(a_nb).all()
    np.testing.assert_allclose(a_nb, a_ref, **ELEM[dtype])

    d = np.random.default_rng(2).standard_normal(z.shape).astype(dtype)
    d_nb, d_ref = d.copy(), d.copy()
    NB.activation_backward(name, z, a_ref, d_nb)
    REF.activation_backward(name, z, a_ref, d_ref)
    np.testing.assert_allclose(d_nb, d_ref, **ELEM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_leaky_at_exact_zero(dtype):
    z = np.array([[0.0, -0.0, 1e-30, -1e-30]], dtype=dtype)
    out, d = np.empty_like(z), np.ones_like(z)
    NB.activation("relu", z, out)
    np.testing.assert_array_equal(out, [[0, 0, z[0, 2], 0]])
    NB.activation_backward("relu", z, out, d)
    np.testing.assert_array_equal(d, [[0, 0, 1, 0]])  # z == 0 counts as off, as in the reference
    d = np.ones_like(z)
    NB.activation("leaky_relu", z, out)
    NB.activation_backward("leaky_relu", z, out, d)
    slope = z.dtype.type(0.01)
    np.testing.assert_array_equal(d, [[slope, slope, 1, slope]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output", ACTIVATIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_output_delta_and_loss_sum(loss, output, dtype):
    z = _z((9, 4), dtype, seed=3)
    a = np.empty_like(z)
    REF.activation(output, z, a)
    y = target_rows(loss, z.shape, dtype)
    d_nb, d_ref = np.empty_like(z), np.empty_like(z)
    c_nb = NB.output_delta(loss, output, z, a, y, d_nb)
    c_ref = REF.output_delta(loss, output, z, a, y, d_ref)
    assert np.isfinite(c_nb) and np.isfinite(d_nb).all()  # +-1e4 logits included
    # costs sum in float64 here and in the dtype there
    assert c_nb == pytest.approx(c_ref, rel=1e-12 if dtype == "float64" else 1e-5)
    np.testing.assert_allclose(d_nb, d_ref, **ELEM[dtype])
    assert NB.loss_sum(loss, output, z, a, y) == pytest.approx(c_nb, rel=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_losses_are_finite_at_extreme_logits(dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=dtype)
    y = np.array([[1, 0, 0], [0, 0, 1]], dtype=dtype)
    for loss, output in (("cross_entropy", "softmax"), ("log_loss", "sigmoid")):
        a, d = np.empty_like(z), np.empty_like(z)
        NB.activation(output, z, a)
        cost = NB.output_delta(loss, output, z, a, y, d)
        assert np.isfinite(cost) and np.isfinite(d).all() and np.isfinite(a).all()
        assert cost == pytest.approx(REF.loss_sum(loss, output, z, a, y), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.25, 0.0), (0.5, 1.0), (-2.0, 0.3)])
def test_matmul_writes_into_out(dtype, trans_a, trans_b, alpha, beta):
    rng = np.random.default_rng(4)
    m, k, n = 5, 7, 3
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    out0 = rng.standard_normal((m, n)).astype(dtype)
    out_nb, out_ref = out0.copy(), out0.copy()
    NB.matmul(a, b, out_nb, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    REF.matmul(a, b, out_ref, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    np.testing.assert_allclose(out_nb, out_ref, **GEMM[dtype])
    # views and Fortran-ordered operands too
    out_nb = out0.copy()
    NB.matmul(np.asfortranarray(a), b[:, :] if trans_b else np.asfortranarray(b), out_nb,
              trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta)
    np.testing.assert_allclose(out_nb, out_ref, **GEMM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_kernels(dtype):
    rng = np.random.default_rng(5)
    A = rng.standard_normal((6, 4)).astype(dtype)
    B = rng.standard_normal((6, 4)).astype(dtype)
    x, y = A[0].copy(), rng.standard_normal(3).astype(dtype)

    outs = [np.empty_like(A) for _ in range(2)]
    for be, o in zip((NB, REF), outs):
        be.hadamard(A, B, o)
    np.testing.assert_array_equal(outs[0], outs[1])

    for alpha, acc in ((1.0, True), (0.5, True), (0.25, False)):
        outs = [np.full((4, 3), 2.0, dtype) for _ in range(2)]
        for be, o in zip((NB, REF), outs):
            be.outer(x, y, o, alpha=alpha, accumulate=acc)
        np.testing.assert_allclose(outs[0], outs[1], **ELEM[dtype])

    outs = [A.copy(), A.copy()]
    for be, o in zip((NB, REF), outs):
        be.add_bias(o, B[1])
    np.testing.assert_array_equal(outs[0], outs[1])

    for alpha, acc in ((1.0, False), (1 / 6, False), (1 / 6, True), (1.0, True)):
        outs = [np.full(4, 0.5, dtype) for _ in range(2)]
        for be, o in zip((NB, REF), outs):
            be.bias_grad(A, o, alpha=alpha, accumulate=acc)
        np.testing.assert_allclose(outs[0], outs[1], **ELEM[dtype])

    for n_in in (2, 3000):  # every rule: the same arithmetic as the NumPy backend's update
        uspec = NetSpec((n_in, 5, 3), "relu", "identity", "mse", np.dtype(dtype))
        p, g = (rng.standard_normal(uspec.n_params).astype(dtype) for _ in range(2))
        for rule in (UpdateRule("sgd", lr=0.1), UpdateRule("sgd", lr=0.1, momentum=0.9, nesterov=True,
                                                           weight_decay=0.01, l2=0.3),
                     UpdateRule("adam", lr=0.01, weight_decay=0.1), UpdateRule("adamw", lr=0.01, l2=0.2)):
            runs = []
            for be in (NB, REF):
                o, st = p.copy(), OptimizerState(np.zeros((rule.n_buffers, uspec.n_params), dtype))
                for _ in range(3):
                    be.update(uspec, rule, o, g, st, 4)
                runs.append((o, st.buffers, st.steps))
            np.testing.assert_allclose(runs[0][0], runs[1][0], **ELEM[dtype])
            np.testing.assert_allclose(runs[0][1], runs[1][1], **ELEM[dtype])
            assert runs[0][2] == runs[1][2] == 3
            if rule.is_plain_sgd:
                np.testing.assert_array_equal(runs[0][0], runs[1][0])  # same rounding: p - g * lr

    assert NB.all_finite(A) and not NB.all_finite(np.array([1.0, np.inf], dtype))
    big = np.ones(10_000, dtype)
    for bad in (0, 4095, 4096, 9_999):
        for value in (np.nan, np.inf, -np.inf):
            big[bad] = value
            assert not NB.all_finite(big)
            big[bad] = 1.0
    assert NB.all_finite(big) and NB.all_finite(np.empty(0, dtype))
    assert NB.all_finite(np.full(5, np.finfo(dtype).max, dtype))
    index = np.array([5, 0, 3])
    outs = [np.empty((3, 4), dtype) for _ in range(2)]
    for be, o in zip((NB, REF), outs):
        be.take_rows(A, index, o)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ELEMENTWISE_ACTIVATIONS)
def test_hidden_delta(name, dtype, rows):
    rng = np.random.default_rng(6)
    dn = rng.standard_normal((rows, 3)).astype(dtype)
    w = rng.standard_normal((3, 64)).astype(dtype)
    z = _z((rows, 64), dtype, scale=1.0)
    a = np.empty_like(z)
    REF.activation(name, z, a)
    outs = [np.empty_like(z) for _ in range(2)]
    for be, o in zip((NB, REF), outs):
        be.hidden_delta(name, dn, w, z, a, o)
    np.testing.assert_allclose(outs[0], outs[1], **GEMM[dtype])


# ---------------------------------------------------------------- compiled loop and epochs

COMBOS = [("sigmoid", "mse", None), ("relu", "cross_entropy", None), ("tanh", "log_loss", None),
          ("leaky_relu", "mse", "softmax"), ("identity", "cross_entropy", "sigmoid"),
          ("relu", "log_loss", "tanh")]


def _net(backend, sizes, hidden, loss, output, dtype, seed=0):
    with fb.use_backend(backend):
        return fb.MLP(sizes, activation=hidden, loss=loss, output=output, dtype=dtype, seed=seed)


def _data(n, sizes, loss, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sizes[0]))
    if loss == "cross_entropy":
        return X, np.eye(sizes[-1])[rng.integers(0, sizes[-1], n)]
    if loss == "log_loss":
        return X, rng.integers(0, 2, (n, sizes[-1])).astype(float)
    return X, rng.standard_normal((n, sizes[-1]))


def _flat(grads):
    dWs, dbs = grads
    return np.concatenate([np.asarray(g).ravel() for g in dWs + dbs])


def _params(net):
    W, b = net.get_params()
    return np.concatenate([p.ravel() for p in W + b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,loss,output", COMBOS)
def test_loop_gradients_match_numpy(hidden, loss, output, dtype):
    sizes = [5, 8, 6, 3]
    X, Y = _data(13, sizes, loss)
    ref = _net("numpy", sizes, hidden, loss, output, dtype)
    nb = _net("numba", sizes, hidden, loss, output, dtype)
    expected_vec = _flat(ref.gradients(X, Y, strategy="vectorized"))
    expected_loop = _flat(ref.gradients(X, Y, strategy="loop"))
    got = _flat(nb.gradients(X, Y, strategy="loop"))  # NB.loop_gradients, one compiled call
    np.testing.assert_allclose(got, expected_loop, **GEMM[dtype])
    np.testing.assert_allclose(got, expected_vec, **GEMM[dtype])

    # the kernel itself: its return value is the summed cost
    spec = nb.spec
    Xd, Yd = (np.ascontiguousarray(v, dtype=dtype) for v in (X, Y))
    grads = np.empty(spec.n_params, dtype)
    total = NB.loop_gradients(spec, nb._params, Xd, Yd, grads)
    assert total / len(X) == pytest.approx(ref.loss(X, Y), rel=1e-12 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("path", ["hand", "blas", "per-batch"])
@pytest.mark.parametrize("batch_size,strategy", [(1, "vectorized"), (1, "loop"), (4, "vectorized"),
                                                 (4, "loop"), (None, "vectorized")])
@pytest.mark.parametrize("hidden,loss,output", COMBOS)
def test_fit_trajectory_matches_numpy(hidden, loss, output, batch_size, strategy, path, monkeypatch):
    """Compiled epochs (hand-loop or BLAS products) and the per-batch path vs NumPy, float64."""
    if path == "blas":  # every product a BLAS GEMM
        for name, value in (("FORWARD_BLAS_MIN", 0), ("BACKWARD_BLAS_MIN", 0), ("HAND_MAX_ROWS", 0)):
            monkeypatch.setattr(NB, name, value)
    if path == "hand":  # every product a hand loop
        for name, value in (("FORWARD_BLAS_MIN", 2**62), ("BACKWARD_BLAS_MIN", 2**62)):
            monkeypatch.setattr(NB, name, value)
    if path == "per-batch":
        monkeypatch.setattr(NB, "supports_epoch", lambda *args: False)
    sizes = [4, 7, 5, 3]
    X, Y = _data(18, sizes, loss, seed=1)
    nets = [_net(b, sizes, hidden, loss, output, "float64", seed=2) for b in ("numpy", "numba")]
    hists = [net.fit(X, Y, epochs=3, batch_size=batch_size, lr=0.1, strategy=strategy, seed=3, progress=False)
             for net in nets]
    np.testing.assert_allclose(_params(nets[1]), _params(nets[0]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(list(hists[1]), list(hists[0]), rtol=1e-10)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_fit_trajectory_float32(batch_size):
    sizes = [6, 16, 4]
    X, Y = _data(64, sizes, "cross_entropy", seed=4)
    nets = [_net(b, sizes, "relu", "cross_entropy", None, "float32", seed=5) for b in ("numpy", "numba")]
    hists = [net.fit(X, Y, epochs=3, batch_size=batch_size, lr=0.05, seed=6, progress=False) for net in nets]
    np.testing.assert_allclose(_params(nets[1]), _params(nets[0]), rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(list(hists[1]), list(hists[0]), rtol=2e-4)


SGD01 = UpdateRule("sgd", lr=0.1)


def _no_state(spec):
    return OptimizerState(np.zeros((0, spec.n_params), spec.dtype))


@pytest.mark.parametrize("batch_size,strategy", [(1, "vectorized"), (2, "vectorized"), (2, "loop")])
def test_train_epoch_stops_before_a_non_finite_batch(batch_size, strategy):
    spec = NetSpec((3, 4, 2), "tanh", "identity", "mse", np.dtype("float64"))
    rng = np.random.default_rng(7)
    params0 = rng.standard_normal(spec.n_params) * 0.3
    X, Y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    Y[4, 1] = np.inf  # the batch holding row 4 has an infinite cost
    params, grads = params0.copy(), np.empty_like(params0)
    with np.errstate(invalid="ignore", over="ignore"):
        total, done, _ = NB.train_epoch(spec, params, grads, X, Y, batch_size, SGD01, _no_state(spec), strategy)
    assert done == 4
    expected, expected_grads = params0.copy(), np.empty_like(params0)
    total_ok, done_ok, _ = NB.train_epoch(spec, expected, expected_grads, X[:4], Y[:4], batch_size, SGD01,
                                          _no_state(spec), strategy)
    assert done_ok == 4 and total == pytest.approx(total_ok, rel=1e-14)
    np.testing.assert_array_equal(params, expected)  # the bad batch's update was not applied


def test_fast_paths_refuse_mismatched_buffers():
    spec = NetSpec((3, 4, 2), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    params, grads = np.zeros(spec.n_params), np.zeros(spec.n_params)
    X, Y = np.zeros((5, 3)), np.zeros((5, 2))
    bad = [(params[:-1], grads, X, Y), (params, grads, X[:, :2], Y), (params, grads, X, Y[:4]),
           (params, grads, X.astype(np.float32), Y), (params, grads, np.asfortranarray(X), Y)]
    for p, g, x, y in bad:
        with pytest.raises(ValueError, match="compiled fast path"):
            NB.loop_gradients(spec, p, x, y, g)
        with pytest.raises(ValueError, match="compiled fast path"):
            NB.train_epoch(spec, p, g, x, y, 2, SGD01, _no_state(spec), "vectorized")


def test_take_rows_clips_like_numpy():
    src = np.arange(12.0).reshape(4, 3)
    index = np.array([3, -2, 7, 0])
    outs = [np.empty((4, 3)) for _ in range(2)]
    for be, o in zip((NB, REF), outs):
        be.take_rows(src, index, o)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_small_epochs_run_blas_on_one_thread_and_restore_it():
    if NB._blas is None:
        pytest.skip("threadpoolctl cannot see SciPy's OpenBLAS here")
    seen = []
    spec = NetSpec((4, 6, 3), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    rng = np.random.default_rng(8)
    params, grads = rng.standard_normal(spec.n_params) * 0.1, np.empty(spec.n_params)
    X, Y = rng.standard_normal((8, 4)), np.eye(3)[rng.integers(0, 3, 8)]
    before = NB._blas.get_num_threads()
    kernels = NB._k

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def batch_epoch(self, *args):
            seen.append(NB._blas.get_num_threads())
            return kernels.batch_epoch(*args)

    NB._k = Spy()
    try:
        NB.train_epoch(spec, params, grads, X, Y, 4, SGD01, _no_state(spec), "vectorized")
    finally:
        NB._k = kernels
    assert seen == [1] and NB._blas.get_num_threads() == before


def test_supports_epoch_by_size():
    small = NetSpec((784, 128, 10), "relu", "softmax", "cross_entropy", np.dtype("float32"))
    large = NetSpec((1024, 2048, 2048, 10), "relu", "softmax", "cross_entropy", np.dtype("float32"))
    assert NB.supports_epoch(small, 1, "vectorized") and NB.supports_epoch(large, 1, "vectorized")
    assert NB.supports_epoch(large, 512, "loop")
    assert NB.supports_epoch(small, 64, "vectorized")
    assert not NB.supports_epoch(large, 512, "vectorized")


def _entry_kernels():
    """The compiled kernels the backend calls from Python (``self._k.name`` / ``K.name`` in numba.py)."""
    import inspect
    import re

    import fastbp.kernels.numba as module

    source = inspect.getsource(module)
    names = set(re.findall(r"\b(?:self\._k|K)\.([a-z_]\w*)", source)) | set(re.findall(r'self\._run\("(\w+)"', source))
    names |= {"examples_epoch"}  # chosen by name in train_epoch
    names -= {"shallow_epoch_drawing"}  # the small nets' fallback, on use, where no kernel can be generated
    return {name for name in names if hasattr(getattr(NB._k, name, None), "signatures")}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_warmup_runs_every_compiled_kernel_and_times_itself(dtype):
    """warmup(dtype) calls each compiled entry point with ``dtype`` arrays, and its seconds are real."""
    import time

    calls = {}
    kernels = NB._k

    class Recorder:
        def __getattr__(self, name):
            real = getattr(kernels, name)
            if not hasattr(real, "signatures"):
                return real

            def call(*args):
                calls.setdefault(name, set()).update(str(a.dtype) for a in args if isinstance(a, np.ndarray))
                return real(*args)

            return call

    NB._k = Recorder()
    try:
        t0 = time.perf_counter()
        seconds = NB.warmup(dtype)
        wall = time.perf_counter() - t0
    finally:
        NB._k = kernels
    expected = _entry_kernels()
    assert len(expected) >= 10  # the regex still finds the kernels numba.py calls
    missing = sorted(name for name in expected if dtype not in calls.get(name, ()))
    assert not missing, f"warmup({dtype!r}) never ran {missing} with {dtype} arrays"
    assert isinstance(seconds, float) and 0.0 < seconds <= wall


def test_warmup_info_and_unavailable(monkeypatch):
    info = NB.info()
    assert info["name"] == "numba" and info["numba_threads"] == 1
    assert {"numba", "blas", "blas_threads", "thread_policy", "cores"} <= info.keys()

    import fastbp.kernels.numba as module

    monkeypatch.setattr(module, "numba", None)
    with pytest.raises(BackendUnavailableError) as err:
        module.create()
    assert err.value.reason == "numba is not installed" and err.value.fix == "pip install numba"


# ---------------------------------------------------------------- fused per-example, fused GEMM update

RULE_CASES = [UpdateRule("sgd", lr=0.1), UpdateRule("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
              UpdateRule("sgd", lr=0.05, momentum=0.8, l2=0.01), UpdateRule("adam", lr=0.01, weight_decay=1e-3),
              UpdateRule("adamw", lr=0.01, beta1=0.8, beta2=0.99, weight_decay=0.05),
              # undecayed heavy ball and Adam: the small kernels' inline loops (_shallow_body's heavy/adam)
              UpdateRule("sgd", lr=0.05, momentum=0.9), UpdateRule("adam", lr=0.01)]
RULE_ID = lambda r: f"{r.kind}-{r.momentum}-{r.l2}-{r.weight_decay}"  # noqa: E731


def _state(rule, spec):
    return OptimizerState(np.zeros((rule.n_buffers, spec.n_params), spec.dtype))


@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_ID)
@pytest.mark.parametrize("hidden,loss,output", COMBOS)
def test_shallow_epoch_equals_the_layer_by_layer_epoch(hidden, loss, output, rule):
    """The one-hidden-layer fused loop against examples_epoch on the same net, float64."""
    from fastbp.kernels import numba_kernels as K

    net = _net("numba", [5, 9, 3], hidden, loss, output, "float64", seed=4)
    X, Y = _data(17, [5, 9, 3], loss, seed=5)
    sizes, h, o, lc = NB._spec(net.spec)
    results = []
    order = np.random.default_rng(6).permutation(17)
    alone = K.alone()  # examples_epoch's team: this thread only
    for run in (K.shallow_epoch, lambda *args: K.examples_epoch(*args, alone)):
        params, state = net._params.copy(), _state(rule, net.spec)
        state.step[0] = 3  # mid-trajectory: the bias corrections start from step 3
        work = np.empty(3 * sum(net.spec.sizes))
        total, done, correct = run(sizes, h, o, lc, params, X, Y, order, rule.hyper(), state.step, state.buffers,
                                   work)
        results.append((params, state.buffers, total, done, correct, state.steps))
    (p1, s1, t1, d1, c1, n1), (p2, s2, t2, d2, c2, n2) = results
    np.testing.assert_allclose(p1, p2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s1, s2, rtol=1e-12, atol=1e-14)
    assert (d1, c1, n1) == (d2, c2, n2) == (17, c2, 20) and t1 == pytest.approx(t2, rel=1e-12)


@pytest.mark.parametrize("rule", [RULE_CASES[0], RULE_CASES[2]], ids=lambda r: r.kind)
@pytest.mark.parametrize("sizes,batch,strategy", [([3, 5, 2], 1, "vectorized"), ([4, 6, 5, 3], 1, "vectorized"),
                                                  ([4, 6, 5, 3], 3, "loop"), ([4, 6, 5, 3], 4, "vectorized"),
                                                  ([4, 6, 5, 3], 30, "vectorized")])
def test_an_epoch_in_a_given_order_is_the_epoch_over_the_rows_in_that_order(sizes, batch, strategy, rule):
    """train_epoch(order=perm) reads the rows in place; bit for bit the epoch over X[perm]."""
    net = _net("numba", sizes, "tanh", "cross_entropy", None, "float64", seed=15)
    X, Y = _data(23, sizes, "cross_entropy", seed=16)
    order = np.random.default_rng(17).permutation(23)
    runs = []
    for kwargs, Xe, Ye in (({"order": order}, X, Y), ({}, X[order], Y[order])):
        params, grads, state = net._params.copy(), np.empty_like(net._params), _state(rule, net.spec)
        out = NB.train_epoch(net.spec, params, grads, Xe, Ye, batch, rule, state, strategy, **kwargs)
        runs.append((params, state.buffers, out, state.steps))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert runs[0][2:] == runs[1][2:]


@pytest.mark.parametrize("shuffle", [True, False])
def test_a_read_only_data_set_trains_as_a_writable_one(shuffle):
    """fit hands X and Y to the compiled epochs as they are; read-only ones (a memmap's view,
    scikit-learn's checks) train exactly like writable copies."""
    X, Y = _data(40, [4, 6, 3], "cross_entropy", seed=20)
    runs = []
    for writable in (True, False):
        Xi, Yi = X.copy(), Y.copy()
        Xi.flags.writeable = Yi.flags.writeable = writable
        net = _net("numba", [4, 6, 3], "relu", "cross_entropy", None, "float64", seed=21)
        for batch in (1, 8):
            net.fit(Xi, Yi, epochs=2, batch_size=batch, shuffle=shuffle, seed=22, progress=False,
                    optimizer=fb.optim.SGD(lr=0.1, momentum=0.9))
        runs.append(net._params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("order", [np.arange(5), np.arange(23) + 1, -np.arange(23), np.zeros((23, 1), np.int64),
                                   np.linspace(0, 1, 23)], ids=["short", "past-the-end", "negative", "2-d", "floats"])
def test_an_order_that_is_not_rows_of_x_is_refused_and_changes_nothing(order):
    net = _net("numba", [4, 6, 3], "relu", "cross_entropy", None, "float64", seed=18)
    X, Y = _data(23, [4, 6, 3], "cross_entropy", seed=19)
    rule = UpdateRule("sgd", lr=0.1)
    params, state = net._params.copy(), _state(rule, net.spec)
    with pytest.raises(ValueError, match="order must list the 23 rows"):
        NB.train_epoch(net.spec, params, np.empty_like(params), X, Y, 4, rule, state, "vectorized", order=order)
    np.testing.assert_array_equal(params, net._params)
    assert state.steps == 0


@pytest.mark.parametrize("rule", RULE_CASES[1:4], ids=lambda r: r.kind)
def test_per_example_rules_on_a_deeper_net_match_numpy(rule):
    from fastbp import optim

    kind = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[rule.kind]
    kwargs = {"lr": rule.lr, "weight_decay": rule.weight_decay}
    if rule.kind == "sgd":
        kwargs.update(momentum=rule.momentum, nesterov=rule.nesterov)
    sizes = [4, 6, 5, 3]
    X, Y = _data(15, sizes, "cross_entropy", seed=6)
    nets = [_net(b, sizes, "tanh", "cross_entropy", None, "float64", seed=7) for b in ("numpy", "numba")]
    for net in nets:
        net.fit(X, Y, epochs=2, batch_size=1, optimizer=kind(**kwargs), seed=8, progress=False)
    np.testing.assert_allclose(_params(nets[1]), _params(nets[0]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_with_alpha_and_beta(trans_a, trans_b, dtype):
    from fastbp.kernels import numba_kernels as K

    rng = np.random.default_rng(9)
    m, n, k = 7, 5, 11
    A = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    C = rng.standard_normal((m, n)).astype(dtype)
    expected = -0.25 * ((A.T if trans_a else A) @ (B.T if trans_b else B)) + 1.0 * C
    T = np.dtype(dtype).type
    K.gemm(trans_a, trans_b, T(-0.25), A, B, T(1.0), C)
    np.testing.assert_allclose(C, expected, **GEMM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(32, 10), (7, 3), (5, 1), (0, 4)])
def test_batch_softmax_rounds_as_the_row_by_row_output_layer(n, k, dtype):
    """output_rows' column-wise softmax + cross-entropy (_softmax_rows) gives the bits of
    output_layer row by row: activations, deltas and the summed cost; soft targets too."""
    from numba import njit

    from fastbp.kernels import numba_kernels as K

    rng = np.random.default_rng(n + k)
    Z = (rng.standard_normal(n * k) * 8).astype(dtype)
    Y = np.eye(k, dtype=dtype)[rng.integers(0, k, n)]
    if n and k > 1:
        Y[0] = 1.0 / k
    scale = np.dtype(dtype).type(1 / max(n, 1))

    @njit
    def by_rows(Z, A, D, Y, n, k, scale):
        total = 0.0
        for r in range(n):
            total += K.output_layer(K.CROSS_ENTROPY, K.SOFTMAX, Z, A, D, r * k, k, Y, r, scale)
        return total

    A1, D1, A2, D2 = (np.full(n * k, np.nan, dtype) for _ in range(4))
    got = K.output_rows(K.CROSS_ENTROPY, K.SOFTMAX, Z, A1, D1, Y, n, scale)
    expected = by_rows(Z, A2, D2, Y, n, k, scale)
    assert got == expected
    np.testing.assert_array_equal(A1, A2)
    np.testing.assert_array_equal(D1, D2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("plan", [(0, 0, 0), (2**62, 2**62, 0), (0, 150, 0), (0, 0, 1), (2**62, 2**62, 1)],
                         ids=["blas", "hand", "mixed", "first-transposed", "hand-first-transposed"])
def test_sgd_and_momentum_fused_into_the_weight_gradient_step(plan, momentum, dtype):
    """batch_epoch's fused steps -- plain SGD as ``W += -lr D^T A`` in the GEMM, momentum as
    ``M = mom M + D^T A`` in it -- against gradients then the update rule's arithmetic (to
    rounding: a BLAS may fuse its alpha/beta terms into FMAs)."""
    from fastbp.kernels import numba_kernels as K

    spec = NetSpec((6, 8, 7, 3), "relu", "softmax", "cross_entropy", np.dtype(dtype))
    rng = np.random.default_rng(10)
    params0 = (rng.standard_normal(spec.n_params) * 0.3).astype(dtype)
    X, Y = rng.standard_normal((20, 6)).astype(dtype), np.eye(3, dtype=dtype)[rng.integers(0, 3, 20)]
    sizes, h, o, lc = NB._spec(spec)
    plan = K.batch_plan(*plan)
    rule = UpdateRule("sgd", lr=0.1, momentum=momentum)
    work = np.empty(3 * 8 * sum(spec.sizes[1:]), dtype)
    velocity0 = (rng.standard_normal((rule.n_buffers, spec.n_params)) * 0.1).astype(dtype)
    fused, grads, step, velocity = params0.copy(), np.empty(spec.n_params, dtype), np.zeros(1, np.int64), velocity0.copy()
    total, done, _ = K.batch_epoch(sizes, h, o, lc, fused, grads, X, Y, np.empty(0, np.int64), 8, rule.hyper(), step,
                                   velocity, work, plan)
    expected, expected_total, m = params0.copy(), 0.0, velocity0.copy()
    w_off, b_off, u_off = K.layer_offsets(sizes)
    bases = K._view_bases(work, sizes, u_off)
    T = np.dtype(dtype).type
    for start in range(0, 20, 8):
        expected_total += K.batch_gradients(sizes, h, o, lc, expected, grads, X[start:start + 8], Y[start:start + 8],
                                            work, plan[:2], w_off, b_off, bases)
        if momentum:
            m[0] = m[0] * T(momentum) + grads
            expected -= m[0] * T(0.1)
        else:
            expected -= grads * T(0.1)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == "float64" else {"rtol": 2e-6, "atol": 1e-7}
    np.testing.assert_allclose(fused, expected, **tol)
    np.testing.assert_allclose(velocity, m, **tol)
    assert done == 20 and step[0] == 3 and total == pytest.approx(expected_total, rel=10 * tol["rtol"])


# ---------------------------------------------------------------- BLAS threads

class _FakeBlas:
    def __init__(self, threads=2):
        self.threads, self.calls = threads, []

    def get_num_threads(self):
        return self.threads

    def set_num_threads(self, n):
        self.calls.append(n)
        self.threads = n


def _policy(monkeypatch, samples, threads=2):
    """A thread policy on a fake BLAS, reading ``samples`` as successive /proc/stat readings."""
    import fastbp.kernels.numba as module

    readings = iter(samples)
    monkeypatch.setattr(module, "_cpu_sample", lambda now: next(readings))
    return module._ThreadPolicy(_FakeBlas(threads), cores=2)


def test_threads_follow_the_cores_other_processes_leave(monkeypatch):
    # /proc/stat readings (wall, busy seconds of all CPUs, own CPU seconds): over each second the
    # other processes use 1 core, then none, then 0.6 of one
    pol = _policy(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 2.0, 1.0), (2.0, 3.0, 2.0), (3.0, 4.6, 3.0)])
    pol._others_busy(0.0)  # the first reading: no window yet
    assert pol.decide(1.0) == 1 and "1.00 of 2 cores" in pol.reason and "taken core" in pol.reason
    assert pol.decide(1.1) == 1  # re-decided only after WINDOW_S, without reading /proc/stat
    assert pol.decide(2.0) == 2 and "0.00 of 2" in pol.reason
    assert pol.decide(3.0) == 1  # 0.6 of a core is taken: a second thread would wait for it
    assert pol.describe()["other_processes_cores"] == pytest.approx(0.6)


def test_a_limit_set_outside_is_a_ceiling_and_set_threads_fixes_it(monkeypatch):
    pol = _policy(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)])  # nobody else busy
    pol._others_busy(0.0)
    pol.restore(pol.run_with(pol.decide(1.0)))
    assert pol.chosen == 2 and pol.blas.threads == 2
    pol.blas.threads = 1  # threadpool_limits(1) around a fit, from outside
    assert pol.decide(1.1) == 1 and pol.ceiling == 1
    pol.blas.threads = 2  # ... and its exit: the cores are the only limit again
    assert pol.decide(2.0) == 2 and pol.ceiling == 2
    pol.fixed = 1
    assert pol.decide(2.1) == 1 and pol.reason == "fixed by set_threads(1)"


def test_set_threads_checks_its_argument_and_runs_batch_epochs_on_it():
    if NB._blas is None:
        pytest.skip("threadpoolctl cannot see SciPy's OpenBLAS here")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="set_threads takes an int >= 1 or None"):
            NB.set_threads(bad)
    seen = []
    spec = NetSpec((4, 6, 3), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    rng = np.random.default_rng(8)
    params, grads = rng.standard_normal(spec.n_params) * 0.1, np.empty(spec.n_params)
    X, Y = rng.standard_normal((8, 4)), np.eye(3)[rng.integers(0, 3, 8)]
    real = NB._k.batch_epoch

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def batch_epoch(self, *args):
            seen.append(NB._blas.get_num_threads())
            return real(*args)

    before = NB._blas.get_num_threads()
    kernels, NB._k = NB._k, Spy()
    previous = NB.set_threads(2)
    try:
        NB.train_epoch(spec, params, grads, X, Y, 4, SGD01, _no_state(spec), "vectorized")
        assert NB.info()["blas_threads_policy"]["mode"] == "fixed"
    finally:
        assert NB.set_threads(previous) == 2
        NB._k = kernels
    assert seen == [2] and NB._blas.get_num_threads() == before
    assert NB.info()["blas_threads_policy"]["mode"] == "auto"


# ---------------------------------------------------------------- JIT announcement

def test_a_cold_compile_is_announced_once(monkeypatch, capsys):
    import fastbp.kernels.numba as module

    be = module.create()  # a fresh backend: nothing seen in this process yet
    spec = NetSpec((3, 300, 2), "relu", "softmax", "cross_entropy", np.dtype("float64"))  # no kernel of its own
    rng = np.random.default_rng(11)
    params, grads = rng.standard_normal(spec.n_params) * 0.1, np.empty(spec.n_params)
    X, Y = rng.standard_normal((4, 3)), np.eye(2)[[0, 1, 0, 1]]
    monkeypatch.setattr(module, "_cached_on_disk", lambda disp, args: False)
    for _ in range(2):
        be.train_epoch(spec, params, grads, X, Y, 1, SGD01, _no_state(spec), "vectorized")
    err = capsys.readouterr().err
    assert err.count("fastbp: compiling Numba code for per-example training (float64)") == 1
    assert f"about {module._ENTRY['examples_epoch'][1]} s, once" in err and "disk cache" in err

    be = module.create()
    monkeypatch.setattr(module, "_cached_on_disk", lambda disp, args: True)
    be.train_epoch(spec, params, grads, X, Y, 1, SGD01, _no_state(spec), "vectorized")
    assert capsys.readouterr().err == ""


def test_an_unreadable_cache_announces_a_slow_first_call(monkeypatch, capsys):
    import time

    import fastbp.kernels.numba as module

    be = module.create()
    monkeypatch.setattr(module, "_cached_on_disk", lambda disp, args: None)
    monkeypatch.setattr(module, "ANNOUNCE_AFTER_S", 0.05)

    class Slow:
        def __getattr__(self, name):
            return getattr(module._K, name)

        @staticmethod
        def all_finite(a):
            time.sleep(0.3)
            return True

    be._k = Slow()
    be.all_finite(np.ones(3))
    be.all_finite(np.ones(3))
    err = capsys.readouterr().err
    assert err.count("fastbp: probably compiling Numba code for the shuffle, check and layer kernels") == 1


@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_ID)
@pytest.mark.parametrize("hidden,loss,output", [COMBOS[1], COMBOS[2]])
def test_the_kernel_compiled_for_a_small_net_equals_shallow_epoch(hidden, loss, output, rule):
    """The generated, size-specialised per-example kernel against the shared one, float64
    (two networks: each is a cold compile of its own on a clean machine)."""
    from fastbp.kernels import numba_kernels as K

    net = _net("numba", [3, 5, 2], hidden, loss, output, "float64", seed=12)
    small = NB._small_kernel(net.spec)
    assert small is not None and small is NB._small_kernel(net.spec)  # made once, then reused
    X, Y = _data(11, [3, 5, 2], loss, seed=13)
    sizes, h, o, lc = NB._spec(net.spec)
    results = []
    order = np.random.default_rng(14).permutation(11)
    no_draw = (np.empty(0, np.int64), np.empty(0, np.uint64), np.empty(0, np.uint64))
    for run in (lambda *args: small(*args, *no_draw), K.shallow_epoch):
        params, state = net._params.copy(), _state(rule, net.spec)
        out = run(sizes, h, o, lc, params, X, Y, order, rule.hyper(), state.step, state.buffers,
                  np.empty(3 * sum(net.spec.sizes)))
        results.append((params, state.buffers, out))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)
    assert results[0][2][1:] == results[1][2][1:] and results[0][2][0] == pytest.approx(results[1][2][0], rel=1e-12)


def test_small_kernels_only_for_small_shallow_nets_and_never_required(monkeypatch):
    import fastbp.kernels.numba as module

    deep = NetSpec((3, 4, 4, 2), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    wide = NetSpec((784, 128, 10), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    assert NB._small_kernel(deep) is None and NB._small_kernel(wide) is None
    be = module.create()
    monkeypatch.setattr(module, "_generated_dir", lambda: None)  # nowhere writable
    spec = NetSpec((2, 3, 1), "tanh", "sigmoid", "log_loss", np.dtype("float64"))
    assert be._small_kernel(spec) is None
    rng = np.random.default_rng(14)
    params, grads = rng.standard_normal(spec.n_params), np.empty(spec.n_params)
    X, Y = rng.standard_normal((5, 2)), rng.integers(0, 2, (5, 1)).astype(float)
    assert be.train_epoch(spec, params, grads, X, Y, 1, SGD01, _no_state(spec), "vectorized")[1] == 5


def test_the_generated_module_names_the_kernels_it_inlines(tmp_path, monkeypatch):
    import hashlib

    import fastbp.kernels.numba as module

    monkeypatch.setattr(module, "_generated_dir", lambda: str(tmp_path))
    kernels = module._load_small_kernel((2, 3, 1), 0, 0, 1)
    (path,) = tmp_path.glob("fastbp_small_2_3u_1_0_0_1_*.py")  # 3 hidden units: a constant, unrolled
    with open(module._K.__file__, "rb") as f, open(module._R.__file__, "rb") as g:
        digest = hashlib.sha256(f.read() + g.read() + module._SMALL_SOURCE.encode()).hexdigest()  # and template
    assert digest[:16] in path.name and digest in path.read_text()
    assert callable(kernels.epoch)


def test_epochs_flush_denormals_inside_and_restore_the_caller_s_mode():
    """Moments stuck in the denormal range are flushed within the compiled epochs (and
    MXCSR is restored after them: NumPy in this thread still computes denormals)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("FTZ/DAZ are x86 SSE flags")
    spec = NetSpec((3, 300, 2), "relu", "softmax", "cross_entropy", np.dtype("float32"))
    rng = np.random.default_rng(15)
    params = (rng.standard_normal(spec.n_params) * 0.1).astype(np.float32)
    X = np.zeros((2, 3), np.float32)  # zero inputs: every first-layer weight's gradient is 0
    Y = np.eye(2, dtype=np.float32)
    rule = UpdateRule("adam", lr=1e-3)
    state = OptimizerState(np.zeros((2, spec.n_params), np.float32))
    tiny = np.float32(1e-44)  # a denormal; 0.9 * it rounds back to it without flushing
    state.buffers[0, :3 * 300] = tiny
    for bs in (1, 2):
        NB.train_epoch(spec, params, np.empty_like(params), X, Y, bs, rule, state, "vectorized")
        assert (state.buffers[0, :3 * 300] == 0).all()
        state.buffers[0, :3 * 300] = tiny
    assert tiny * np.float32(0.9) != 0  # the caller's thread computes denormals as before


def test_per_example_paths_by_network():
    """Small one-hidden-layer nets: their own kernel, or shallow_epoch_drawing where none can be made;
    everything else layer by layer (examples_epoch)."""
    import fastbp.kernels.numba as module

    be = module.create()
    ran = []
    real = be._run
    be._run = lambda name, dtype, *args, fn=None: ran.append(name) or real(name, dtype, *args, fn=fn)
    rng = np.random.default_rng(16)
    for sizes in ((3, 5, 2), (20, 60, 2), (3, 4, 4, 2)):  # (3, 5, 2): the kernel the test above made
        spec = NetSpec(sizes, "relu", "softmax", "cross_entropy", np.dtype("float64"))
        params, grads = rng.standard_normal(spec.n_params) * 0.1, np.empty(spec.n_params)
        X, Y = rng.standard_normal((3, sizes[0])), np.eye(2)[[0, 1, 0]]
        be.train_epoch(spec, params, grads, X, Y, 1, SGD01, _no_state(spec), "vectorized")
    assert ran == ["small_epoch", "examples_epoch", "examples_epoch"]


def test_float32_exp_polynomial_is_within_about_one_ulp_and_keeps_the_edges():
    """numba_kernels.exp_nonpositive (the sigmoid/softmax/log-loss exp) for float32 against
    float64 np.exp: within 1.02 ulp of the exact value over the normal range (not always the
    nearer float: 20M random points in [-87, 0] had 24 at 1.00-1.016 ulp), e^0 = 1, 0 below
    float32's smallest normal (where the epochs flush anyway), -inf -> 0, NaN -> NaN; float64
    is libm's exp, unchanged."""
    from numba import njit

    from fastbp.kernels import numba_kernels as K

    @njit
    def run(x, out):
        for i in range(x.size):
            out[i] = K.exp_nonpositive(x[i])

    rng = np.random.default_rng(0)
    x = -np.concatenate([np.linspace(0, 87.3, 200001), np.abs(rng.standard_normal(10000)), rng.random(1000000) * 87.0,
                         [59.945602], np.float32(2.0) ** -np.arange(1, 60)]).astype(np.float32)
    out = np.empty_like(x)
    run(x, out)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(out - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() < 1.02, ulps.max()
    edges = np.array([0.0, -0.0, -87.32, -87.34, -100.0, -np.inf, np.nan], np.float32)
    got = np.empty_like(edges)
    run(edges, got)
    assert got[0] == got[1] == 1.0 and got[2] > 0 and got[3] == got[4] == got[5] == 0.0 and np.isnan(got[6])
    x64, out64 = -np.linspace(0, 700, 1001), np.empty(1001)
    run(x64, out64)
    np.testing.assert_allclose(out64, np.exp(x64), rtol=4e-16, atol=0)  # libm vs NumPy's SIMD exp: <= 1 ulp


def test_float32_logs_are_within_about_one_and_a_half_ulp_and_keep_the_edges():
    """numba_kernels.log1p_unit (the log-loss tail, x in [0, 1]) and log_positive (softmax's
    log of its exps' sum, x >= 1) for float32 against float64 libm: within 1.5 ulp (Cephes'
    logf polynomial), log1p_unit within 1 (the bits that x - 1 drops for x < 1/2 added back),
    exact at 0 and 1 respectively, NaN -> NaN, inf -> inf; float64 is libm's,
    unchanged."""
    from numba import njit

    from fastbp.kernels import numba_kernels as K

    @njit
    def run(x, out, which):
        for i in range(x.size):
            out[i] = K.log1p_unit(x[i]) if which == 0 else K.log_positive(x[i])

    rng = np.random.default_rng(1)
    cases = ((np.log1p, np.concatenate([np.linspace(0, 1, 1000001), np.geomspace(1e-38, 1, 100000), rng.random(10**6),
                                        rng.uniform(0.41, 0.5, 10**6),
                                        [0.41421354, 0.41421357, 0.5, 1.0]]), 0),
             (np.log, np.concatenate([np.linspace(1, 64, 1000001), np.geomspace(1, 3e38, 100000), [1.4142135, 1.4142137,
                                                                                                   2.0, 1e30]]), 1))
    for exact_fn, x, which in cases:
        x = x.astype(np.float32)
        out = np.empty_like(x)
        run(x, out, which)
        exact = exact_fn(x.astype(np.float64))
        spacing = np.spacing(np.maximum(np.abs(exact), np.finfo(np.float32).tiny).astype(np.float32)).astype(np.float64)
        ulps = np.abs(out - exact) / spacing
        assert ulps.max() < (1.0 if which == 0 else 1.5), (which, ulps.max(), x[ulps.argmax()])
        edges = np.array([0.0 if which == 0 else 1.0, np.nan] + ([np.inf] if which else []), np.float32)
        got = np.empty_like(edges)
        run(edges, got, which)
        assert got[0] == 0.0 and np.isnan(got[1]) and (which == 0 or got[2] == np.inf)
        x64 = x[:1000].astype(np.float64)
        out64 = np.empty_like(x64)
        run(x64, out64, which)
        np.testing.assert_allclose(out64, exact_fn(x64), rtol=4e-16, atol=0)  # libm vs NumPy's SIMD: <= 1 ulp


@pytest.mark.parametrize("a_shape,b_shape,out_shape", [((2, 3), (4, 5), (2, 5)), ((2, 3), (3, 5), (3, 5)),
                                                       ((3, 2), (3, 5), (2, 5))])
def test_matmul_and_hidden_delta_refuse_mismatched_shapes(a_shape, b_shape, out_shape):
    """A BLAS call trusts its dimensions: mismatched ones must go to the reference, which raises,
    never read or write past an array."""
    a, b, out = np.ones(a_shape), np.ones(b_shape), np.zeros(out_shape)
    with pytest.raises(ValueError):
        NB.matmul(a, b, out)
    assert not out.any()
    z = np.zeros(out_shape)
    with pytest.raises(ValueError):
        NB.hidden_delta("relu", a, b, z, z, out)


def test_a_helper_process_compiles_the_backward_half_of_a_cold_batch_epoch_into_the_cache(tmp_path):
    """numba_compile's signatures are the ones the epoch looks up: after the helper ran, a cold
    process's first mini-batch fit loads batch_backward and _apply_update instead of compiling."""
    import os
    import subprocess
    import sys

    from fastbp.kernels import numba_compile

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTBP_COMPILE_HELPER="0")
    subprocess.run([sys.executable, "-m", "fastbp.kernels.numba_compile", "batch", "float64"], env=env, check=True,
                   timeout=600)
    probe = ("import numpy as np, fastbp as fb\n"
             "from fastbp.kernels import numba_kernels as K\n"
             "with fb.use_backend('numba'):\n"
             "    net = fb.MLP([3, 4, 2], loss='cross_entropy', dtype='float64', seed=0)\n"
             "    net.fit(np.ones((8, 3)), np.arange(8) % 2, epochs=1, batch_size=4, progress=False)\n"
             "print(sum(K.batch_backward.stats.cache_hits.values()), sum(K._apply_update.stats.cache_hits.values()))\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=600, capture_output=True, text=True)
    assert [int(v) for v in out.stdout.split()] == [1, 1]
    assert numba_compile.start("no such entry", "float64") is None


def test_a_cold_teams_callback_compiles_in_a_helper_while_the_fit_goes_on_alone(monkeypatch):
    """ready_team: a callback not in the disk cache goes to a helper process and the caller runs
    on one thread until the helper is done, then gets the team (loading the callback)."""
    from fastbp.kernels import numba_compile
    from fastbp.kernels import numba_kernels as K

    if not NB._teams_possible(2, "example"):
        pytest.skip(f"no team here: {NB.team_description()}")

    class Helper:
        def __init__(self, polls):
            self.polls, self.killed = polls, False

        def poll(self):
            return self.polls.pop(0)

        def kill(self):
            self.killed = True

        def wait(self):
            assert self.killed

    started, helpers = [], [Helper([None, 0]), Helper([None])]  # polled from the second call on
    monkeypatch.setattr(K, "callback_loaded", lambda dtype, kind: False)
    monkeypatch.setattr(K, "callback_cached", lambda dtype, kind: False)
    monkeypatch.setattr(numba_compile, "start", lambda entry, dtype: started.append((entry, dtype)) or helpers.pop(0))
    monkeypatch.setattr(NB, "_callback_helpers", {})
    alone, dt, wide = K.alone().tolist(), np.dtype("float64"), 2 * K.PART_MIN
    assert NB.ready_team(2, dt, "example", wide - 1).tolist() == alone and started == []  # too short
    assert NB.ready_team(2, dt, "example", wide).tolist() == alone  # started, running
    assert NB.ready_team(2, dt, "example", wide).tolist() == alone  # still running
    team = NB.ready_team(2, dt, "example", wide)  # done
    assert team[K.TEAM_THREADS] == 2 and team[K.TEAM_CALLBACK] == K.pass_callback("float64", "example")
    assert started == [("example_callback", "float64")] and NB._callback_helpers == {}
    assert NB.ready_team(1, dt, "example", wide).tolist() == alone
    late = helpers[0]  # a helper past its deadline is killed and this process compiles the callback
    assert NB.ready_team(2, dt, "example", wide).tolist() == alone
    monkeypatch.setattr(type(NB), "HELPER_DEADLINE_S", 0.0)
    assert NB.ready_team(2, dt, "example", wide)[K.TEAM_THREADS] == 2 and late.killed and NB._callback_helpers == {}


def test_the_helper_compiles_a_teams_callback_into_the_cache(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    probe = ("import numpy as np\nfrom fastbp.kernels import numba_kernels as K\n"
             "print(K.callback_cached(np.float64, 'example'))\n")
    before = subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=600, capture_output=True,
                            text=True)
    subprocess.run([sys.executable, "-m", "fastbp.kernels.numba_compile", "example_callback", "float64"], env=env,
                   check=True, timeout=600)
    after = subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=600, capture_output=True,
                           text=True)
    assert (before.stdout.split()[-1], after.stdout.split()[-1]) == ("False", "True")


def test_every_kernel_sets_fastmath_itself():
    # A Numba function that leaves fastmath unset inherits its caller's: the plain SGD step,
    # compiled first from a fast-math per-example kernel, used FMA and came out 1 ulp off
    # NumPy's in whichever process compiled in that order. Every kernel says what it wants.
    from numba.core.registry import CPUDispatcher

    from fastbp.kernels import numba_kernels as K

    kernels = {name: f for name, f in vars(K).items() if isinstance(f, CPUDispatcher)}
    assert len(kernels) > 40
    unset = sorted(name for name, f in kernels.items() if "fastmath" not in f.targetoptions)
    assert unset == []
    assert kernels["apply_update"].targetoptions["fastmath"] in (False, set())


@pytest.mark.parametrize("rule", [RULE_CASES[5], RULE_CASES[1], RULE_CASES[2],
                                  RULE_CASES[6], RULE_CASES[3], RULE_CASES[4]],
                         ids=["momentum", "nesterov-decay", "momentum-l2", "adam", "adam-decay", "adamw"])
def test_the_fused_per_example_update_rounds_as_the_flat_update(rule):
    """rank1_step (fast-math: the rule inlined into a dot-product kernel) against the outer
    product into a gradient buffer and then _update_range (no fast-math), float32, bit for bit:
    the rules' operations are ones fast-math cannot fuse into FMAs (numba_kernels._mul etc.)."""
    from fastbp.kernels import numba_kernels as K

    rng = np.random.default_rng(21)
    n_out, n_in = 7, 13
    n = n_out * n_in + n_out
    P = rng.standard_normal(n).astype(np.float32)
    S = (rng.standard_normal((rule.n_buffers, n)) * 0.1).astype(np.float32)
    S[1:] = np.abs(S[1:])  # Adam's second moment
    d, x = rng.standard_normal(n_out).astype(np.float32), rng.standard_normal(n_in).astype(np.float32)
    c = K.rule_scalars(rule.hyper(), 4, np.float32(1.0))  # back in Python its floats are float64 again
    c = tuple(np.float32(v) if isinstance(v, float) else v for v in c)
    l2 = np.float32(rule.l2)
    fused, fused_state = P.copy(), S.copy()
    K.rank1_step(c, fused, fused_state, 0, n_out * n_in, n_out, n_in, d, 0, x, 0, l2)
    G = np.concatenate([(d[:, None] * x[None, :]).ravel(), d])  # each product rounded once, as there
    flat, flat_state = P.copy(), S.copy()
    K._update_range(c, flat, G, flat_state, 0, n_out * n_in, l2)
    K._update_range(c, flat, G, flat_state, n_out * n_in, n, np.float32(0.0))
    np.testing.assert_array_equal(fused, flat)
    np.testing.assert_array_equal(fused_state, flat_state)


# ---------------------------------------------------------------- update passes on the BLAS threads

def _team_or_skip(dtype):
    team = NB.team(2, np.dtype(dtype))
    if team[0] < 2:
        pytest.skip(f"no team here: {NB.team_description()}")
    return team


def test_parts_cover_the_span_once_on_line_boundaries():
    from fastbp.kernels import numba_kernels as K

    rng = np.random.default_rng(5)
    for _ in range(300):
        lo = int(rng.integers(0, 5000))
        hi = lo + int(rng.integers(1, 100_000))
        parts = int(rng.integers(1, 9))
        bounds = [K._part(lo, hi, t, parts) for t in range(parts)]
        assert bounds[0][0] == lo and bounds[-1][1] == hi
        assert all(a <= b for a, b in bounds) and all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
        assert all((b - lo) % K.PASS_ALIGN == 0 for _, b in bounds[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_ID)
def test_an_update_pass_on_the_team_rounds_as_on_one_thread(rule, dtype):
    """apply_update with a layer of two parts' weights split between two threads: every parameter and
    state entry bit-identical to the one-thread pass (a part left undone or done twice differs)."""
    from fastbp.kernels import numba_kernels as K

    team = _team_or_skip(dtype)
    spec = NetSpec((301, 131, 7), "relu", "softmax", "cross_entropy", np.dtype(dtype))  # 39431 weights: two parts
    assert K._team_parts(team, spec.sizes[0] * spec.sizes[1]) == 2
    rng = np.random.default_rng(6)
    params0 = rng.standard_normal(spec.n_params).astype(dtype)
    state0 = (rng.standard_normal((rule.n_buffers, spec.n_params)) ** 2 * 0.01).astype(dtype)
    grads = [rng.standard_normal(spec.n_params).astype(dtype) for _ in range(3)]
    out = []
    for t in (team, K.alone()):
        params, state, step = params0.copy(), state0.copy(), np.array([3], np.int64)
        for g in grads:
            K.apply_update(rule.hyper(), step, NB._spec(spec)[0], params, g, state, 16, t)
        out.append((params, state, step))
    for got, want in zip(*out):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_momentum_pass_on_the_team_rounds_as_on_one_thread(dtype):
    """The fused momentum step's pass (p -= m lr; M = m keep) split between two threads,
    against the one-thread pass: bit-identical."""
    from fastbp.kernels import numba_kernels as K

    team = _team_or_skip(dtype)
    rng = np.random.default_rng(8)
    T = np.dtype(dtype).type
    P0, M0 = rng.standard_normal(70_001).astype(dtype), rng.standard_normal(70_001).astype(dtype)
    got, want = (P0.copy(), M0.copy()), (P0.copy(), M0.copy())
    zero = T(0.0)
    K._team_pass(team, 2, K.TASK_SCALED_VELOCITY, got[0], got[0], got[1], got[1], 3, 69_998,
                 (T(0.05), T(0.9), zero, zero, zero, zero, zero))
    K._scaled_velocity_pass(want[0], want[1], 3, 69_998, T(0.05), T(0.9))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_a_mini_batch_epoch_with_team_passes_is_the_epoch_without(optimizer, monkeypatch):
    """fit on two threads with the update passes on the team and with them on this thread
    (784-200-10: its first layer's pass is split). To rounding, not bit for bit: MKL's GEMMs
    themselves may round differently from one fit to the next (its dynamic thread count and
    the buffers' alignment); the passes alone are bit-identical (the tests above)."""
    import fastbp as fb

    _team_or_skip("float32")
    rng = np.random.default_rng(7)
    X, y = rng.random((192, 784), dtype=np.float32), rng.integers(0, 10, 192)
    got = []
    for on in (True, False):
        monkeypatch.setattr(type(NB), "TEAM_PASSES", on)
        with fb.use_backend("numba"):
            net = fb.MLP([784, 200, 10], activation="relu", loss="cross_entropy", dtype="float32", seed=0)
        opt = fb.optim.SGD(lr=0.05, momentum=0.9) if optimizer == "momentum" else fb.optim.Adam(lr=1e-3)
        net.fit(X, y, epochs=2, batch_size=64, optimizer=opt, seed=1, threads=2, progress=False)
        got.append(np.concatenate([a.ravel() for part in net.get_params() for a in part]))
    np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-6)


def test_the_team_is_one_thread_unless_mkl_runs_on_libgomp(monkeypatch):
    import dataclasses

    from fastbp.kernels import blas
    from fastbp.kernels import numba_kernels as K

    alone = K.alone().tolist()
    assert alone[K.TEAM_THREADS] == 1 and not any(alone[1:])
    assert NB.team(1, np.dtype("float32")).tolist() == alone
    monkeypatch.setattr(NB, "blas_library", dataclasses.replace(NB.blas_library, omp_parallel=0, omp_thread_num=0))
    assert NB.team(2, np.dtype("float32")).tolist() == alone
    assert "on the calling thread" in NB.info()["update_passes"]
    monkeypatch.undo()
    monkeypatch.setattr(type(NB), "TEAM_PASSES", False)
    assert NB.team(2, np.dtype("float64")).tolist() == alone
    monkeypatch.undo()
    monkeypatch.setattr(blas, "_CHILD_CAP", 1)  # a forked child: libgomp's pool is gone
    assert NB.team(2, np.dtype("float32")).tolist() == alone


def test_per_example_rows_go_to_libgomps_own_pool_beside_another_blas(monkeypatch):
    """Beside OpenBLAS the per-example rows still get a team, libgomp's own pool (a
    per-example epoch calls no BLAS); the update passes do not (the two pools would fight for
    the cores: 7-14x slower, benchmarks/results/own-pool-update-passes-ab-20261207T141000Z.json); a
    process forked after that pool was asked for gets none."""
    import dataclasses

    from fastbp.kernels import blas
    from fastbp.kernels import numba_kernels as K

    if not all(blas._libgomp_team()):
        pytest.skip("libgomp is not loadable here")
    monkeypatch.setattr(NB, "blas_library", dataclasses.replace(NB.blas_library, omp_parallel=0, omp_thread_num=0,
                                                                omp_num_threads=0))
    team = NB.team(2, np.dtype("float32"), "example")
    assert team[K.TEAM_THREADS] == 2 and tuple(team[1:4]) == blas._libgomp_team()
    assert NB.team(2, np.dtype("float32"), "update").tolist() == K.alone().tolist()
    assert "libgomp's own pool" in NB.team_description()
    monkeypatch.setattr(blas, "_OWN_POOL_PID", os.getpid() + 1)  # as in a forked child
    assert blas.own_libgomp() == (0, 0, 0)
    assert NB.team(2, np.dtype("float32"), "example").tolist() == K.alone().tolist()


def test_a_pass_is_cut_into_parts_of_at_least_part_min():
    from fastbp.kernels import numba_kernels as K

    team = np.array([16, 1, 1, 1, 1], np.int64)  # never run: only its size is read
    assert K._team_parts(team, 2 * K.PART_MIN - 1) == 1
    assert K._team_parts(team, 2 * K.PART_MIN) == 2
    assert K._team_parts(team, 100 * K.PART_MIN) == 16
    assert K._team_parts(K.alone(), 100 * K.PART_MIN) == 1
    assert K._team_parts(team[:0], 100 * K.PART_MIN) == 1


class _SerialTeam:
    """A stand-in for libgomp: its "GOMP_parallel" runs the callback ``granted`` times on this
    thread, as threads 0 .. granted-1 of a region of ``granted`` threads (what OMP_DYNAMIC,
    OMP_THREAD_LIMIT or a nested region may grant, whatever was asked), and records what
    each call asked for. Runs anywhere: no MKL or libgomp needed."""

    def __init__(self, granted):
        import ctypes

        self.granted, self.thread, self.asked = granted, 0, []
        callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

        def parallel(fn, data, threads, flags):
            self.asked.append(threads)
            for self.thread in range(self.granted):
                callback_type(fn)(data)
            self.thread = 0

        self._keep = (ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(parallel),
                      ctypes.CFUNCTYPE(ctypes.c_int)(lambda: self.thread),
                      ctypes.CFUNCTYPE(ctypes.c_int)(lambda: self.granted))
        self.addresses = [ctypes.cast(f, ctypes.c_void_p).value for f in self._keep]

    def team(self, threads, dtype, kind="update"):
        from fastbp.kernels import numba_kernels as K

        return np.array([threads, *self.addresses, K.pass_callback(dtype, kind)], np.int64)


@pytest.mark.parametrize("granted", [1, 2, 3])
@pytest.mark.parametrize("parts", [2, 3])
def test_every_part_runs_whatever_threads_the_region_is_granted(parts, granted):
    """A region granted fewer threads than parts (or more): each part once, bit-identical."""
    from fastbp.kernels import numba_kernels as K

    fake = _SerialTeam(granted)
    rng = np.random.default_rng(8)
    P0, M0 = rng.standard_normal(70_001).astype(np.float32), rng.standard_normal(70_001).astype(np.float32)
    got, want = (P0.copy(), M0.copy()), (P0.copy(), M0.copy())
    zero = np.float32(0.0)
    K._team_pass(fake.team(parts, np.float32), parts, K.TASK_SCALED_VELOCITY, got[0], got[0], got[1], got[1], 3,
                 69_998, (np.float32(0.05), np.float32(0.9), zero, zero, zero, zero, zero))
    K._scaled_velocity_pass(want[0], want[1], 3, 69_998, np.float32(0.05), np.float32(0.9))
    assert fake.asked == [parts]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_a_mini_batch_epoch_on_a_one_thread_region_is_the_epoch_alone(optimizer, dtype):
    """batch_epoch's momentum pass and apply_update's passes handed to a team whose region
    gets one thread: they ran there (the stand-in was called) and every part was done."""
    from fastbp.kernels import numba_kernels as K

    spec = NetSpec((301, 131, 7), "relu", "softmax", "cross_entropy", np.dtype(dtype))
    rule = UpdateRule("sgd", lr=0.05, momentum=0.9) if optimizer == "momentum" else UpdateRule("adam", lr=1e-3)
    rng = np.random.default_rng(10)
    X = rng.random((96, 301)).astype(dtype)
    Y = np.eye(7, dtype=dtype)[rng.integers(0, 7, 96)]
    params0 = (rng.standard_normal(spec.n_params) * 0.05).astype(dtype)
    fake = _SerialTeam(1)
    codes = NB._spec(spec)
    out = []
    for team in (fake.team(2, dtype), K.alone()):
        params, grads = params0.copy(), np.zeros_like(params0)
        state = np.zeros((rule.n_buffers, spec.n_params), dtype)
        step, work = np.zeros(1, np.int64), np.empty(NB._workspace(spec, 32, np.dtype(dtype)).size, dtype)
        plan = K.batch_plan(NB.FORWARD_BLAS_MIN, NB.BACKWARD_BLAS_MIN, team=team)
        K.batch_epoch(*codes, params, grads, X, Y, np.arange(0, dtype=np.int64), 32, rule.hyper(), step, state, work, plan)
        K.apply_update(rule.hyper(), step, codes[0], params, grads, state, 32, team)
        out.append((params, state, step))
    assert len(fake.asked) == 4 and set(fake.asked) == {2}  # 3 steps of batch_epoch, then apply_update
    for got, want in zip(*out):
        np.testing.assert_array_equal(got, want)


def _example_team_or_skip(source, dtype):
    """The per-example team: MKL's libgomp pool, or a stand-in whose region gets one thread."""
    if source == "libgomp":
        team = NB.team(2, np.dtype(dtype), "example")
        if team[0] < 2:
            pytest.skip(f"no team here: {NB.team_description()}")
        return team, None
    fake = _SerialTeam(1)
    return fake.team(2, dtype, "example"), fake


@pytest.mark.parametrize("source", ["libgomp", "one-thread-region"])
@pytest.mark.parametrize("sizes", [(301, 131, 7), (301, 131, 20, 7)], ids=["one-hidden", "two-hidden"])
@pytest.mark.parametrize("rule", RULE_CASES, ids=RULE_ID)
def test_per_example_rows_on_the_team_round_as_on_one_thread(rule, sizes, source):
    """examples_epoch with the first layer's rows (39k weights) on two threads -- each
    thread's update, then the next example's z and activation for its rows -- against one
    thread: the same parameters, state, cost and count bit for bit, in a shuffled order, and
    stopping at the same example before a NaN row. On the stand-in the team ran once an
    example and its one thread did both parts."""
    from fastbp.kernels import numba_kernels as K

    team, fake = _example_team_or_skip(source, "float32")
    spec = NetSpec(sizes, "relu", "softmax", "cross_entropy", np.dtype("float32"))
    rng = np.random.default_rng(9)
    params0 = (rng.standard_normal(spec.n_params) * 0.05).astype(np.float32)
    X = rng.random((40, sizes[0]), dtype=np.float32)
    Y = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], 40)]
    order = rng.permutation(40).astype(np.int64)
    work = np.empty(3 * sum(sizes), np.float32)
    for Xe, expect_done in ((X, 40), (np.where(np.arange(40)[:, None] == order[25], np.nan, X).astype(np.float32), 25)):
        out = []
        for on_team in (True, False):
            params, state, step = params0.copy(), np.zeros((rule.n_buffers, spec.n_params), np.float32), np.zeros(1, np.int64)
            hp, codes = rule.hyper(), NB._spec(spec)
            t = K.example_team(team, codes[0], codes[1], params, state, Xe, hp, work) if on_team else team[:0]
            if fake is not None:
                fake.asked.clear()
            total, done, correct = K.examples_epoch(*codes, params, Xe, Y, order, hp, step, state, work, t)
            if fake is not None and on_team:
                assert fake.asked == [2] * expect_done
            out.append((params, state, step, total, done, correct))
        assert out[0][4] == out[1][4] == expect_done
        for got, want in zip(*out):
            np.testing.assert_array_equal(got, want)


def test_per_example_rows_in_float64_and_a_softmax_hidden_layer():
    """float64 rows on the (one-thread-region) team bit for bit; a softmax hidden layer's rows
    are not independent, so they never go to the team."""
    from fastbp.kernels import numba_kernels as K

    rule = UpdateRule("adam", lr=1e-3)
    for dtype, hidden, expect_calls in (("float64", "relu", 30), ("float32", "softmax", 0)):
        fake = _SerialTeam(1)
        team = fake.team(2, dtype, "example")
        spec = NetSpec((301, 131, 7), hidden, "softmax", "cross_entropy", np.dtype(dtype))
        rng = np.random.default_rng(11)
        params0 = (rng.standard_normal(spec.n_params) * 0.05).astype(dtype)
        X, Y = rng.random((30, 301)).astype(dtype), np.eye(7, dtype=dtype)[rng.integers(0, 7, 30)]
        work = np.empty(3 * sum(spec.sizes), dtype)
        out = []
        for on_team in (True, False):
            params, state, step = params0.copy(), np.zeros((2, spec.n_params), dtype), np.zeros(1, np.int64)
            hp, codes = rule.hyper(), NB._spec(spec)
            t = K.example_team(team, codes[0], codes[1], params, state, X, hp, work) if on_team else K.alone()
            out.append((params, state, *K.examples_epoch(*codes, params, X, Y, np.arange(0, dtype=np.int64), hp, step,
                                                         state, work, t)))
        assert len(fake.asked) == expect_calls
        for got, want in zip(*out):
            np.testing.assert_array_equal(got, want)


def test_generated_small_kernels_compile_with_slp_once_per_dtype():
    """_SLPCompiled compiles each parameter dtype once with Numba's SLP setting on, calls with it
    off, and puts it back when the compile raises."""
    import numba

    from fastbp.kernels.numba import _SLPCompiled

    seen = []

    class Dispatcher:
        overloads = {}
        fail = False

        def compile(self, signature):
            seen.append(("compile", str(signature[4]), numba.config.SLP_VECTORIZE))
            if self.fail:
                raise KeyboardInterrupt
            self.overloads[signature] = True

        def __call__(self, *args):
            seen.append(("call", str(numba.typeof(args[4])), numba.config.SLP_VECTORIZE))

    kernel = _SLPCompiled(Dispatcher())
    args = [np.zeros(2, np.int64), 0, 0, 0]
    kernel(*args, np.zeros(3, np.float32))
    kernel(*args, np.zeros(3, np.float32))
    kernel(*args, np.zeros(3))
    assert seen == [("compile", "array(float32, 1d, C)", 1), ("call", "array(float32, 1d, C)", 0),
                    ("call", "array(float32, 1d, C)", 0), ("compile", "array(float64, 1d, C)", 1),
                    ("call", "array(float64, 1d, C)", 0)]
    failing = _SLPCompiled(Dispatcher())
    failing.dispatcher.overloads, failing.dispatcher.fail = {}, True
    with pytest.raises(KeyboardInterrupt):
        failing(*args, np.zeros(3, np.int32))
    assert numba.config.SLP_VECTORIZE == 0 and failing.overloads == {}  # delegated to the dispatcher


@pytest.mark.parametrize("rows", [3, 4])
def test_small_kernel_takes_a_state_with_extra_rows(rows):
    """A small net's per-example kernel with more state rows than its rule reads (train_epoch
    accepts them): the rule's rows train as with exactly two, the others stay as they were."""
    spec = NetSpec((2, 8, 1), "sigmoid", "sigmoid", "log_loss", np.dtype("float32"))
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 2)).astype(np.float32)
    Y = (X[:, :1] * X[:, 1:] > 0).astype(np.float32)
    params0 = (rng.standard_normal(spec.n_params) * 0.5).astype(np.float32)
    rule = UpdateRule("adam", lr=0.01)
    out = []
    for n_rows in (2, rows):
        params, state = params0.copy(), OptimizerState(np.full((n_rows, spec.n_params), 0.25, np.float32))
        NB.train_epoch(spec, params, np.empty_like(params), X, Y, 1, rule, state, "vectorized")
        out.append((params, state.buffers))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1][:2])
    assert (out[1][1][2:] == np.float32(0.25)).all()
