"""fastbp.sklearn: scikit-learn's own estimator checks, the same defaults, the same trajectories as
scikit-learn's MLPClassifier / MLPRegressor, and the behaviour the checks do not cover."""

import math
import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", minversion="1.6")

from sklearn import neural_network as sk_nn  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import make_blobs, make_regression  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastbp as fb  # noqa: E402
from conftest import BACKENDS  # noqa: E402
from fastbp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# Short fits stop at max_iter on purpose; the tests that are about the warning ask for it.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# A small network for the behaviour tests: float64, so predictions do not depend on batch composition.
FAST = dict(hidden_layer_sizes=(16,), max_iter=50, learning_rate_init=0.02, dtype="float64", random_state=0)
EXTRAS = {"dtype", "strategy"}  # fastbp's parameters beyond scikit-learn's


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


# The defaults themselves (seeded) pass.
@parametrize_with_checks([MLPClassifier(random_state=0), MLPRegressor(random_state=0)],
                         expected_failed_checks=_expected_failed_checks)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _blobs(n_classes, n=150, seed=0, labels=None, std=1.0):
    X, y = make_blobs(n_samples=n, centers=n_classes, n_features=4, cluster_std=std, random_state=seed)
    X = StandardScaler().fit_transform(X)
    return X, (np.asarray(labels)[y] if labels is not None else y)


def _regression(n_targets=2, n=100):
    X, y = make_regression(n_samples=n, n_features=5, n_targets=n_targets, noise=1.0, random_state=0)
    y = y.reshape(n, n_targets)  # 2-D even for one target
    return StandardScaler().fit_transform(X), y / y.std(axis=0)


# ---------------------------------------------------------------- scikit-learn's parameters
@pytest.mark.parametrize("ours, theirs", [(MLPClassifier, sk_nn.MLPClassifier), (MLPRegressor, sk_nn.MLPRegressor)])
def test_defaults_equal_scikit_learns(ours, theirs):
    mine, sk = ours().get_params(), theirs().get_params()
    assert set(sk) <= set(mine), f"missing scikit-learn parameters: {sorted(set(sk) - set(mine))}"
    assert set(mine) - set(sk) == EXTRAS
    for name in sk:
        assert mine[name] == sk[name], (name, mine[name], sk[name])
    assert ours().dtype == "float64" and ours().strategy == "vectorized"
    # every scikit-learn parameter set by keyword reaches the estimator
    assert ours(**sk).get_params() == {**mine, **sk}


# ---------------------------------------------------------------- the same trajectories as scikit-learn
def _assert_same_fit(ours, theirs, atol=1e-10):
    """Every fitted number scikit-learn reports, to ``atol``."""
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=0, atol=atol)
    assert ours.loss_ == pytest.approx(theirs.loss_, abs=atol)
    for mine, sk in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_, strict=True):
        assert mine.shape == sk.shape
        np.testing.assert_allclose(mine, sk, rtol=0, atol=atol)
    if theirs.validation_scores_ is None:
        assert ours.validation_scores_ is None and ours.best_validation_score_ is None
        assert ours.best_loss_ == pytest.approx(theirs.best_loss_, abs=atol)
    else:
        assert ours.best_loss_ is None
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_, rtol=0, atol=atol)
        assert ours.best_validation_score_ == pytest.approx(theirs.best_validation_score_, abs=atol)
    assert ours.model_.optimizer.lr == pytest.approx(theirs._optimizer.learning_rate
                                                     if theirs.solver == "sgd" else theirs.learning_rate_init)


