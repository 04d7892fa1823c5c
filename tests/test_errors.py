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


# ---------------------------------------------------------------- fb.ops: one error on every backend
def _f(*shape, dtype=np.float64):
    return np.ones(shape, dtype=dtype)


def _read_only(*shape):
    a = _f(*shape)
    a.flags.writeable = False
    return a


def _overlapping():
    base = np.ones((3, 3))
    return base[:2], base[1:]


OPS_BAD_CALLS = [  # (id, call building fresh arguments, exception, message pattern)
    ("matmul inner dims", lambda: fb.ops.matmul(_f(2, 3), _f(4, 2)), ValueError,
     r"matmul: inner dimensions differ. Received: op\(a\) of shape \(2, 3\) and op\(b\) of shape \(4, 2\)"),
    ("matmul trans inner dims", lambda: fb.ops.matmul(_f(2, 3), _f(2, 3), trans_b=False), ValueError,
     "inner dimensions differ"),
    ("matmul 1-D", lambda: fb.ops.matmul(_f(3), _f(3, 2)), ValueError,
     r"matmul: a has the wrong number of dimensions. Received: numpy.ndarray of shape \(3,\).*Expected a 2-D array"),
    ("matmul list of strings", lambda: fb.ops.matmul([["a"]], _f(1, 1)), ValueError, "a could not be read"),
    ("matmul ints", lambda: fb.ops.matmul(np.ones((2, 2), int), np.ones((2, 2), int)), TypeError,
     "a must hold float32 or float64 values"),
    ("matmul float16", lambda: fb.ops.matmul(_f(2, 2, dtype=np.float16), _f(2, 2, dtype=np.float16)), TypeError,
     "float32 or float64"),
    ("matmul mixed dtypes", lambda: fb.ops.matmul(_f(2, 2), _f(2, 2, dtype=np.float32)), TypeError,
     r"every array must share one dtype. Received: a of dtype float64 and b of dtype float32"),
    ("matmul out shape", lambda: fb.ops.matmul(_f(2, 3), _f(3, 4), _f(4, 2)), ValueError,
     r"matmul: out has the wrong shape. Received: \(4, 2\). Expected \(2, 4\)"),
    ("matmul out dtype", lambda: fb.ops.matmul(_f(2, 3), _f(3, 4), _f(2, 4, dtype=np.float32)), TypeError,
     "out of dtype float32"),
    ("matmul out read-only", lambda: fb.ops.matmul(_f(2, 3), _f(3, 4), _read_only(2, 4)), ValueError,
     "matmul: out is read-only"),
    ("matmul out is a", lambda: (lambda a: fb.ops.matmul(a, _f(3, 3), a))(_f(3, 3)), ValueError,
     "matmul: out overlaps a"),
    ("matmul beta without out", lambda: fb.ops.matmul(_f(2, 2), _f(2, 2), beta=1.0), ValueError,
     "out must be given"),
    ("matmul alpha nan", lambda: fb.ops.matmul(_f(2, 2), _f(2, 2), alpha=float("nan")), ValueError,
     "alpha must be finite"),
    ("matmul alpha str", lambda: fb.ops.matmul(_f(2, 2), _f(2, 2), alpha="2"), TypeError,
     "alpha must be a real number"),
    ("matmul trans str", lambda: fb.ops.matmul(_f(2, 2), _f(2, 2), trans_a="yes"), TypeError,
     "trans_a must be a bool"),
    ("matmul scalar", lambda: fb.ops.matmul(2.0, _f(2, 2)), TypeError,
     "a must be an array of the active .* backend. Received: float"),
    ("matmul masked", lambda: fb.ops.matmul(np.ma.ones((2, 2)), _f(2, 2)), TypeError, "a must be a plain array"),
    ("matmul matrix", lambda: fb.ops.matmul(np.matrix(np.ones((2, 2))), _f(2, 2)), TypeError,
     "a must be a plain array"),
    ("hadamard broadcast", lambda: fb.ops.hadamard(_f(2, 3), _f(3)), ValueError,
     r"hadamard: b has the wrong shape. Received: \(3,\). Expected \(2, 3\) \(the shape of a; no broadcasting\)"),
    ("hadamard list out", lambda: fb.ops.hadamard(_f(2), _f(2), [0.0, 0.0]), TypeError,
     "out is written in place"),
    ("hadamard partial overlap", lambda: (lambda ab: fb.ops.hadamard(ab[0], ab[0], ab[1]))(_overlapping()),
     ValueError, r"out overlaps a.*\(or a itself\)"),
    ("hadamard 3-D", lambda: fb.ops.hadamard(_f(2, 2, 2), _f(2, 2, 2)), ValueError, "Expected a 1-D or 2-D array"),
    ("outer 2-D x", lambda: fb.ops.outer(_f(2, 2), _f(3)), ValueError, "outer: x has the wrong number"),
    ("outer out shape", lambda: fb.ops.outer(_f(2), _f(3), _f(3, 2)), ValueError,
     r"outer: out has the wrong shape. Received: \(3, 2\). Expected \(2, 3\)"),
    ("outer accumulate without out", lambda: fb.ops.outer(_f(2), _f(3), accumulate=True), ValueError,
     "out must be given"),
    ("outer accumulate int", lambda: fb.ops.outer(_f(2), _f(3), _f(2, 3), accumulate=1), TypeError,
     "accumulate must be a bool"),
    ("add_bias width", lambda: fb.ops.add_bias(_f(2, 3), _f(2)), ValueError,
     r"add_bias: b has the wrong shape. Received: \(2,\). Expected \(3,\)"),
    ("add_bias read-only", lambda: fb.ops.add_bias(_read_only(2, 3), _f(3)), ValueError, "z is read-only"),
    ("bias_grad out", lambda: fb.ops.bias_grad(_f(4, 3), _f(4)), ValueError,
     r"bias_grad: out has the wrong shape. Received: \(4,\). Expected \(3,\)"),
    ("bias_grad 1-D", lambda: fb.ops.bias_grad(_f(3)), ValueError, "delta has the wrong number of dimensions"),
    ("activation name", lambda: fb.ops.activation("swish", _f(2, 2)), ValueError, r"Received: name='swish'"),
    ("activation out shape", lambda: fb.ops.activation("relu", _f(2, 2), _f(4)), ValueError,
     "activation: out has the wrong shape"),
    ("activation_backward shapes", lambda: fb.ops.activation_backward("tanh", _f(2, 2), _f(2, 3), _f(2, 2)),
     ValueError, r"activation_backward: a has the wrong shape. Received: \(2, 3\). Expected \(2, 2\)"),
    ("activation_backward delta is a", lambda: (lambda a: fb.ops.activation_backward("softmax", a, a, a))(_f(2, 2)),
     ValueError, "delta overlaps z"),
    ("activation_backward list delta", lambda: fb.ops.activation_backward("relu", _f(2), _f(2), [1.0, 1.0]),
     TypeError, "delta is written in place"),
    ("output_delta loss", lambda: fb.ops.output_delta("hinge", "identity", _f(2, 2), _f(2, 2), _f(2, 2)),
     ValueError, r"Received: loss='hinge'"),
    ("output_delta output", lambda: fb.ops.output_delta("mse", "gelu", _f(2, 2), _f(2, 2), _f(2, 2)),
     ValueError, r"Received: output='gelu'"),
    ("output_delta y shape", lambda: fb.ops.output_delta("mse", "identity", _f(2, 2), _f(2, 2), _f(2, 3)),
     ValueError, r"output_delta: y has the wrong shape. Received: \(2, 3\). Expected \(2, 2\)"),
    ("output_delta delta is y", lambda: (lambda y: fb.ops.output_delta("mse", "identity", _f(2, 2), _f(2, 2), y, y))(
        _f(2, 2)), ValueError, "delta overlaps y"),
    ("sgd_update shapes", lambda: fb.ops.sgd_update(_f(4), _f(3), 0.1), ValueError,
     r"sgd_update: grads has the wrong shape. Received: \(3,\). Expected \(4,\)"),
    ("sgd_update 2-D", lambda: fb.ops.sgd_update(_f(2, 2), _f(2, 2), 0.1), ValueError, "Expected a 1-D array"),
    ("sgd_update lr", lambda: fb.ops.sgd_update(_f(4), _f(4), float("inf")), ValueError, "lr must be finite"),
    ("sgd_update params list", lambda: fb.ops.sgd_update([1.0, 2.0], _f(2), 0.1), TypeError,
     "params is written in place"),
    ("sgd_update aliased", lambda: (lambda p: fb.ops.sgd_update(p, p, 0.1))(_f(3)), ValueError,
     "params overlaps grads"),
]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("call,exc,match", [c[1:] for c in OPS_BAD_CALLS], ids=[c[0] for c in OPS_BAD_CALLS])
def test_ops_reject_bad_arguments_alike_on_every_backend(call, exc, match):
    """The same exception and message on every backend, and the arrays given are left as they were."""
    from conftest import BACKENDS

    messages = {}
    for name in BACKENDS:
        with fb.use_backend(name):
            with pytest.raises(exc, match=match) as info:
                call()
            messages[name] = (type(info.value), str(info.value).replace(repr(name), "<backend>"))
    assert len(set(messages.values())) == 1, messages


