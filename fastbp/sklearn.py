"""scikit-learn estimators backed by fastbp: :class:`MLPClassifier` and :class:`MLPRegressor`.

    from fastbp.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=0).fit(X, y)
    clf.predict_proba(X_test)

They wrap :class:`fastbp.MLP`, trained by plain mini-batch SGD on the active backend
(the model is ``model_``), and behave like any scikit-learn estimator: ``clone``,
``Pipeline``, ``GridSearchCV``, pickling. scikit-learn is an optional extra
(``pip install 'fastbp[sklearn]'``); ``import fastbp`` never imports it, this module does.
"""

from __future__ import annotations

import contextlib
import copy
import numbers

import numpy as np

_INSTALL = "pip install 'fastbp[sklearn]'"

try:
    import sklearn
except ImportError as exc:
    raise ImportError(f"fastbp.sklearn needs scikit-learn, which is not installed. To fix: {_INSTALL}") from exc
try:  # validate_data and __sklearn_tags__ arrived in scikit-learn 1.6
    from sklearn.utils.validation import validate_data
except ImportError as exc:
    raise ImportError(f"fastbp.sklearn needs scikit-learn >= 1.6. Received: scikit-learn {sklearn.__version__}. "
                      f"To fix: pip install -U 'scikit-learn>=1.6' (or {_INSTALL})") from exc
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state