# shuffle=False, float64, the same random_state: fastbp draws scikit-learn's initial weights (and
# its validation split) from it, so each pair trains identically, to rounding.
SAME_AS_SKLEARN = {
    "sgd": dict(solver="sgd", momentum=0.0, alpha=0.0, batch_size=32, learning_rate_init=0.1),
    "sgd_nesterov": dict(solver="sgd", momentum=0.9, alpha=0.0, batch_size=32, learning_rate_init=0.05),
    "sgd_momentum_invscaling": dict(solver="sgd", momentum=0.9, nesterovs_momentum=False, alpha=0.0, batch_size=16,
                                    learning_rate="invscaling", learning_rate_init=0.5, power_t=0.25),
    # lr / 5 whenever 2 epochs fail to improve by 1e-3, until <= 1e-6, then stop; the momentum
    # buffer is rescaled at each change to keep scikit-learn's velocity
    "sgd_adaptive": dict(solver="sgd", momentum=0.9, alpha=0.0, batch_size=16, learning_rate="adaptive",
                         learning_rate_init=0.2, n_iter_no_change=2, tol=1e-3, max_iter=200),
    # full batch: alpha's loss term is exact too
    "sgd_full_batch_alpha": dict(solver="sgd", momentum=0.9, alpha=0.05, batch_size=120, learning_rate_init=0.1),
    # Adam's epsilon is placed as torch places it; with a negligible one both are the same rule
    "adam_tiny_epsilon": dict(solver="adam", alpha=0.0, batch_size=32, epsilon=1e-300, learning_rate_init=0.01),
    "early_stopping_multiclass": dict(solver="sgd", momentum=0.5, alpha=0.0, batch_size=20, early_stopping=True,
                                      learning_rate_init=0.05, max_iter=200),
    "early_stopping_binary_stratified": dict(solver="sgd", momentum=0.9, alpha=0.0, batch_size=16,
                                             early_stopping=True, validation_fraction=0.2,
                                             learning_rate="adaptive", n_iter_no_change=2, tol=1e-2,
                                             learning_rate_init=0.2, max_iter=200),
}


@pytest.mark.parametrize("name", list(SAME_AS_SKLEARN))
def test_classifier_trajectory_equals_scikit_learns(name):
    X, y = _blobs(3, n=120, std=3.0)
    if name.endswith("binary_stratified"):
        y = np.where(y == 1, "yes", "no")
    params = {**dict(hidden_layer_sizes=(7,), max_iter=40, shuffle=False, random_state=0), **SAME_AS_SKLEARN[name]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = sk_nn.MLPClassifier(**params).fit(X, y)
        ours = MLPClassifier(**params).fit(X, y)
    _assert_same_fit(ours, theirs)
    np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    if name == "sgd_adaptive":  # the schedule really ran down and stopped training
        assert ours.model_.optimizer.lr <= 1e-6 and ours.n_iter_ < params["max_iter"]
    if name.startswith("early_stopping"):
        assert ours.n_iter_ < params["max_iter"]
        assert ours.best_validation_score_ == max(ours.validation_scores_)


@pytest.mark.parametrize("n_targets", [1, 2])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_regressor_trajectory_equals_scikit_learns(n_targets, early_stopping):
    X, y = _regression(n_targets)
    if n_targets == 1:
        y = y[:, 0]
    params = dict(hidden_layer_sizes=(7,), solver="sgd", momentum=0.9, alpha=0.0, batch_size=10, max_iter=30,
                  learning_rate_init=0.01, shuffle=False, random_state=0, early_stopping=early_stopping)
    theirs = sk_nn.MLPRegressor(**params).fit(X, y)
    ours = MLPRegressor(**params).fit(X, y)
    _assert_same_fit(ours, theirs)  # the loss averaged over the outputs, as scikit-learn's
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=0, atol=1e-10)