def test_ops_rejected_call_changes_nothing(backend):
    out = np.full((2, 4), 7.0)
    a = np.ones((2, 3))
    with pytest.raises(TypeError):
        fb.ops.matmul(a, np.ones((3, 4), np.float32), out, beta=1.0)
    with pytest.raises(ValueError):
        fb.ops.matmul(a, np.ones((4, 4)), out, beta=1.0)
    np.testing.assert_array_equal(out, 7.0)
    params = np.arange(4.0)
    with pytest.raises(ValueError):
        fb.ops.sgd_update(params, np.ones(3), 0.1)
    np.testing.assert_array_equal(params, np.arange(4.0))


def test_ops_reject_another_backends_arrays(backend):
    """A NumPy array on a GPU backend, or a foreign array object, is a TypeError naming the argument."""

    class Foreign:  # array-like but not the backend's array type
        shape, dtype = (2, 2), np.dtype(np.float64)

    with pytest.raises(TypeError, match=r"a must be an array of the active .* backend. Received: .*Foreign"):
        fb.ops.matmul(Foreign(), np.ones((2, 2)))
    if backend.xp is not np:
        with pytest.raises(TypeError, match="move it with"):
            fb.ops.hadamard(np.ones(2), backend.xp.ones(2))


# ---------------------------------------------------------------- validation gaps (issue 14)
@pytest.mark.parametrize("spelling,expected", [
    ("f8", np.float64), ("<f4", np.float32), ("double", np.float64), ("single", np.float32),
    ("float", np.float64), (np.float32, np.float32), (np.dtype(">f8"), np.float64), (float, np.float64),
])
def test_dtype_spellings_numpy_reads_as_float32_or_float64(spelling, expected):
    net = fb.MLP([3, 2], dtype=spelling, seed=0)
    assert net.dtype == np.dtype(expected) and net.dtype.isnative
    assert net.weights[0].dtype == np.dtype(expected)