from . import _validate as check
from .kernels.base import ELEMENTWISE_ACTIVATIONS
from .network import MLP
from .training import STRATEGIES

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATION_ALIASES = {"logistic": "sigmoid"}  # scikit-learn's name for it
_AUTO_BATCH = 200  # batch_size="auto" is min(200, n_samples), as in scikit-learn
_SEED_LIMIT = 2**31 - 1


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: hyper-parameters, training, pickling."""

    def __init__(self, hidden_layer_sizes, activation, *, batch_size, learning_rate_init, max_iter,
                 shuffle, random_state, dtype, strategy, verbose):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.dtype = dtype
        self.strategy = strategy
        self.verbose = verbose

    # Subclasses define _validate_xy(X, y, reset) -> (X, y); _targets(y, reset, ...) -> (Y, attrs),
    # the targets for fb.MLP.fit and the attributes they fix (set once training succeeds);
    # _loss_and_outputs(Y, attrs) -> (loss, n_outputs).

    # ------------------------------------------------------------ hyper-parameters
    def _hyper(self) -> dict:
        """Every hyper-parameter checked, before anything is touched, as fb.MLP / fit arguments."""
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = (sizes,)
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
            raise TypeError("hidden_layer_sizes must be an int or a sequence of ints. "
                            f"Received: hidden_layer_sizes={self.hidden_layer_sizes!r}. Expected e.g. (100,)")
        sizes = [check.positive_int(f"hidden_layer_sizes[{i}]", size) for i, size in enumerate(sizes)]

        activation = _ACTIVATION_ALIASES.get(self.activation, self.activation)
        if activation not in ELEMENTWISE_ACTIVATIONS:
            raise ValueError(f"unknown activation. Received: activation={self.activation!r}. "
                             f"Expected one of {list(ELEMENTWISE_ACTIVATIONS) + list(_ACTIVATION_ALIASES)}")
        batch = self.batch_size
        if isinstance(batch, str):
            if batch != "auto":
                raise ValueError(f"unknown batch_size. Received: batch_size={batch!r}. "
                                 "Expected 'auto', None or an int >= 1")
        else:
            check.positive_int("batch_size", batch, allow_none=True)
        if not isinstance(self.shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool. Received: shuffle={self.shuffle!r}")
        verbose = self.verbose
        if not isinstance(verbose, (bool, np.bool_)) and not (isinstance(verbose, numbers.Integral) and verbose >= 0):
            raise TypeError(f"verbose must be a bool or an int >= 0. Received: verbose={verbose!r}")
        return dict(sizes=sizes, activation=activation, dtype=check.float_dtype("dtype", self.dtype).name,
                    rng=check_random_state(self.random_state), epochs=check.positive_int("max_iter", self.max_iter),
                    fit=dict(lr=check.positive_float("learning_rate_init", self.learning_rate_init),
                             shuffle=bool(self.shuffle), strategy=check.choice("strategy", self.strategy, STRATEGIES),
                             progress=bool(verbose)))

    # ------------------------------------------------------------ training
    def _train(self, model: MLP, X, Y, epochs: int, hyper: dict, stream) -> list[float]:
        batch = min(_AUTO_BATCH, X.shape[0]) if isinstance(self.batch_size, str) else self.batch_size
        history = model.fit(X, Y, epochs=epochs, batch_size=batch, seed=int(stream.integers(_SEED_LIMIT)),
                            **hyper["fit"])
        return list(history)

    def _fit_new(self, X, Y, attrs: dict, epochs: int, hyper: dict) -> None:
        """A fresh model trained for ``epochs``; attributes change only once training succeeds."""
        loss, n_outputs = self._loss_and_outputs(Y, attrs)
        rng = hyper["rng"]
        model = MLP([X.shape[1], *hyper["sizes"], n_outputs], activation=hyper["activation"], loss=loss,
                    dtype=hyper["dtype"], seed=int(rng.randint(_SEED_LIMIT)))
        stream = np.random.default_rng(rng.randint(_SEED_LIMIT))  # per-call shuffle seeds; picklable
        curve = self._train(model, X, Y, epochs, hyper, stream)
        for name, value in attrs.items():
            setattr(self, name, value)
        self.model_, self._stream = model, stream
        self.loss_curve_ = curve
        self.loss_ = curve[-1]
        self.n_iter_ = len(curve)

    @contextlib.contextmanager
    def _unchanged_on_error(self):
        """A call that raises leaves the estimator as it was: validate_data records
        n_features_in_ before the targets are checked, and a shuffle stream advances
        before a fit that may diverge (the model itself restores its parameters)."""
        saved = dict(self.__dict__)
        stream = copy.deepcopy(saved.get("_stream"))
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            if stream is not None:
                self._stream = stream
            raise

    def _fit(self, X, y):
        with self._unchanged_on_error():
            hyper = self._hyper()
            X, y = self._validate_xy(X, y, reset=True)
            Y, attrs = self._targets(y, reset=True)
            self._fit_new(X, Y, attrs, hyper["epochs"], hyper)
        return self

    def _partial_fit(self, X, y, **kwargs):
        with self._unchanged_on_error():
            hyper = self._hyper()
            first = not self.__sklearn_is_fitted__()
            X, y = self._validate_xy(X, y, reset=first)
            Y, attrs = self._targets(y, reset=first, **kwargs)
            if first:
                self._fit_new(X, Y, attrs, 1, hyper)
            else:
                curve = self._train(self.model_, X, Y, 1, hyper, self._stream)
                self.loss_curve_ = self.loss_curve_ + curve
                self.loss_ = curve[-1]
                self.n_iter_ += len(curve)
        return self

    def _outputs(self, X) -> np.ndarray:
        """The network's output activations for X, float64, shape (n_samples, n_outputs)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return np.asarray(self.model_.predict(X), dtype=np.float64)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multilayer perceptron classifier trained by backpropagation and mini-batch SGD.

    Two classes: one sigmoid output with log_loss; more: a softmax output with
    cross_entropy. Labels may be ints, strings, bools, whole-valued floats: anything
    ``numpy.unique`` can sort that scikit-learn takes as classes (not continuous values).

    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default=(100,)
        Width of each hidden layer; ``()`` gives logistic / softmax regression.
    activation : {"relu", "sigmoid" (alias "logistic"), "tanh", "leaky_relu", "identity"}, default="relu"
        Hidden-layer activation.
    batch_size : int, None or "auto", default=32
        Examples per SGD step: 1 is per-example SGD, None the full batch, "auto" ``min(200, n_samples)``.
    learning_rate_init : float > 0, default=0.1
        The (constant) SGD learning rate.
    max_iter : int >= 1, default=200
        Epochs run by :meth:`fit` (all of them: there is no early stopping).
    shuffle : bool, default=True
        Reshuffle the examples every epoch.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights and the shuffles.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the parameters and the arithmetic. float32 is faster (on a GPU by far);
        float64 makes predictions independent, to rounding, of how X is split into rows.
    strategy : {"vectorized", "loop"}, default="vectorized"
        Batch matrix form, or the per-example loop (same numbers, the naive way).
    verbose : bool or int, default=False
        Show a progress bar while fitting.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    model_ : fastbp.MLP, the trained network ``[n_features_in_, *hidden_layer_sizes, n_outputs]``
    loss_curve_ : list of float, the mean training loss of each epoch run (fit and partial_fit)
    loss_ : float, the last of them
    n_iter_ : int, epochs run
    n_features_in_ : int
    feature_names_in_ : ndarray of str, when X had string column names
    """

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, batch_size=32, learning_rate_init=0.1,
                 max_iter=200, shuffle=True, random_state=None, dtype="float64", strategy="vectorized",
                 verbose=False):
        super().__init__(hidden_layer_sizes, activation, batch_size=batch_size,
                         learning_rate_init=learning_rate_init, max_iter=max_iter, shuffle=shuffle,
                         random_state=random_state, dtype=dtype, strategy=strategy, verbose=verbose)

    def fit(self, X, y):
        """Train a new network on X (n_samples, n_features) and labels y (n_samples,) for ``max_iter`` epochs."""
        return self._fit(X, y)

    def partial_fit(self, X, y, classes=None):
        """One epoch of SGD over X, y; the first call makes the network and needs ``classes``,
        every label that may ever occur (later calls may omit it or must repeat it)."""
        if classes is None and not self.__sklearn_is_fitted__():
            raise ValueError("classes must be given on the first call to partial_fit. Received: classes=None. "
                             "Expected every label that may occur, e.g. classes=np.unique(y_all)")
        return self._partial_fit(X, y, classes=classes)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), columns in the order of ``classes_``."""
        out = self._outputs(X)
        if out.shape[1] == 1:
            return np.hstack([1.0 - out, out])
        return out

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row, shape (n_samples,)."""
        index = np.argmax(self.predict_proba(X), axis=1)
        return self.classes_[index]

    def _validate_xy(self, X, y, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        return X, y

    def _targets(self, y, reset, classes=None):
        """Labels as indices into classes_ (fixed by the first fit: y's labels, or ``classes``)."""
        if reset:
            known = np.unique(y if classes is None else np.asarray(classes))
            if known.shape[0] < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes to train. Received: "
                                 f"{known.shape[0]} class{'' if known.shape[0] == 1 else 'es'} {known.tolist()}")
        else:
            known = self.classes_
            if classes is not None and not np.array_equal(np.unique(np.asarray(classes)), known):
                raise ValueError("classes must not change between calls to partial_fit. Received: "
                                 f"classes={np.unique(np.asarray(classes))!r}. Expected {known!r} (classes_)")
        index = np.searchsorted(known, y)
        unseen = (index >= known.shape[0]) | (known[np.minimum(index, known.shape[0] - 1)] != y)
        if unseen.any():
            raise ValueError(f"y has labels not in classes. Received: {np.unique(y[unseen])!r}. "
                             f"Expected labels among {known!r}")
        return (index.astype(np.float64) if known.shape[0] == 2 else index), {"classes_": known}

    def _loss_and_outputs(self, Y, attrs):
        k = attrs["classes_"].shape[0]
        return ("log_loss", 1) if k == 2 else ("cross_entropy", k)


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multilayer perceptron regressor: identity output, mean squared error, mini-batch SGD.

    y of shape (n_samples,) is predicted as (n_samples,); y of shape
    (n_samples, n_targets) as (n_samples, n_targets). The cost per example is
    ``1/2 * sum_j (y_j - a_j)^2``; its gradient grows with y, hence the smaller default
    learning rate than the classifier's. Standardising X and y helps plain SGD most.

    Parameters
    ----------
    As :class:`MLPClassifier`, except learning_rate_init : float > 0, default=0.001.

    Attributes
    ----------
    model_ : fastbp.MLP, the trained network ``[n_features_in_, *hidden_layer_sizes, n_targets]``
    loss_curve_ : list of float, the mean training loss of each epoch run (fit and partial_fit)
    loss_ : float, the last of them
    n_iter_ : int, epochs run
    n_features_in_ : int
    feature_names_in_ : ndarray of str, when X had string column names
    """

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, batch_size=32, learning_rate_init=0.001,
                 max_iter=200, shuffle=True, random_state=None, dtype="float64", strategy="vectorized",
                 verbose=False):
        super().__init__(hidden_layer_sizes, activation, batch_size=batch_size,
                         learning_rate_init=learning_rate_init, max_iter=max_iter, shuffle=shuffle,
                         random_state=random_state, dtype=dtype, strategy=strategy, verbose=verbose)

    def fit(self, X, y):
        """Train a new network on X (n_samples, n_features), y (n_samples,) or (n_samples, n_targets)."""
        return self._fit(X, y)

    def partial_fit(self, X, y):
        """One epoch of SGD over X, y (the first call makes the network)."""
        return self._partial_fit(X, y)

    def predict(self, X) -> np.ndarray:
        """Predictions, shape (n_samples,) when fitted on a 1-D y, else (n_samples, n_targets)."""
        out = self._outputs(X)
        return out[:, 0] if self._y_1d else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _validate_xy(self, X, y, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32),
                             multi_output=True, y_numeric=True)
        return X, np.asarray(y, dtype=np.float64)

    def _targets(self, y, reset):
        if not reset:
            n_targets = self.model_.sizes[-1]
            if (y.ndim == 1 and n_targets != 1) or (y.ndim == 2 and y.shape[1] != n_targets):
                raise ValueError(f"y has the wrong shape. Received: shape {y.shape}. "
                                 f"Expected (n_samples, {n_targets})" + (" or (n_samples,)" if n_targets == 1 else ""))
        return y, {"_y_1d": y.ndim == 1}

    def _loss_and_outputs(self, Y, attrs):
        return "mse", 1 if Y.ndim == 1 else Y.shape[1]
