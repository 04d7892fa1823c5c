"""fastbp.sklearn: scikit-learn's own estimator checks, plus the behaviour they do not cover."""

import pickle

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", minversion="1.6")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_blobs, make_regression  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastbp as fb  # noqa: E402
from conftest import BACKENDS  # noqa: E402
from fastbp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# A small network for the tests below; float64, so predictions do not depend on batch composition.
FAST = dict(hidden_layer_sizes=(16,), max_iter=50, dtype="float64", random_state=0)


def _expected_failed_checks(estimator):
    """Checks known to fail, by name, with the reason: none."""
    return {}


# Not failures, but parts scikit-learn itself skips, depending on the environment (pytest -rs
# shows them):
#   check_array_api_input: runs only when SCIPY_ARRAY_API=1 is set before scipy is imported
#     (these estimators declare no array-API support, so it would only try NumPy inputs).
#   check_classifier_data_not_an_array / check_regressor_data_not_an_array, the pandas half
#     (the NotAnArray half runs first and passes): pandas is not a fastbp dependency; with pandas
#     installed it runs.
# The sample_weight checks are not generated at all: fit takes no sample_weight.


# The defaults themselves (seeded) pass: the checks take ~3 s on two cores.
@parametrize_with_checks([MLPClassifier(random_state=0), MLPRegressor(random_state=0)],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _blobs(n_classes, n=150, seed=0, labels=None):
    X, y = make_blobs(n_samples=n, centers=n_classes, n_features=4, cluster_std=1.0, random_state=seed)
    X = StandardScaler().fit_transform(X)
    return X, (np.asarray(labels)[y] if labels is not None else y)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_classifier_probabilities_and_accuracy(n_classes):
    X, y = _blobs(n_classes)
    clf = MLPClassifier(**FAST).fit(X, y)
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), n_classes) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba))
    assert clf.score(X, y) > 0.9
    np.testing.assert_array_equal(clf.classes_, np.arange(n_classes))
    # binary: one sigmoid output with log_loss; more: softmax with cross_entropy
    expected = ("log_loss", 1) if n_classes == 2 else ("cross_entropy", n_classes)
    assert (clf.model_.loss_name, clf.model_.sizes[-1]) == expected
    assert clf.model_.sizes == [4, 16, expected[1]]


@pytest.mark.parametrize("labels", [["no", "yes"], ["cat", "dog", "emu"], [-3.0, 2.0, 10.0], [True, False]])
def test_classifier_arbitrary_labels(labels):
    X, y = _blobs(len(labels), labels=labels)
    clf = MLPClassifier(**FAST).fit(X, y)
    np.testing.assert_array_equal(clf.classes_, np.unique(labels))
    assert clf.classes_.dtype == np.asarray(labels).dtype
    pred = clf.predict(X)
    assert pred.dtype == clf.classes_.dtype and set(pred) <= set(labels)
    assert clf.score(X, y) > 0.9


def test_classifier_rejects_one_class():
    with pytest.raises(ValueError, match="at least 2 classes"):
        MLPClassifier(**FAST).fit(np.ones((5, 2)), ["a"] * 5)


def test_loss_curve_and_n_iter():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, max_iter=30)).fit(X, y)
    assert clf.n_iter_ == 30 and len(clf.loss_curve_) == 30
    assert all(np.isfinite(clf.loss_curve_)) and clf.loss_ == clf.loss_curve_[-1]
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    # refitting starts over rather than continuing
    again = clf.fit(X, y)
    assert again is clf and clf.n_iter_ == 30


def test_partial_fit_classifier():
    X, y = _blobs(3, labels=["a", "b", "c"])
    clf = MLPClassifier(**FAST)
    with pytest.raises(ValueError, match="classes must be given on the first call"):
        clf.partial_fit(X, y)
    assert not hasattr(clf, "model_")
    # the first chunk lacks "c": classes= says it may come later
    first = y != "c"
    clf.partial_fit(X[first], y[first], classes=["c", "a", "b"])
    np.testing.assert_array_equal(clf.classes_, ["a", "b", "c"])
    assert clf.predict_proba(X).shape == (len(X), 3)
    for _ in range(30):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 31 and len(clf.loss_curve_) == 31
    assert clf.score(X, y) > 0.9
    with pytest.raises(ValueError, match="classes must not change"):
        clf.partial_fit(X, y, classes=["a", "b"])
    with pytest.raises(ValueError, match="labels not in classes"):
        clf.partial_fit(X[:3], ["a", "b", "z"])
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(X[:, :2], y)
    assert clf.n_iter_ == 31  # rejected calls change nothing


