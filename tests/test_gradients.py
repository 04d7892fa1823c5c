"""Backprop is exact: both strategies, every backend, against the textbook reference and
central finite differences (float64)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastbp as fb
from conftest import TOL, make_data
from reference import mean_gradients

ACTIVATIONS = ["sigmoid", "relu", "tanh", "identity", "leaky_relu"]
LOSSES = ["mse", "log_loss", "cross_entropy"]
# Outputs checked against finite differences for any weights. log_loss and cross_entropy are
# computed from the logits only with their own outputs; with another output they read a
# clipped activation, where 1 - a loses digits as a nears 1 (covered at moderate logits below).
OUTPUTS = {"mse": ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax"],
           "log_loss": ["sigmoid"], "cross_entropy": ["softmax"]}


def _flat(grads):
    dWs, dbs = grads
    return np.concatenate([fb.to_numpy(g).ravel() for g in dWs + dbs])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_strategies_agree_and_match_reference(backend, activation, loss):
    net = fb.MLP([5, 7, 4, 3], activation=activation, loss=loss, dtype="float64", seed=3)
    X, Y = make_data(11, 5, 3, loss, seed=1)
    vec = net.gradients(X, Y, strategy="vectorized")
    loop = net.gradients(X, Y, strategy="loop")
    np.testing.assert_allclose(_flat(loop), _flat(vec), **TOL["float64"])

    W, b = net.get_params()
    cost, dWs, dbs = mean_gradients(W, b, activation, net.output, loss, X, Y)
    np.testing.assert_allclose(_flat(vec), _flat((dWs, dbs)), **TOL["float64"])
    assert net.loss(X, Y) == pytest.approx(cost, rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_float32_matches_float64_reference(backend, loss):
    net = fb.MLP([6, 9, 4], activation="tanh", loss=loss, dtype="float32", seed=5)
    X, Y = make_data(16, 6, 4, loss, seed=2)
    W, b = net.get_params()
    _, dWs, dbs = mean_gradients([w.astype(float) for w in W], [v.astype(float) for v in b],
                                 "tanh", net.output, loss, X, Y)
    for strategy in ("vectorized", "loop"):
        np.testing.assert_allclose(_flat(net.gradients(X, Y, strategy=strategy)), _flat((dWs, dbs)),
                                   **TOL["float32"])


@settings(max_examples=60, deadline=None, derandomize=True,  # the same cases in every CI run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       activation=st.sampled_from(ACTIVATIONS), loss=st.sampled_from(LOSSES),
       n=st.integers(1, 6), seed=st.integers(0, 2**16), data=st.data())
def test_gradients_match_central_differences(backend, sizes, activation, loss, n, seed, data):
    assume(loss != "cross_entropy" or sizes[-1] >= 2)  # a softmax over one output is refused
    output = data.draw(st.sampled_from([None] + OUTPUTS[loss]))
    net = fb.MLP(sizes, activation=activation, loss=loss, output=output, dtype="float64", seed=seed)
    # Nonzero biases: with zero ones a dead relu layer puts the next z exactly on the kink at 0,
    # where no finite difference matches a one-sided derivative. Glorot/He weights keep z = O(1),
    # away from saturation, where the cost no longer resolves a step of eps.
    rng = np.random.default_rng(seed)
    net.set_params(net.get_params()[0], [rng.normal(0, 0.5, b.shape) for b in net.get_params()[1]])
    X, Y = make_data(n, sizes[0], sizes[-1], loss, seed=seed)
    assert fb.gradcheck(net, X, Y) < 1e-6


@pytest.mark.parametrize("loss,output", [("log_loss", "softmax"), ("cross_entropy", "sigmoid"),
                                         ("log_loss", "tanh"), ("cross_entropy", "relu")])
def test_non_logit_outputs_match_central_differences(backend, loss, output):
    """Other outputs with log/cross-entropy: dc/da on the clipped activation, then phi'.
    Where clipping bites (tanh/relu outputs <= 0) the clipped cost is flat: zero gradient."""
    net = fb.MLP([3, 4, 3], activation="tanh", loss=loss, output=output, dtype="float64", seed=4)
    X, Y = make_data(8, 3, 3, loss, seed=4)
    assert fb.gradcheck(net, 0.5 * X, Y) < 1e-6


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    """The check itself can fail: corrupt one kernel and it reports a large error."""
    with fb.use_backend("numpy") as be:
        net = fb.MLP([3, 4, 2], activation="tanh", loss="mse", dtype="float64", seed=0)
        X, Y = make_data(5, 3, 2, "mse")
        original = type(be).bias_grad

        def wrong_bias_grad(self, delta, out, *, alpha=1.0, accumulate=False):
            original(self, delta, out, alpha=2 * alpha, accumulate=accumulate)

        monkeypatch.setattr(type(be), "bias_grad", wrong_bias_grad)
        assert fb.gradcheck(net, X, Y) > 0.1


def test_one_one_one_sigmoid_chain_by_hand(backend):
    # x -> z1 = w1 x + b1, a1 = s(z1) -> z2 = w2 a1 + b2, a2 = s(z2); c = (a2 - y)^2 / 2
    w1, b1, w2, b2, x, y = 0.5, -0.2, 1.5, 0.1, 0.8, 1.0
    s = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    a1 = s(w1 * x + b1)
    a2 = s(w2 * a1 + b2)
    d2 = (a2 - y) * a2 * (1 - a2)
    d1 = d2 * w2 * a1 * (1 - a1)
    net = fb.MLP([1, 1, 1], activation="sigmoid", loss="mse", output="sigmoid", dtype="float64")
    net.set_params([[[w1]], [[w2]]], [[b1], [b2]])
    (dW1, dW2), (db1, db2) = net.gradients([[x]], [[y]])
    got = [float(fb.to_numpy(g).ravel()[0]) for g in (dW1, db1, dW2, db2)]
    np.testing.assert_allclose(got, [d1 * x, d1, d2 * a1, d2], rtol=1e-13)


def test_logistic_regression_gradient_is_a_minus_y_times_x(backend):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(6, 3)), rng.integers(0, 2, 6).astype(float)
    lr = fb.LogisticRegression(3, dtype="float64", seed=1)
    w, b = (p[0] for p in lr.get_params())
    a = 1 / (1 + np.exp(-(X @ w.ravel() + b[0])))
    (dW,), (db,) = lr.gradients(X, y)
    np.testing.assert_allclose(fb.to_numpy(dW).ravel(), ((a - y)[:, None] * X).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fb.to_numpy(db), [(a - y).mean()], rtol=1e-12)
    np.testing.assert_allclose(lr.predict(X).ravel(), a, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss,output", [("log_loss", "sigmoid"), ("cross_entropy", "softmax"),
                                         ("log_loss", "softmax"), ("cross_entropy", "sigmoid")])
def test_extreme_logits_stay_finite(backend, dtype, loss, output):
    """Logits up to +-1e4: loss and gradients finite, and the loss has the right value."""
    net = fb.MLP([2, 3], activation="identity", loss=loss, output=output, dtype=dtype)
    net.set_params([np.array([[1e4, 0.0], [-1e4, 0.0], [0.0, 1.0]])], [np.zeros(3)])
    X = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])  # logits rows: (1e4,-1e4,0), (-1e4,1e4,0), (0,0,1)
    Y = np.eye(3)[[1, 0, 2]]  # rows 1 and 2 put the target on the -1e4 logit
    loss_value = net.loss(X, Y)
    dWs, dbs = net.gradients(X, Y)
    assert np.isfinite(loss_value)
    assert all(np.isfinite(fb.to_numpy(g)).all() for g in dWs + dbs)
    assert np.isfinite(net.predict(X)).all()
    if (loss, output) == ("cross_entropy", "softmax"):
        # rows 1, 2: logsumexp - z_target = 1e4 - (-1e4); row 3: log(2 + e) - 1
        expected = (2e4 + 2e4 + np.log(2 + np.e) - 1) / 3
        assert loss_value == pytest.approx(expected, rel=1e-6)
    if (loss, output) == ("log_loss", "sigmoid"):
        # softplus(z) - y z per output: rows 1, 2 give 1e4 + 1e4 + log 2; row 3 2 log 2 + log(1 + 1/e)
        expected = (4e4 + 4 * np.log(2) + np.log1p(np.exp(-1))) / 3
        assert loss_value == pytest.approx(expected, rel=1e-6)


def test_shapes(backend):
    net = fb.MLP([4, 6, 5, 3], activation="relu", loss="cross_entropy", seed=0)
    assert [tuple(w.shape) for w in net.weights] == [(6, 4), (5, 6), (3, 5)]
    assert [tuple(b.shape) for b in net.biases] == [(6,), (5,), (3,)]
    X = np.zeros((7, 4))
    assert net.predict(X).shape == (7, 3)
    assert tuple(net.forward(X).shape) == (7, 3)
    dWs, dbs = net.gradients(X, np.zeros(7, dtype=int))
    assert [tuple(g.shape) for g in dWs] == [(6, 4), (5, 6), (3, 5)]
    assert [tuple(g.shape) for g in dbs] == [(6,), (5,), (3,)]
    np.testing.assert_allclose(net.predict(X).sum(axis=1), 1.0, rtol=1e-6)
    assert net.weights[0].dtype == np.float32


@pytest.mark.parametrize("init", ["auto", "he", "glorot", "normal"])
def test_same_seed_same_parameters_on_every_backend(init):
    params = []
    for name in fb.available_backends():
        with fb.use_backend(name):
            a = fb.MLP([5, 4, 2], activation="relu", seed=7, init=init, dtype="float64")
            b = fb.MLP([5, 4, 2], activation="relu", seed=7, init=init, dtype="float64")
            flat_a, flat_b = (np.concatenate([p.ravel() for p in sum(m.get_params(), [])]) for m in (a, b))
            np.testing.assert_array_equal(flat_a, flat_b)
            params.append(flat_a)
    for p in params[1:]:
        np.testing.assert_array_equal(p, params[0])
    # Only the seed differs (same sizes, activation, init and dtype), so the parameters must too;
    # comparing across dtypes or activations would pass even if the seed were ignored.
    c = fb.MLP([5, 4, 2], activation="relu", seed=8, init=init, dtype="float64")
    flat_c = np.concatenate([p.ravel() for p in sum(c.get_params(), [])])
    assert not np.array_equal(flat_c, params[0])


def test_initialisation_scales():
    he = fb.MLP([400, 300, 1], activation="relu", seed=0, dtype="float64").get_params()[0][0]
    assert he.std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    glorot = fb.MLP([400, 300, 1], activation="tanh", seed=0, dtype="float64").get_params()[0][0]
    assert np.abs(glorot).max() <= np.sqrt(6 / 700)
    assert glorot.std() == pytest.approx(np.sqrt(6 / 700) / np.sqrt(3), rel=0.05)
    w, b = fb.MLP([400, 300, 1], init="normal", seed=0, dtype="float64").get_params()
    assert w[0].std() == pytest.approx(1.0, rel=0.05) and b[0].std() == pytest.approx(1.0, rel=0.2)


def test_ops_are_the_dispatched_kernels(backend):
    xp = backend.xp
    rng = np.random.default_rng(0)
    a, b = xp.asarray(rng.normal(size=(3, 4))), xp.asarray(rng.normal(size=(5, 4)))
    np.testing.assert_allclose(fb.to_numpy(fb.ops.matmul(a, b, trans_b=True)), fb.to_numpy(a) @ fb.to_numpy(b).T)
    out = fb.ops.matmul(a, b, trans_b=True)
    fb.ops.matmul(a, b, out, trans_b=True, alpha=2.0, beta=1.0)
    np.testing.assert_allclose(fb.to_numpy(out), 3 * fb.to_numpy(a) @ fb.to_numpy(b).T)
    np.testing.assert_allclose(fb.to_numpy(fb.ops.hadamard(a, a)), fb.to_numpy(a) ** 2)
    x, y = xp.asarray(rng.normal(size=3)), xp.asarray(rng.normal(size=4))
    acc = fb.ops.outer(x, y)
    fb.ops.outer(x, y, acc, accumulate=True)
    np.testing.assert_allclose(fb.to_numpy(acc), 2 * np.outer(fb.to_numpy(x), fb.to_numpy(y)))
    np.testing.assert_allclose(fb.to_numpy(fb.ops.bias_grad(a, alpha=0.5)), 0.5 * fb.to_numpy(a).sum(axis=0))
    p, g = xp.asarray(np.ones(4)), xp.asarray(np.arange(4.0))
    fb.ops.sgd_update(p, g, 0.5)
    np.testing.assert_allclose(fb.to_numpy(p), 1 - 0.5 * np.arange(4.0))
    with pytest.raises(ValueError, match="out must be given"):
        fb.ops.matmul(a, b, trans_b=True, beta=1.0)