def test_injected_coefs_then_warm_start_equals_scikit_learn():
    """The same starting point given through coefs_ / intercepts_, then warm_start fits."""
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver="sgd", momentum=0.0, alpha=0.0, batch_size=32,
                  learning_rate_init=0.1, shuffle=False, max_iter=1)
    theirs = sk_nn.MLPClassifier(random_state=1, **params).fit(X, y)
    ours = MLPClassifier(random_state=2, **params).fit(X, y)  # another start: overwritten next
    assert not np.allclose(ours.coefs_[0], theirs.coefs_[0])
    ours.coefs_, ours.intercepts_ = theirs.coefs_, theirs.intercepts_
    for est in (theirs, ours):
        est.set_params(warm_start=True, max_iter=20).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == 20 and ours.t_ == theirs.t_ == 21 * 120
    np.testing.assert_allclose(ours.loss_curve_[1:], theirs.loss_curve_[1:], rtol=0, atol=1e-10)
    for mine, sk in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_, strict=True):
        np.testing.assert_allclose(mine, sk, rtol=0, atol=1e-10)


def test_momentum_rescaled_when_the_rate_changes(monkeypatch):
    """torch's momentum form with a changing rate is not scikit-learn's: without the rescale
    (m *= lr_old / lr_new at each change) the invscaling trajectory departs after epoch 1."""
    import fastbp.sklearn

    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver="sgd", momentum=0.9, alpha=0.0, batch_size=16, max_iter=10,
                  learning_rate="invscaling", learning_rate_init=0.5, power_t=0.5, shuffle=False, random_state=0)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    _assert_same_fit(MLPClassifier(**params).fit(X, y), theirs)

    def set_lr_without_rescale(self, lr):
        self.model.optimizer.lr = lr

    monkeypatch.setattr(fastbp.sklearn._EpochEnd, "_set_lr", set_lr_without_rescale)
    torch_form = MLPClassifier(**params).fit(X, y)
    assert torch_form.loss_curve_[0] == pytest.approx(theirs.loss_curve_[0], abs=1e-12)  # the first rate: equal
    assert abs(torch_form.loss_curve_[-1] - theirs.loss_curve_[-1]) > 1e-6


def test_adam_default_epsilon_close_to_scikit_learn():
    """epsilon=1e-8 inside (torch) rather than outside (scikit-learn) the bias correction: a
    relative difference of order epsilon / sqrt(v_hat), visible but small."""
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), batch_size=32, max_iter=40, shuffle=False, random_state=0)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    ours = MLPClassifier(**params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-5)
    for mine, sk in zip(ours.coefs_, theirs.coefs_):
        np.testing.assert_allclose(mine, sk, rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver, alpha, atol", [("sgd", 0.01, 2e-4), ("adam", 1e-4, 5e-6)])
def test_alpha_with_mini_batches(solver, alpha, atol):
    """The weights follow scikit-learn's (to rounding for SGD); in the loss, alpha's term
    0.5 alpha ||W||^2 / rows is interpolated within each epoch: a few percent of that term
    (itself ~0.5 alpha ||W||^2 / batch) is the only inexact number."""
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver=solver, alpha=alpha, batch_size=16, max_iter=30,
                  learning_rate_init=0.05, shuffle=False, random_state=0, epsilon=1e-300)
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    ours = MLPClassifier(**params).fit(X, y)
    for mine, sk in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(mine, sk, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=0, atol=atol)
    no_alpha = MLPClassifier(**dict(params, alpha=0.0)).fit(X, y)
    assert not np.allclose(no_alpha.coefs_[0], ours.coefs_[0])  # alpha did reach the update ...
    penalty = 0.5 * alpha * sum(float((c * c).sum()) for c in theirs.coefs_) / 16
    assert penalty > 10 * atol  # ... and, much larger than the tolerance, the loss


def test_partial_fit_equals_scikit_learn():
    """One epoch per call, the optimizer (and its rate schedule) kept between calls, n_iter_ 1."""
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver="sgd", momentum=0.9, alpha=0.0, batch_size=16,
                  learning_rate="invscaling", learning_rate_init=0.3, shuffle=False, random_state=0)
    theirs, ours = sk_nn.MLPClassifier(**params), MLPClassifier(**params)
    for est in (theirs, ours):
        for _ in range(6):
            est.partial_fit(X, y, classes=[0, 1, 2])
    _assert_same_fit(ours, theirs)
    assert ours.n_iter_ == 1 and len(ours.loss_curve_) == 6
    # a fit, then partial_fit continuing that fit's optimizer
    theirs, ours = sk_nn.MLPClassifier(**params, max_iter=5), MLPClassifier(**params, max_iter=5)
    for est in (theirs, ours):
        est.fit(X, y)
        est.partial_fit(X, y)
        est.partial_fit(X, y)
    _assert_same_fit(ours, theirs)