def test_partial_fit_matches_fit_epoch_for_epoch():
    """partial_fit is one epoch of fit's training: the same seeds give the same curve."""
    X, y = _blobs(3)
    fitted = MLPClassifier(**dict(FAST, max_iter=1)).fit(X, y)
    partial = MLPClassifier(**FAST).partial_fit(X, y, classes=[0, 1, 2])
    np.testing.assert_allclose(partial.loss_curve_, fitted.loss_curve_)
    np.testing.assert_allclose(partial.predict_proba(X), fitted.predict_proba(X))


def test_regressor_1d_and_2d_targets():
    X, y = make_regression(n_samples=200, n_features=5, n_targets=2, noise=0.1, random_state=0)
    X = StandardScaler().fit_transform(X)
    y = y / y.std(axis=0)
    one = MLPRegressor(**FAST, learning_rate_init=0.05).fit(X, y[:, 0])
    assert one.predict(X).shape == (200,) and one.predict(X).dtype == np.float64
    assert one.score(X, y[:, 0]) > 0.95
    assert one.model_.loss_name == "mse" and one.model_.output == "identity"
    two = MLPRegressor(**FAST, learning_rate_init=0.05).fit(X, y)
    assert two.predict(X).shape == (200, 2) and two.model_.sizes[-1] == 2
    assert two.score(X, y) > 0.95
    column = MLPRegressor(**FAST, learning_rate_init=0.05).fit(X, y[:, :1])
    assert column.predict(X).shape == (200, 1)
    np.testing.assert_allclose(column.predict(X)[:, 0], one.predict(X))


def test_partial_fit_regressor():
    X, y = make_regression(n_samples=100, n_features=3, noise=0.1, random_state=1)
    y = y / y.std()
    reg = MLPRegressor(**FAST, learning_rate_init=0.01)
    for _ in range(20):
        reg.partial_fit(X, y)
    assert reg.n_iter_ == 20 and len(reg.loss_curve_) == 20
    assert reg.loss_curve_[-1] < reg.loss_curve_[0]
    assert reg.predict(X).shape == (100,)
    with pytest.raises(ValueError, match="y has the wrong shape"):
        reg.partial_fit(X, np.c_[y, y])


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_unfitted_raises(Estimator):
    with pytest.raises(NotFittedError):
        Estimator().predict(np.zeros((2, 3)))


@pytest.mark.parametrize("params, match", [
    (dict(hidden_layer_sizes=(10, 0)), "hidden_layer_sizes\\[1\\]"),
    (dict(hidden_layer_sizes="10"), "hidden_layer_sizes must be"),
    (dict(activation="softplus"), "activation"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size="big"), "batch_size"),
    (dict(learning_rate_init=-1.0), "learning_rate_init"),
    (dict(max_iter=0), "max_iter"),
    (dict(shuffle="yes"), "shuffle"),
    (dict(dtype="float16"), "dtype"),
    (dict(strategy="fast"), "strategy"),
    (dict(verbose=-1), "verbose"),
    (dict(random_state="seed"), "random_state|RandomState"),
])
def test_bad_hyper_parameters_are_named(params, match):
    X, y = _blobs(2, n=20)
    clf = MLPClassifier(**params)  # stored as-is; checked by fit
    with pytest.raises((ValueError, TypeError), match=match):
        clf.fit(X, y)
    assert not hasattr(clf, "model_") and not hasattr(clf, "n_features_in_")


def test_rejected_calls_change_nothing():
    X, y = _blobs(3)
    clf = MLPClassifier(**FAST).fit(X, y)
    before = (clf.predict_proba(X), list(clf.loss_curve_), clf.n_iter_)
    for bad in [dict(strategy="fast"), dict(learning_rate_init=0.0), dict(batch_size=-1)]:
        with pytest.raises((ValueError, TypeError)):
            clone(clf).set_params(**bad).fit(X, y)
        with pytest.raises((ValueError, TypeError)):
            clf.set_params(**bad).partial_fit(X, y)
        clf.set_params(**{k: FAST.get(k, MLPClassifier().get_params()[k]) for k in bad})
    with pytest.raises(ValueError):
        clf.partial_fit(np.full_like(X, np.nan), y)
    after = (clf.predict_proba(X), list(clf.loss_curve_), clf.n_iter_)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1:] == before[1:]
    # the shuffle stream was not advanced by the rejected calls either
    twin = MLPClassifier(**FAST).fit(X, y)
    np.testing.assert_array_equal(clf.partial_fit(X, y).loss_curve_, twin.partial_fit(X, y).loss_curve_)


