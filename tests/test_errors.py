"""Bad input: a clear ValueError/TypeError naming the argument, and nothing changed."""

import numpy as np
import pytest

import fastbp as fb


@pytest.fixture
def net():
    return fb.MLP([3, 4, 2], activation="relu", loss="cross_entropy", seed=0)


def _snapshot(net):
    W, b = net.get_params()
    return [p.copy() for p in W + b]


GOOD_X = np.zeros((5, 3))
GOOD_Y = np.array([0, 1, 1, 0, 1])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sizes=[3]), ValueError, "at least two"),
    (dict(sizes=5), TypeError, "sizes must be a sequence"),
    (dict(sizes="34"), TypeError, "sizes must be a sequence"),
    (dict(sizes=[3, 0, 2]), ValueError, r"sizes\[1\] out of range. Received: sizes\[1\]=0"),
    (dict(sizes=[3, 2.5]), TypeError, r"sizes\[1\] must be an int"),
    (dict(sizes=[3, True]), TypeError, r"sizes\[1\] must be an int"),
    (dict(sizes=[3, 2], activation="swish"), ValueError, r"activation=.swish.. Expected one of"),
    (dict(sizes=[3, 2], activation="softmax"), ValueError, "activation"),
    (dict(sizes=[3, 2], loss="hinge"), ValueError, r"loss=.hinge."),
    (dict(sizes=[3, 2], output="gelu"), ValueError, r"output=.gelu."),
    (dict(sizes=[3, 2], dtype="float16"), ValueError, r"dtype=.float16.. Expected one of \['float32', 'float64'\]"),
    (dict(sizes=[3, 2], dtype=int), ValueError, "dtype"),
    (dict(sizes=[3, 2], seed=-1), ValueError, r"seed out of range"),
    (dict(sizes=[3, 2], dtype=None), ValueError, "dtype"),
    (dict(sizes=[3, 2], seed="a"), TypeError, "seed"),
    (dict(sizes=[3, 2], init="xavier"), ValueError, r"init=.xavier."),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fb.MLP(**kwargs)


def test_logistic_regression_errors():
    with pytest.raises(ValueError, match="n_features"):
        fb.LogisticRegression(0)
    with pytest.raises(TypeError, match="n_features"):
        fb.LogisticRegression("3")


BAD_DATA = [
    (dict(X=None), TypeError, "X must be an array"),
    (dict(X=np.zeros((5, 4))), ValueError, r"X has the wrong shape. Received: ndarray of shape \(5, 4\).*Expected shape \(n_samples, 3\)"),
    (dict(X=np.zeros(3)), ValueError, "X has the wrong shape"),
    (dict(X=np.zeros((0, 3)), Y=np.zeros(0, int)), ValueError, "X is empty"),
    (dict(X=np.array([["a", "b", "c"]] * 5)), TypeError, "X must hold real numbers"),
    (dict(X=np.full((5, 3), np.nan)), ValueError, "X contains NaN or Inf"),
    (dict(X=np.full((5, 3), np.inf)), ValueError, "X contains NaN or Inf"),
    (dict(X=[[1, 2], [3]]), ValueError, "X could not be read"),
    (dict(Y=np.array([0, 1, 2, 0, 1])), ValueError, r"Y has class labels out of range. Received: labels in \[0, 2\]. Expected integers in \[0, 1\]"),
    (dict(Y=np.array([0, -1, 1, 0, 1])), ValueError, "out of range"),
    (dict(Y=np.array([0, 0.5, 1, 0, 1])), ValueError, "whole numbers"),
    (dict(Y=np.zeros((4, 2))), ValueError, r"Y has the wrong shape.*Expected shape \(5, 2\) or integer labels of shape \(5,\)"),
    (dict(Y=np.full((5, 2), np.nan)), ValueError, "Y contains NaN or Inf"),
    (dict(Y=-np.ones((5, 2))), ValueError, "non-negative"),
    (dict(Y=np.array(["a"] * 5)), TypeError, "Y must hold real numbers"),
]


@pytest.mark.parametrize("data,exc,match", BAD_DATA)
@pytest.mark.parametrize("call", ["fit", "gradients", "loss"])
def test_data_errors_change_nothing(net, call, data, exc, match):
    X, Y = data.get("X", GOOD_X), data.get("Y", GOOD_Y)
    before = _snapshot(net)
    with pytest.raises(exc, match=match):
        getattr(net, call)(X, Y)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("X,exc", [(np.zeros((2, 5)), ValueError), (None, TypeError), ([[np.nan] * 3], ValueError)])