def test_warm_start_equals_scikit_learn():
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver="sgd", momentum=0.9, alpha=0.0, batch_size=32, max_iter=8,
                  warm_start=True, learning_rate_init=0.05, shuffle=False, random_state=0, early_stopping=True)
    theirs, ours = sk_nn.MLPClassifier(**params), MLPClassifier(**params)
    for est in (theirs, ours):
        est.fit(X, y).fit(X, y)
    _assert_same_fit(ours, theirs)
    assert len(ours.loss_curve_) == len(ours.validation_scores_) == 16 and ours.n_iter_ == 8
    assert ours.t_ == 16 * 108  # 90% of the 120 rows train, twice 8 epochs
    # without warm_start a fit starts afresh
    ours.set_params(warm_start=False).fit(X, y)
    assert len(ours.loss_curve_) == 8


@pytest.mark.parametrize("name", ["sgd", "sgd_adaptive", "adam_tiny_epsilon"])
def test_every_backend_equals_scikit_learn(backend, name):
    X, y = _blobs(3, n=120, std=3.0)
    params = {**dict(hidden_layer_sizes=(7,), max_iter=40, shuffle=False, random_state=0), **SAME_AS_SKLEARN[name]}
    theirs = sk_nn.MLPClassifier(**params).fit(X, y)
    ours = MLPClassifier(**params).fit(X, y)
    assert ours.model_.backend is backend
    _assert_same_fit(ours, theirs, atol=1e-9)


# ---------------------------------------------------------------- stopping, warnings, schedules
def test_convergence_warning_only_when_max_iter_ends_training():
    X, y = _blobs(3)
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(5\) reached"):
        clf = MLPClassifier(**dict(FAST, max_iter=5)).fit(X, y)
    assert clf.n_iter_ == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        clf = MLPClassifier(**dict(FAST, max_iter=500, learning_rate_init=0.05)).fit(X, y)  # stops on tol
        assert clf.n_iter_ < 500
        # scikit-learn's rule, replayed on the curve: stop once the count exceeds n_iter_no_change
        best, count = math.inf, 0
        for epoch, loss in enumerate(clf.loss_curve_, start=1):
            count = count + 1 if loss > best - clf.tol else 0
            best = min(best, loss)
            if count > clf.n_iter_no_change:
                break
        assert epoch == clf.n_iter_ and best == clf.best_loss_
        clf.partial_fit(X, y)  # partial_fit never warns
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert MLPClassifier(**dict(FAST, max_iter=5, n_iter_no_change=1, tol=10.0)).fit(X, y).n_iter_ == 3


def test_early_stopping_restores_the_best_epoch_and_scores_validation_rows():
    X, y = _blobs(3, n=200, std=4.0)
    clf = MLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.05, max_iter=300, early_stopping=True,
                        n_iter_no_change=5, random_state=0).fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ == len(clf.loss_curve_) < 300 and clf.best_loss_ is None
    assert clf.best_validation_score_ == max(scores)
    assert scores.index(max(scores)) < len(scores) - 1  # the best epoch is not the last one ...
    assert all(s < max(scores) + clf.tol for s in scores[-6:])  # ... and the last 6 did not beat it by tol
    # the restored network scores the best epoch's accuracy on scikit-learn's validation rows
    # (stratified only for binary targets, as scikit-learn splits)
    from sklearn.model_selection import train_test_split

    rng = np.random.RandomState(0)
    for fan_in, fan_out in zip(clf.model_.sizes[:-1], clf.model_.sizes[1:]):
        rng.uniform(size=(fan_in, fan_out)), rng.uniform(size=fan_out)  # the initial weights' draws
    _, val = train_test_split(np.arange(len(X)), random_state=rng, test_size=0.1)
    assert clf.score(X[val], y[val]) == pytest.approx(clf.best_validation_score_)
    reg = MLPRegressor(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=300, early_stopping=True,
                       random_state=0).fit(*_regression(1))
    assert reg.best_validation_score_ == max(reg.validation_scores_) > 0.5  # R^2