def test_dtype_and_divergence():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, dtype=np.float32)).fit(X, y)
    assert clf.model_.dtype == np.float32
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, atol=1e-6)
    reg = MLPRegressor(**dict(FAST, learning_rate_init=10.0))
    with pytest.raises(fb.TrainingDivergedError):
        reg.fit(X, 1e3 * X[:, 0])
    assert not hasattr(reg, "model_")


def test_hyper_parameters_reach_the_model():
    X, y = _blobs(3, n=60)
    clf = MLPClassifier(hidden_layer_sizes=[7, 5], activation="logistic", batch_size=None,
                        learning_rate_init=0.5, max_iter=3, dtype="float32", strategy="loop",
                        random_state=1).fit(X, y)
    assert clf.model_.sizes == [4, 7, 5, 3] and clf.model_.activation == "sigmoid"
    assert clf.model_.dtype == np.float32
    assert clf.get_params()["hidden_layer_sizes"] == [7, 5]  # stored as given
    loop = clf.loss_curve_
    vectorized = clone(clf).set_params(strategy="vectorized", dtype="float64").fit(X, y).loss_curve_
    np.testing.assert_allclose(loop, vectorized, rtol=1e-4)


def test_pickle_round_trip_is_exact_and_keeps_training():
    X, y = _blobs(3)
    clf = MLPClassifier(**FAST).partial_fit(X, y, classes=[0, 1, 2])
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.model_ is not clf.model_ and copy.model_.backend.name == fb.get_backend().name
    # the shuffle stream travels too: both continue identically
    clf.partial_fit(X, y)
    copy.partial_fit(X, y)
    np.testing.assert_array_equal(copy.loss_curve_, clf.loss_curve_)
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))


@pytest.mark.parametrize("source", BACKENDS)
def test_pickle_moves_between_backends(source):
    X, y = _blobs(3)
    with fb.use_backend(source):
        clf = MLPClassifier(**FAST).fit(X, y)
        blob = pickle.dumps(clf)
    for target in BACKENDS:
        with fb.use_backend(target):
            copy = pickle.loads(blob)
            assert copy.model_.backend.name == target
            np.testing.assert_allclose(copy.predict_proba(X), clf.predict_proba(X), rtol=1e-10, atol=1e-12)


def test_works_in_pipeline_and_cross_validation():
    X, y = _blobs(3, n=120)
    scores = cross_val_score(make_pipeline(StandardScaler(), MLPClassifier(**FAST)), X, y, cv=3)
    assert scores.mean() > 0.9


def test_every_backend(backend):
    X, y = _blobs(3)
    clf = MLPClassifier(**FAST).fit(X, y)
    assert clf.model_.backend is backend
    assert clf.score(X, y) > 0.9
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, atol=1e-12)


def test_import_fastbp_sklearn_without_sklearn_says_how_to_install():
    import subprocess
    import sys

    code = ("import sys, fastbp\n"
            "assert 'sklearn' not in sys.modules  # importing fastbp leaves scikit-learn alone\n"
            "sys.modules['sklearn'] = None  # as if it were not installed\n"
            "try:\n    import fastbp.sklearn\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fastbp[sklearn]'" in out.stdout


def test_rejected_fit_leaves_a_fitted_estimator_as_it_was():
    rng = np.random.default_rng(0)
    X4, y3 = rng.normal(size=(30, 4)), np.arange(30) % 3
    clf = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, random_state=0).fit(X4, y3)
    before = (clf.n_features_in_, clf.predict_proba(X4).copy(), list(clf.loss_curve_))
    with pytest.raises(ValueError):
        clf.fit(rng.normal(size=(20, 7)), np.zeros(20))  # one class only
    with pytest.raises(ValueError):
        clf.partial_fit(rng.normal(size=(20, 7)), np.arange(20) % 3)  # wrong feature count
    assert clf.n_features_in_ == before[0] and list(clf.loss_curve_) == before[2]
    np.testing.assert_array_equal(clf.predict_proba(X4), before[1])
    fresh = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2)
    with pytest.raises(ValueError):
        fresh.partial_fit(X4, y3)  # first call needs classes=
    assert not hasattr(fresh, "n_features_in_")