@pytest.mark.parametrize("spelling", ["f2", "half", "i8", "c16", "float128x", True, None, "S4"])
def test_dtype_spellings_of_other_types_rejected(spelling):
    with pytest.raises(ValueError, match=r"unsupported dtype. Received: dtype=.*Expected one of \['float32', 'float64'\]"):
        fb.MLP([3, 2], dtype=spelling)


def test_masked_arrays_with_masked_entries_rejected_and_change_nothing(net):
    X = np.ma.masked_array(np.ones((5, 3)), mask=np.zeros((5, 3), bool))
    X.mask[1, 2] = True
    before = _snapshot(net)
    for call in (lambda: net.predict(X), lambda: net.loss(X, GOOD_Y), lambda: net.gradients(X, GOOD_Y),
                 lambda: net.fit(X, GOOD_Y, progress=False)):
        with pytest.raises(ValueError, match=r"X is a masked array with masked entries.*1 masked entries.*filled"):
            call()
    Y = np.ma.masked_array(GOOD_Y, mask=[0, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="Y is a masked array"):
        net.fit(GOOD_X, Y, progress=False)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)


def test_masked_array_with_nothing_masked_reads_as_its_values(net):
    X = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_array_equal(net.predict(np.ma.masked_array(X)), net.predict(X))


@pytest.mark.parametrize("lr", [1e-320, 1e-46, np.float64(7e-46)])
def test_lr_that_becomes_zero_in_the_model_dtype_is_rejected(lr):
    """The helper fit calls: an lr that is 0 once cast to float32 is refused, naming lr."""
    from fastbp import _validate as check

    with pytest.raises(ValueError, match=r"lr does not fit the model's dtype: it becomes 0 in float32.*"
                                         r"Expected at least 1.4e-45 \(float32\)"):
        check.positive_float("lr", lr, dtype="float32")
    assert check.positive_float("lr", lr, dtype="float64") == float(lr)  # not 0 in float64
    assert check.positive_float("lr", 1e-45, dtype="float32") == 1e-45  # float32's smallest subnormal
    with pytest.raises(ValueError, match="lr does not fit the model's dtype. Received: lr=1e"):
        check.positive_float("lr", 1e39, dtype="float32")


@pytest.mark.parametrize("sizes", [{3: 1, 2: 1}, {3, 2}, np.array([[3, 2]]), b"\x03\x02"])
def test_sizes_helper_rejects_unordered_and_nested(sizes):
    from fastbp import _validate as check

    with pytest.raises(TypeError, match="sizes must be a (flat )?sequence of ints"):
        check.sizes("sizes", sizes)
    assert check.sizes("sizes", np.array([3, 2])) == [3, 2] and check.sizes("sizes", range(2, 4)) == [2, 3]


@pytest.mark.parametrize("seed,exc,match", [(-1, ValueError, r"seed out of range. Received: seed=-1"),
                                            ("a", TypeError, r"seed must be None or an int >= 0. Received: seed='a'"),
                                            (1.5, TypeError, "seed must be")])
def test_gradcheck_seed_errors_name_seed(net, seed, exc, match):
    """numpy's own message (e.g. 'expected non-negative integer') never said which argument."""
    with pytest.raises(exc, match=match):
        fb.gradcheck(net, GOOD_X, GOOD_Y, max_params=3, seed=seed)


def test_fit_refuses_an_lr_that_is_zero_in_float32_and_changes_nothing(net):
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"lr does not fit the model's dtype. Received: lr=1e-320"):
        net.fit(GOOD_X, GOOD_Y, lr=1e-320, progress=False)
    for a, b in zip(before, _snapshot(net)):
        np.testing.assert_array_equal(a, b)