def test_adaptive_divides_by_five_down_to_1e_6():
    X, y = _blobs(3, n=120, std=3.0)
    params = dict(hidden_layer_sizes=(7,), solver="sgd", learning_rate="adaptive", learning_rate_init=0.1,
                  n_iter_no_change=1, tol=1.0, max_iter=100, random_state=0)
    clf = MLPClassifier(**params).fit(X, y)
    # with tol=1 only epoch 1 improves; the count exceeds 1 at epochs 3, 5, ...: lr 0.1 / 5 at each,
    # 0.1 / 5**7 = 1.28e-6 still divided, 0.1 / 5**8 = 2.56e-7 <= 1e-6 stops at epoch 19
    assert clf.model_.optimizer.lr == pytest.approx(0.1 / 5**8)
    assert clf.n_iter_ == 19 == sk_nn.MLPClassifier(**params).fit(X, y).n_iter_
    # "adaptive" belongs to SGD; Adam stops at the first trigger (scikit-learn's rule)
    adam = MLPClassifier(hidden_layer_sizes=(7,), learning_rate="adaptive", n_iter_no_change=1, tol=1.0,
                         max_iter=100, random_state=0).fit(X, y)
    assert adam.n_iter_ == 3 and adam.model_.optimizer.lr == adam.learning_rate_init


def test_verbose_prints_scikit_learns_messages(capsys):
    X, y = _blobs(3)
    MLPClassifier(**dict(FAST, max_iter=3, verbose=True, early_stopping=True)).fit(X, y)
    out = capsys.readouterr().out
    assert "Iteration 1, loss = " in out and "Iteration 3, loss = " in out and "Validation score: " in out


def test_batch_size_larger_than_the_data_is_clipped_with_a_warning():
    X, y = _blobs(3, n=60)
    with pytest.warns(UserWarning, match="batch_size"):
        clf = MLPClassifier(**dict(FAST, batch_size=500, max_iter=3)).fit(X, y)
    full = MLPClassifier(**dict(FAST, batch_size=None, max_iter=3)).fit(X, y)  # None: fastbp's full batch
    np.testing.assert_array_equal(clf.loss_curve_, full.loss_curve_)


# ---------------------------------------------------------------- behaviour kept from before
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
    # binary: one logistic output with log loss; more: softmax with cross-entropy (as scikit-learn)
    expected = ("log_loss", 1, "logistic") if n_classes == 2 else ("cross_entropy", n_classes, "softmax")
    assert (clf.model_.loss_name, clf.n_outputs_, clf.out_activation_) == expected
    assert clf.model_.sizes == [4, 16, expected[1]] and clf.n_layers_ == 3
    assert [c.shape for c in clf.coefs_] == [(4, 16), (16, expected[1])]


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


def test_loss_curve_and_refit():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, max_iter=30)).fit(X, y)
    assert clf.n_iter_ == 30 and len(clf.loss_curve_) == 30 and clf.t_ == 30 * 150
    assert all(np.isfinite(clf.loss_curve_)) and clf.loss_ == clf.loss_curve_[-1]
    assert clf.best_loss_ == min(clf.loss_curve_) and clf.loss_curve_[-1] < clf.loss_curve_[0]
    first = list(clf.loss_curve_)
    again = clf.fit(X, y)  # refitting starts over rather than continuing, identically
    assert again is clf and clf.loss_curve_ == first


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
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 31
    assert clf.score(X, y) > 0.9
    with pytest.raises(ValueError, match="classes must not change"):
        clf.partial_fit(X, y, classes=["a", "b"])
    with pytest.raises(ValueError, match="labels not in classes"):
        clf.partial_fit(X[:3], ["a", "b", "z"])
    with pytest.raises(ValueError, match="features"):
        clf.partial_fit(X[:, :2], y)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        clf.set_params(early_stopping=True).partial_fit(X, y)
    assert len(clf.loss_curve_) == 31  # rejected calls change nothing