def test_predict_errors(net, X, exc):
    with pytest.raises(exc, match="X"):
        net.predict(X)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(epochs=0), ValueError, r"epochs out of range. Received: epochs=0. Expected an int >= 1"),
    (dict(epochs=2.0), TypeError, "epochs must be an int"),
    (dict(batch_size=0), ValueError, "batch_size out of range"),
    (dict(batch_size=-3), ValueError, "batch_size"),
    (dict(batch_size=1.5), TypeError, "batch_size must be an int"),
    (dict(lr=0.0), ValueError, r"lr out of range. Received: lr=0.0"),
    (dict(lr=-1), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr must be a real number"),
    (dict(strategy="batched"), ValueError, r"strategy=.batched.. Expected one of \['vectorized', 'loop'\]"),
    (dict(shuffle="yes"), TypeError, "shuffle must be a bool"),
    (dict(progress="on"), TypeError, "progress"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(validation_data=np.zeros((2, 3))), TypeError, "validation_data must be a pair"),
    (dict(validation_data=(np.zeros((2, 4)), np.zeros(2, int))), ValueError, r"validation_data\[0\] has the wrong shape"),
    (dict(validation_data=(np.zeros((2, 3)), np.array([0, 5]))), ValueError, r"validation_data\[1\] has class labels"),
])
def test_fit_argument_errors_change_nothing(net, kwargs, exc, match):
    before = _snapshot(net)
    with pytest.raises(exc, match=match):
        net.fit(GOOD_X, GOOD_Y, progress=False, **{k: v for k, v in kwargs.items() if k != "progress"}) \
            if "progress" not in kwargs else net.fit(GOOD_X, GOOD_Y, **kwargs)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)


def test_gradients_unknown_strategy(net):
    with pytest.raises(ValueError, match="strategy"):
        net.gradients(GOOD_X, GOOD_Y, strategy="fast")


def test_log_loss_targets_out_of_range():
    lr = fb.LogisticRegression(3)
    with pytest.raises(ValueError, match=r"Y out of range for log_loss.*Expected targets in \[0, 1\]"):
        lr.fit(GOOD_X, np.array([0, 1, 2, 0, 1]), progress=False)


@pytest.mark.parametrize("weights,biases,match", [
    ([np.zeros((4, 3))], [np.zeros(4), np.zeros(2)], r"weights must be a list of 2 arrays"),
    ([np.zeros((4, 3)), np.zeros((3, 4))], [np.zeros(4), np.zeros(2)], r"weights\[1\] has the wrong shape. Received: \(3, 4\). Expected \(2, 4\)"),
    ([np.zeros((4, 3)), np.zeros((2, 4))], [np.zeros(4), np.full(2, np.inf)], r"biases\[1\] contains NaN or Inf"),
    ("W", [np.zeros(4), np.zeros(2)], "weights must be a list"),
])
def test_set_params_errors_change_nothing(net, weights, biases, match):
    before = _snapshot(net)
    with pytest.raises((ValueError, TypeError), match=match):
        net.set_params(weights, biases)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)


def test_gradcheck_argument_errors(net):
    with pytest.raises(TypeError, match="net must be a fastbp MLP"):
        fb.gradcheck("net", GOOD_X, GOOD_Y)
    with pytest.raises(ValueError, match="eps out of range"):
        fb.gradcheck(net, GOOD_X, GOOD_Y, eps=0)


def test_values_beyond_float32_are_rejected_not_turned_into_inf(net):
    """Finite float64 values that overflow float32 are caught before the cast."""
    before = _snapshot(net)
    huge = np.zeros((5, 3))
    huge[0, 0] = 1e39
    for call in (lambda: net.gradients(huge, GOOD_Y), lambda: net.loss(huge, GOOD_Y),
                 lambda: net.fit(huge, GOOD_Y, progress=False), lambda: net.predict(huge)):
        with pytest.raises(ValueError, match=r"X does not fit the model's dtype.*float32"):
            call()
    with pytest.raises(ValueError, match=r"weights\[0\] does not fit"):
        net.set_params([np.full((4, 3), 1e39), np.zeros((2, 4))], [np.zeros(4), np.zeros(2)])
    with pytest.raises(ValueError, match="lr does not fit"):
        net.fit(GOOD_X, GOOD_Y, lr=1e300, progress=False)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)
    fb.MLP([3, 2], dtype="float64").predict(huge)  # fine in float64


def test_load_rejects_non_finite_and_mismatched_files(tmp_path):
    net = fb.MLP([4, 3, 2], loss="cross_entropy", seed=0)
    net.save(tmp_path / "mlp.npz")
    with pytest.raises(ValueError, match="not a LogisticRegression: load it with fb.MLP.load"):
        fb.LogisticRegression.load(tmp_path / "mlp.npz")
    data = dict(np.load(tmp_path / "mlp.npz"))
    data["params"][0] = np.nan
    np.savez(tmp_path / "nan.npz", **data)
    with pytest.raises(ValueError, match="not all finite"):
        fb.MLP.load(tmp_path / "nan.npz")
    data = dict(np.load(tmp_path / "mlp.npz"))
    data["sizes"] = np.array(["a", "b"])
    np.savez(tmp_path / "bad_sizes.npz", **data)
    with pytest.raises(ValueError, match="corrupt: unreadable architecture"):
        fb.MLP.load(tmp_path / "bad_sizes.npz")