def test_partial_fit_matches_fit_epoch_for_epoch():
    """partial_fit is one epoch of fit's training: the same seeds give the same curve."""
    X, y = _blobs(3)
    fitted = MLPClassifier(**dict(FAST, max_iter=1)).fit(X, y)
    partial = MLPClassifier(**FAST).partial_fit(X, y, classes=[0, 1, 2])
    np.testing.assert_allclose(partial.loss_curve_, fitted.loss_curve_)
    np.testing.assert_allclose(partial.predict_proba(X), fitted.predict_proba(X))


def test_regressor_1d_and_2d_targets():
    X, y = _regression(2, n=200)
    fast = dict(FAST, learning_rate_init=0.01, max_iter=200)
    one = MLPRegressor(**fast).fit(X, y[:, 0])
    assert one.predict(X).shape == (200,) and one.predict(X).dtype == np.float64
    assert one.score(X, y[:, 0]) > 0.95
    assert one.model_.loss_name == "mse" and one.out_activation_ == "identity"
    two = MLPRegressor(**fast).fit(X, y)
    assert two.predict(X).shape == (200, 2) and two.n_outputs_ == 2
    assert two.score(X, y) > 0.95
    column = MLPRegressor(**fast).fit(X, y[:, :1])
    assert column.predict(X).shape == (200, 1)
    np.testing.assert_allclose(column.predict(X)[:, 0], one.predict(X))


def test_partial_fit_regressor():
    X, y = _regression(1)
    y = y[:, 0]
    reg = MLPRegressor(**dict(FAST, learning_rate_init=0.01))
    for _ in range(20):
        reg.partial_fit(X, y)
    assert reg.n_iter_ == 1 and len(reg.loss_curve_) == 20 and reg.t_ == 20 * 100
    assert reg.loss_curve_[-1] < reg.loss_curve_[0]
    assert reg.predict(X).shape == (100,)
    with pytest.raises(ValueError, match="y has the wrong shape"):
        reg.partial_fit(X, np.c_[y, y])


@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_unfitted_raises(Estimator):
    with pytest.raises(NotFittedError):
        Estimator().predict(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        Estimator().coefs_
    assert not hasattr(Estimator(), "n_outputs_")


# ---------------------------------------------------------------- bad input
BAD_PARAMETERS = [
    (dict(hidden_layer_sizes=(10, 0)), "hidden_layer_sizes\\[1\\]"),
    (dict(hidden_layer_sizes="10"), "hidden_layer_sizes must be"),
    (dict(activation="softplus"), "activation"),
    (dict(solver="lbfgs"), "solver='lbfgs' is not provided"),
    (dict(solver="newton"), "solver"),
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size="big"), "batch_size"),
    (dict(learning_rate="cosine"), "learning_rate"),
    (dict(learning_rate_init=-1.0), "learning_rate_init"),
    (dict(learning_rate_init=0.0), "learning_rate_init"),
    (dict(learning_rate_init=1e-50, dtype="float32"), "learning_rate_init"),
    (dict(power_t=-0.5), "power_t"),
    (dict(max_iter=0), "max_iter"),
    (dict(shuffle="yes"), "shuffle"),
    (dict(tol=-1e-4), "tol"),
    (dict(verbose=-1), "verbose"),
    (dict(warm_start="no"), "warm_start"),
    (dict(momentum=1.5), "momentum"),
    (dict(nesterovs_momentum="yes"), "nesterovs_momentum"),
    (dict(early_stopping=1), "early_stopping"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(early_stopping=True, validation_fraction=0.001), "validation_fraction"),
    (dict(beta_1=1.0), "beta_1"),
    (dict(beta_2=-0.1), "beta_2"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(n_iter_no_change=0), "n_iter_no_change"),
    (dict(n_iter_no_change=2.5), "n_iter_no_change"),
    (dict(max_fun=0), "max_fun"),
    (dict(dtype="float16"), "dtype"),
    (dict(strategy="fast"), "strategy"),
    (dict(random_state="seed"), "random_state|RandomState"),
]


@pytest.mark.parametrize("params, match", BAD_PARAMETERS)
def test_bad_hyper_parameters_are_named(params, match):
    X, y = _blobs(2, n=20)
    clf = MLPClassifier(**params)  # stored as-is; checked by fit
    with pytest.raises((ValueError, TypeError), match=match):
        clf.fit(X, y)
    assert not hasattr(clf, "model_") and not hasattr(clf, "n_features_in_")


def test_regressor_losses():
    X, y = _regression(1)
    assert MLPRegressor(**dict(FAST, max_iter=2, loss="squared_error")).fit(X, y[:, 0]).model_.loss_name == "mse"
    with pytest.raises(ValueError, match="loss='poisson' is not provided"):
        MLPRegressor(loss="poisson").fit(X, y[:, 0])
    with pytest.raises(ValueError, match="loss"):
        MLPRegressor(loss="huber").fit(X, y[:, 0])


def _state(clf, X):
    return (clf.predict_proba(X), list(clf.loss_curve_), clf.n_iter_, clf.t_, clf.model_.optimizer.steps,
            fb.to_numpy(clf.model_.optimizer.state.buffers).copy())


def _assert_state(clf, X, before):
    after = _state(clf, X)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1:5] == before[1:5]
    np.testing.assert_array_equal(after[5], before[5])


@pytest.mark.parametrize("params, match", BAD_PARAMETERS)
def test_rejected_calls_change_nothing(params, match):
    X, y = _blobs(3)
    clf = MLPClassifier(**FAST).fit(X, y)
    before = _state(clf, X)
    for call, name in ((lambda c: c.fit(X, y), match), (lambda c: c.partial_fit(X, y), None)):
        with pytest.raises((ValueError, TypeError), match=name):  # partial_fit may refuse early_stopping first
            call(clf.set_params(**params))
        _assert_state(clf, X, before)
        clf.set_params(**{k: MLPClassifier(**FAST).get_params()[k] for k in params})
    with pytest.raises(ValueError):
        clf.partial_fit(np.full_like(X, np.nan), y)
    _assert_state(clf, X, before)


def test_warm_start_checks_the_network_and_the_classes():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, max_iter=3, warm_start=True)).fit(X, y)
    before = _state(clf, X)
    for bad in [dict(hidden_layer_sizes=(8,)), dict(activation="tanh"), dict(dtype="float32")]:
        with pytest.raises(ValueError, match="warm_start / partial_fit continue the fitted network"):
            clf.set_params(**bad).fit(X, y)
        clf.set_params(**{k: FAST.get(k, MLPClassifier().get_params()[k]) for k in bad})
    with pytest.raises(ValueError, match="warm_start can only be used where y has the same classes"):
        clf.fit(X[y != 2], y[y != 2])
    _assert_state(clf, X, before)
    clf.fit(X, y)  # and the valid call still continues
    assert len(clf.loss_curve_) == 6


def test_divergence_mid_fit_leaves_a_warm_started_model_as_it_was():
    X, y = _regression(1)
    reg = MLPRegressor(**dict(FAST, solver="sgd", learning_rate_init=0.01, max_iter=3, warm_start=True)).fit(X, y[:, 0])
    coefs, curve = reg.coefs_, list(reg.loss_curve_)
    with pytest.raises(fb.TrainingDivergedError) as info:
        reg.set_params(learning_rate_init=50.0, max_iter=20).fit(X, 1e3 * y[:, 0])
    assert len(info.value.history) >= 1  # epochs that did change the network before it diverged
    assert reg.loss_curve_ == curve
    for a, b in zip(reg.coefs_, coefs):
        np.testing.assert_array_equal(a, b)


def test_coefs_setter_checks_everything_first():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, max_iter=2)).fit(X, y)
    coefs = clf.coefs_
    with pytest.raises(ValueError, match=r"coefs_\[1\] has the wrong shape"):
        clf.coefs_ = [np.zeros((4, 16)), np.zeros((16, 4))]
    with pytest.raises(ValueError, match=r"coefs_ must be a list of 2 arrays"):
        clf.coefs_ = [np.zeros((4, 16))]
    with pytest.raises(ValueError, match=r"intercepts_\[0\]"):
        clf.intercepts_ = [np.full(16, np.nan), np.zeros(3)]
    for a, b in zip(clf.coefs_, coefs):
        np.testing.assert_array_equal(a, b)
    clf.coefs_ = [np.zeros((4, 16)), np.ones((16, 3))]
    np.testing.assert_array_equal(clf.model_.weights[1], np.ones((3, 16)))
    with pytest.raises(NotFittedError):
        MLPClassifier().coefs_ = coefs


def test_dtype_and_divergence():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, dtype=np.float32)).fit(X, y)
    assert clf.model_.dtype == np.float32 and clf.coefs_[0].dtype == np.float32
    np.testing.assert_allclose(clf.predict_proba(X).sum(axis=1), 1.0, atol=1e-6)
    reg = MLPRegressor(**dict(FAST, solver="sgd", learning_rate_init=10.0))
    with pytest.raises(fb.TrainingDivergedError):
        reg.fit(X, 1e3 * X[:, 0])
    assert not hasattr(reg, "model_")


def test_hyper_parameters_reach_the_model():
    X, y = _blobs(3, n=60)
    clf = MLPClassifier(hidden_layer_sizes=[7, 5], activation="logistic", batch_size=None, solver="sgd",
                        learning_rate_init=0.5, max_iter=3, dtype="float32", strategy="loop",
                        random_state=1).fit(X, y)
    assert clf.model_.sizes == [4, 7, 5, 3] and clf.model_.activation == "sigmoid"
    assert clf.model_.dtype == np.float32
    assert clf.get_params()["hidden_layer_sizes"] == [7, 5]  # stored as given
    loop = clf.loss_curve_
    vectorized = clone(clf).set_params(strategy="vectorized", dtype="float64").fit(X, y).loss_curve_
    np.testing.assert_allclose(loop, vectorized, rtol=1e-4)
    sgd = MLPClassifier(**dict(FAST, solver="sgd", momentum=0.8, nesterovs_momentum=False)).fit(X, y)
    opt = sgd.model_.optimizer
    assert (opt.kind, opt.momentum, opt.nesterov, opt.lr) == ("sgd", 0.8, False, 0.02)
    adam = MLPClassifier(**dict(FAST, beta_1=0.8, beta_2=0.99, epsilon=1e-6, alpha=0.5)).fit(X, y)
    opt = adam.model_.optimizer
    assert (opt.kind, opt.betas, opt.eps, opt.rule().l2) == ("adam", (0.8, 0.99), 1e-6, 0.5)


def test_pickle_round_trip_is_exact_and_keeps_training():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, alpha=0.1)).partial_fit(X, y, classes=[0, 1, 2])
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.model_ is not clf.model_ and copy.model_.backend.name == fb.get_backend().name
    # the optimizer state travels with the network (and alpha is set again): both continue identically
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
    assert "pip install scikit-learn" in out.stdout


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


def test_n_iter_no_change_inf_runs_every_epoch():
    X, y = _blobs(3)
    clf = MLPClassifier(**dict(FAST, max_iter=7, n_iter_no_change=math.inf, tol=100.0)).fit(X, y)
    assert clf.n_iter_ == 7
