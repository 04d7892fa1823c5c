"""scikit-learn estimators backed by fastbp: :class:`MLPClassifier` and :class:`MLPRegressor`.

    from fastbp.sklearn import MLPClassifier
    clf = MLPClassifier(hidden_layer_sizes=(64,), random_state=0).fit(X, y)
    clf.predict_proba(X_test), clf.loss_curve_, clf.n_iter_

Drop-in replacements for scikit-learn's estimators of the same names: the same parameters with
the same defaults and meanings (``solver`` "adam" or "sgd", ``alpha``, the learning-rate
schedules, momentum, early stopping, ``warm_start``, ...), the same fitted attributes, the same
initial weights (drawn from ``random_state`` as scikit-learn draws them), the same validation
split and the same stopping rules. Training is one :meth:`fastbp.MLP.fit` call per ``fit`` on
the active backend (the network is ``model_``); scikit-learn's end-of-epoch logic
(``_fit_stochastic``: the no-improvement count, "adaptive" and "invscaling" rates, validation
scores, restoring the best weights) runs in it as a :class:`fastbp.Callback`.

How scikit-learn's formulas map onto fastbp's update rules (torch.optim's):

* SGD with momentum. scikit-learn keeps a velocity ``v = momentum v - lr g`` and adds it
  (Nesterov: adds ``momentum v - lr g``); fastbp keeps ``m = momentum m + g`` and subtracts
  ``lr m`` (Nesterov: ``lr (g + momentum m)``). With a constant rate ``v = -lr m`` step after
  step: the same trajectory. When the rate changes ("invscaling", "adaptive"), scikit-learn's
  velocity still carries the old rate's steps, whereas torch's form would rescale them; so at
  each change the estimator multiplies ``m`` by ``lr_old / lr_new``, which keeps ``v = -lr m``
  and scikit-learn's trajectory exactly.
* Adam. scikit-learn adds ``epsilon`` to ``sqrt(v)`` before the bias correction, torch after it:
  scikit-learn's step is torch's with ``epsilon * sqrt(1 - beta_2**t)``. fastbp keeps torch's
  form; the steps differ by a relative ``O(epsilon / sqrt(v_hat))`` (about 1e-6 for typical
  gradients, more in the first steps) and agree to rounding for a tiny ``epsilon``.
* ``alpha``: L2 on the weights only, ``alpha W / rows`` added to a batch's mean gradient (the
  rule's ``l2``) and ``0.5 alpha ||W||^2 / rows`` to its loss. The loss term needs each batch's
  pre-update ``||W||^2``, but a fit reports per epoch: for full-batch training it is exact, for
  mini-batches it is interpolated linearly between the epoch's first and last weights. The error
  is a few percent of the term itself (~1e-7 at the default alpha; ~1e-4, the default ``tol``,
  for alpha=0.01 and batches of 16 in the first epochs); the weights are exact either way.
* Losses: ``loss_curve_`` holds each epoch's mean pre-update batch loss, as in scikit-learn; the
  regressor's squared error is averaged over the outputs as scikit-learn's is (its gradient is
  not, in either library).

scikit-learn is an optional extra (``pip install '.[sklearn]' in the checkout, or pip install scikit-learn``); ``import fastbp`` never
imports it, this module does.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings

import numpy as np

_INSTALL = "pip install '.[sklearn]' in the checkout, or pip install scikit-learn"

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
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, check_random_state

from . import _validate as check
from . import optim
from .backend import to_numpy
from .kernels.base import ELEMENTWISE_ACTIVATIONS, OptimizerState
from .network import MLP
from .training import STRATEGIES, Callback

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATION_ALIASES = {"logistic": "sigmoid"}  # scikit-learn's name for it
_SOLVERS = ("sgd", "adam")
_LEARNING_RATES = ("constant", "invscaling", "adaptive")
_AUTO_BATCH = 200  # batch_size="auto" is min(200, n_samples)
_ADAPTIVE_DIVISOR = 5.0  # scikit-learn's "adaptive": lr /= 5 ...
_ADAPTIVE_MIN_LR = 1e-6  # ... until it is at most 1e-6, then stop
_SEED_LIMIT = 2**31 - 1


# ---------------------------------------------------------------- optimizers carrying alpha
class _AlphaMixin:
    """An fb.optim rule plus scikit-learn's ``alpha`` (``UpdateRule.l2``: ``alpha W / rows``,
    weights only). The kind stays "sgd" / "adam", so a saved model reloads as the plain rule;
    the estimator sets ``alpha`` again on every call (scikit-learn reads it at every step too)."""

    alpha = 0.0

    def rule(self, l2: float = 0.0):
        return super().rule(l2=self.alpha + l2)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        public = next(c for c in type(self).__mro__ if c in optim.OPTIMIZERS.values())
        return f"{public.__name__}({args}) with alpha={self.alpha!r}"


class _SGD(_AlphaMixin, optim.SGD):
    pass


class _Adam(_AlphaMixin, optim.Adam):
    pass


def _continued(opt: optim.Optimizer, alpha: float) -> optim.Optimizer:
    """``opt``'s hyper-parameters and state (shared, not copied) in the alpha-carrying class."""
    cls = {"sgd": _SGD, "adam": _Adam}[opt.kind]
    new = cls(**opt.get_config())
    new.state, new.alpha = opt.state, alpha
    return new


# ---------------------------------------------------------------- argument checks
def _number(name, value, *, low, high=math.inf, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Received: {name}={value!r} ({type(value).__name__})")
    value = float(value)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not (math.isfinite(value) and ok):
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected a finite number in "
                         f"{left}{low:g}, {high:g}{right}")
    return value


def _flag(name, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool. Received: {name}={value!r} ({type(value).__name__})")
    return bool(value)


# ---------------------------------------------------------------- scikit-learn's epoch end
class _Progress:
    """What scikit-learn carries from one call to the next (reset by a fresh fit)."""

    def __init__(self, early_stopping: bool, best_params: np.ndarray) -> None:
        self.loss_curve: list[float] = []
        self.t = 0
        self.no_improvement = 0
        self.best_loss = None if early_stopping else math.inf
        self.validation_scores = [] if early_stopping else None
        self.best_validation_score = -math.inf if early_stopping else None
        self.best_params = best_params  # scikit-learn's _best_coefs: the initial ones until beaten

    @classmethod
    def of(cls, est) -> "_Progress":
        """A copy of a fitted estimator's, so a failed call leaves the estimator's own untouched."""
        p = cls.__new__(cls)
        p.loss_curve, p.t, p.no_improvement = list(est.loss_curve_), est.t_, est._no_improvement_count
        p.best_loss, p.best_validation_score = est.best_loss_, est.best_validation_score_
        p.validation_scores = None if est.validation_scores_ is None else list(est.validation_scores_)
        p.best_params = est._best_params
        return p


class _EpochEnd(Callback):
    """scikit-learn's ``_fit_stochastic`` after each epoch, inside one :meth:`fastbp.MLP.fit`.

    Appends the epoch's loss (scikit-learn's definition, see the module docstring), updates the
    no-improvement count from the training loss or, with early stopping, the validation score
    (keeping the best parameters), sets the next rate ("invscaling": ``lr_init / (t_ + 1) **
    power_t``), and when the count exceeds ``n_iter_no_change`` divides an "adaptive" SGD rate
    by 5 (down to 1e-6) or stops. With early stopping the best parameters are put back at the end.
    """

    def __init__(self, progress: _Progress, setup: dict, *, tol, n_iter_no_change, max_iter, incremental,
                 n_train, n_batches, alpha, loss_scale, score, verbose) -> None:
        self.p, self.setup = progress, setup
        self.tol, self.n_iter_no_change, self.max_iter = tol, n_iter_no_change, max_iter
        self.incremental, self.n_train, self.n_batches = incremental, n_train, n_batches
        self.alpha, self.loss_scale, self.score, self.verbose = alpha, loss_scale, score, verbose

    def on_train_begin(self, logs):
        net = self.model
        self.n_iter, self.hit_max_iter = 0, False
        self.sq_start = _weights_sq(net) if self.alpha else 0.0
        if self.score is not None:
            self.best = net.backend.asarray(self.p.best_params, net.dtype).copy()

    def on_epoch_end(self, epoch, logs):
        net, p = self.model, self.p
        self.n_iter += 1
        p.t += self.n_train
        loss = logs["loss"] / self.loss_scale
        if self.alpha:
            sq_end, k = _weights_sq(net), self.n_batches
            loss += 0.5 * self.alpha * (k * self.sq_start + 0.5 * (k - 1) * (sq_end - self.sq_start)) / self.n_train
            self.sq_start = sq_end
        p.loss_curve.append(loss)
        if self.verbose:
            print("Iteration %d, loss = %.8f" % (self.n_iter, loss))

        if self.score is not None:
            score = self.score(net)
            p.validation_scores.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < p.best_validation_score + self.tol:  # NaN compares False: the count resets, as in sklearn
                p.no_improvement += 1
            else:
                p.no_improvement = 0
            if score > p.best_validation_score:
                p.best_validation_score = score
                self.best[...] = net._params
        else:
            if loss > p.best_loss - self.tol:
                p.no_improvement += 1
            else:
                p.no_improvement = 0
            if loss < p.best_loss:
                p.best_loss = loss

        sgd = self.setup["kind"] == "sgd"
        if sgd and self.setup["learning_rate"] == "invscaling":
            self._set_lr(float(self.setup["learning_rate_init"]) / (p.t + 1) ** self.setup["power_t"])
        stop = False
        if p.no_improvement > self.n_iter_no_change:
            what = "Validation score" if self.score is not None else "Training loss"
            msg = f"{what} did not improve more than tol={self.tol:f} for {self.n_iter_no_change} consecutive epochs."
            if not (sgd and self.setup["learning_rate"] == "adaptive"):
                stop, msg = True, msg + " Stopping."
            elif net.optimizer.lr <= _ADAPTIVE_MIN_LR:
                stop, msg = True, msg + " Learning rate too small. Stopping."
            else:
                self._set_lr(net.optimizer.lr / _ADAPTIVE_DIVISOR)
                p.no_improvement = 0
                msg += " Setting learning rate to %f" % net.optimizer.lr
            if self.verbose:
                print(msg)
        if not stop and not self.incremental and self.n_iter == self.max_iter:
            self.hit_max_iter = True
        return stop

    def on_train_end(self, logs):
        if self.score is not None:  # scikit-learn restores the best weights whenever it early-stops
            self.model._params[...] = self.best
            self.p.best_params = to_numpy(self.best).copy()

    def _set_lr(self, lr: float) -> None:
        """The next epoch's rate; the momentum buffer rescaled to keep scikit-learn's velocity."""
        opt = self.model.optimizer
        if lr == opt.lr:
            return
        if opt.kind == "sgd" and opt.momentum and opt.state.buffers.shape[0]:
            opt.state.buffers[0] *= opt.lr / lr
        opt.lr = lr


def _weights_sq(net) -> float:
    """``sum_l ||W_l||^2`` (the weights, not the biases), as a Python float."""
    xp = net.backend.xp
    return float(sum(float(xp.vdot(w, w)) for w in net.weights))


# ---------------------------------------------------------------- the shared estimator
class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: hyper-parameters, training, attributes."""

    def __init__(self, hidden_layer_sizes, activation, *, solver, alpha, batch_size, learning_rate,
                 learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose, warm_start,
                 momentum, nesterovs_momentum, early_stopping, validation_fraction, beta_1, beta_2, epsilon,
                 n_iter_no_change, max_fun, dtype, strategy):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.strategy = strategy

    # Subclasses define _validate_xy(X, y, reset) -> (X, y); _targets(y, first, incremental,
    # classes) -> (Y, attrs): the targets for fb.MLP.fit and the attributes they fix (set once
    # training succeeds); _network(Y, attrs) -> (loss, output activation name, n_outputs);
    # _loss_scale(n_outputs); _stratify(Y) -> bool; _scorer(X_val, Y_val, attrs) -> score(net).

    # ------------------------------------------------------------ hyper-parameters
    def _hyper(self) -> dict:
        """Every hyper-parameter checked before anything is touched (a rejected call changes nothing)."""
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
        if self.solver == "lbfgs":
            raise ValueError("solver='lbfgs' is not provided by fastbp (a full-batch quasi-Newton method, not "
                             "backpropagation by gradient steps). Received: solver='lbfgs'. Expected 'adam' or "
                             "'sgd' (or scikit-learn's own MLP for lbfgs)")
        solver = check.choice("solver", self.solver, _SOLVERS)
        dtype = check.float_dtype("dtype", self.dtype)
        batch = self.batch_size
        if isinstance(batch, str):
            if batch != "auto":
                raise ValueError(f"unknown batch_size. Received: batch_size={batch!r}. "
                                 "Expected 'auto', an int >= 1 or None (full batch)")
        else:
            check.positive_int("batch_size", batch, allow_none=True)
        verbose = self.verbose
        if not isinstance(verbose, (bool, np.bool_)) and not (isinstance(verbose, numbers.Integral) and verbose >= 0):
            raise TypeError(f"verbose must be a bool or an int >= 0. Received: verbose={verbose!r}")
        n_iter_no_change = self.n_iter_no_change
        if not (isinstance(n_iter_no_change, float) and n_iter_no_change == math.inf):
            n_iter_no_change = check.positive_int("n_iter_no_change", n_iter_no_change)
        hp = dict(
            sizes=sizes, activation=activation, solver=solver, dtype=dtype,
            alpha=_number("alpha", self.alpha, low=0.0),
            learning_rate=check.choice("learning_rate", self.learning_rate, _LEARNING_RATES),
            learning_rate_init=check.positive_float("learning_rate_init", self.learning_rate_init, dtype),
            power_t=_number("power_t", self.power_t, low=0.0),
            max_iter=check.positive_int("max_iter", self.max_iter),
            shuffle=_flag("shuffle", self.shuffle),
            tol=_number("tol", self.tol, low=0.0),
            verbose=bool(verbose),
            warm_start=_flag("warm_start", self.warm_start),
            momentum=_number("momentum", self.momentum, low=0.0, high=1.0),
            nesterovs_momentum=_flag("nesterovs_momentum", self.nesterovs_momentum),
            early_stopping=_flag("early_stopping", self.early_stopping),
            validation_fraction=_number("validation_fraction", self.validation_fraction, low=0.0, high=1.0,
                                        high_open=True),
            beta_1=_number("beta_1", self.beta_1, low=0.0, high=1.0, high_open=True),
            beta_2=_number("beta_2", self.beta_2, low=0.0, high=1.0, high_open=True),
            epsilon=_number("epsilon", self.epsilon, low=0.0, low_open=True),
            n_iter_no_change=n_iter_no_change,
            max_fun=check.positive_int("max_fun", self.max_fun),  # lbfgs only; checked as scikit-learn does
            strategy=check.choice("strategy", self.strategy, STRATEGIES),
        )
        hp["rng"] = check_random_state(self.random_state)  # last: names random_state in its own error
        return hp

    # ------------------------------------------------------------ training
    def _fit(self, X, y, incremental: bool, classes=None):
        with self._unchanged_on_error():
            hp = self._hyper()
            if incremental and hp["early_stopping"]:
                raise ValueError("partial_fit does not support early_stopping=True. Received: early_stopping=True. "
                                 "Expected early_stopping=False for partial_fit (or use fit)")
            first = not self.__sklearn_is_fitted__() or (not hp["warm_start"] and not incremental)
            X, y = self._validate_xy(X, y, reset=first)
            Y, attrs = self._targets(y, first=first, incremental=incremental, warm=hp["warm_start"], classes=classes)
            loss, output, n_outputs = self._network(Y, attrs)
            sizes = [X.shape[1], *hp["sizes"], n_outputs]
            rng = hp["rng"]  # a fresh RandomState(random_state) per call, as scikit-learn's _fit makes
            if first:
                model = self._new_model(sizes, loss, hp, rng)
                progress = _Progress(hp["early_stopping"], to_numpy(model._params).copy())
            else:
                model = self.model_
                self._check_same_network(model, sizes, hp)
                progress = _Progress.of(self)
                if hp["early_stopping"] and progress.validation_scores is None:  # earlier fits had it off
                    progress.validation_scores, progress.best_validation_score = [], -math.inf
                if not hp["early_stopping"] and progress.best_loss is None:
                    progress.best_loss = math.inf

            # scikit-learn makes a new optimizer for every fit and keeps it across partial_fit calls
            if incremental and not first and model.optimizer is not None and self._solver_setup is not None:
                opt, setup = _continued(model.optimizer, hp["alpha"]), self._solver_setup
            else:
                opt, setup = self._new_optimizer(hp)

            X_train, Y_train, score = X, Y, None
            if hp["early_stopping"]:
                train, val = self._split(Y, hp, rng)
                X_train, Y_train = X[train], Y[train]
                score = self._scorer(model.backend.asarray(X[val], model.dtype), Y[val], attrs)
            n_train = X_train.shape[0]
            batch = self._batch(n_train)
            loop = _EpochEnd(progress, setup, tol=hp["tol"], n_iter_no_change=hp["n_iter_no_change"],
                             max_iter=hp["max_iter"], incremental=incremental, n_train=n_train,
                             n_batches=-(-n_train // batch), alpha=hp["alpha"], loss_scale=self._loss_scale(n_outputs),
                             score=score, verbose=hp["verbose"])
            seed = int(rng.randint(_SEED_LIMIT)) if hp["shuffle"] else 0
            model.fit(X_train, Y_train, epochs=1 if incremental else hp["max_iter"], batch_size=batch,
                      optimizer=opt, shuffle=hp["shuffle"], strategy=hp["strategy"], progress=False, seed=seed,
                      callbacks=[loop])

            for name, value in attrs.items():
                setattr(self, name, value)
            self.model_, self._solver_setup = model, setup
            self.loss_curve_, self.loss_ = progress.loss_curve, progress.loss_curve[-1]
            self.n_iter_, self.t_ = loop.n_iter, progress.t
            self.best_loss_, self._no_improvement_count = progress.best_loss, progress.no_improvement
            self.validation_scores_ = progress.validation_scores
            self.best_validation_score_ = progress.best_validation_score
            self._best_params = progress.best_params
        if loop.hit_max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({hp['max_iter']}) reached and the "
                          "optimization hasn't converged yet.", ConvergenceWarning)
        return self

    def _new_model(self, sizes, loss, hp, rng) -> MLP:
        """A network with scikit-learn's initialisation, drawn from ``rng`` in scikit-learn's order:
        per layer, weights then biases, uniform in +-sqrt(factor / (fan_in + fan_out)), factor 2
        for the logistic activation and 6 for the others (Glorot)."""
        model = MLP(sizes, activation=hp["activation"], loss=loss, dtype=hp["dtype"], seed=0)
        factor = 2.0 if hp["activation"] == "sigmoid" else 6.0
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            weights.append(rng.uniform(-bound, bound, (fan_in, fan_out)).T)  # scikit-learn's coefs_ are W^T
            biases.append(rng.uniform(-bound, bound, fan_out))
        model.set_params(weights, biases)
        return model

    def _check_same_network(self, model, sizes, hp) -> None:
        """warm_start / partial_fit continue ``model_``: its shape, activation and dtype must still hold."""
        now = (list(sizes), hp["activation"], hp["dtype"].name)
        was = (model.sizes, model.activation, model.dtype.name)
        if now != was:
            raise ValueError("warm_start / partial_fit continue the fitted network, which these parameters no "
                             f"longer describe. Received: layer sizes, activation, dtype = {now}. Expected {was} "
                             "(or warm_start=False and fit, which starts afresh)")

    def _new_optimizer(self, hp):
        if hp["solver"] == "sgd":
            momentum = hp["momentum"]
            opt = _SGD(lr=hp["learning_rate_init"], momentum=momentum,
                       nesterov=hp["nesterovs_momentum"] and momentum > 0)  # Nesterov without momentum is plain SGD
        else:
            opt = _Adam(lr=hp["learning_rate_init"], betas=(hp["beta_1"], hp["beta_2"]), eps=hp["epsilon"])
        opt.alpha = hp["alpha"]
        setup = {"kind": hp["solver"], "learning_rate": hp["learning_rate"],
                 "learning_rate_init": hp["learning_rate_init"], "power_t": hp["power_t"]}
        return opt, setup

    def _split(self, Y, hp, rng):
        """scikit-learn's validation split: ``train_test_split`` with its arguments and its
        random state, so the same rows (stratified for binary classification, as there)."""
        n = Y.shape[0]
        fraction = hp["validation_fraction"]
        n_val = math.ceil(fraction * n)
        if n_val < 2 or n - n_val < 1:
            raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of your "
                             f"dataset. Received: validation_fraction={fraction!r} of {n} samples, {n_val} for "
                             "validation. Expected at least 2 for validation and 1 for training")
        try:
            return train_test_split(np.arange(n), random_state=rng, test_size=fraction,
                                    stratify=Y if self._stratify(Y) else None)
        except ValueError as exc:
            raise ValueError(f"early_stopping=True cannot split validation_fraction={fraction!r} off these "
                             f"targets: {exc}") from None

    def _batch(self, n: int) -> int:
        if self.batch_size is None:
            return n
        if isinstance(self.batch_size, str):
            return min(_AUTO_BATCH, n)
        if self.batch_size > n:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
        return min(int(self.batch_size), n)

    @contextlib.contextmanager
    def _unchanged_on_error(self):
        """A call that raises leaves the estimator as it was: its attributes (validate_data records
        n_features_in_ before the targets are checked) and, for warm_start / partial_fit, the
        network's parameters and optimizer state (a fit that diverges in epoch k leaves the
        network at the start of epoch k, not of the call)."""
        saved = dict(self.__dict__)
        model = saved.get("model_")
        snapshot = None
        if model is not None:
            opt = model.optimizer
            state = None if opt is None or opt.state is None else (opt.state.buffers.copy(), opt.state.steps, opt.lr)
            snapshot = (model._params.copy(), opt, state)
        try:
            yield
        except BaseException:
            if snapshot is not None:
                params, opt, state = snapshot
                model._params[...] = params
                model.optimizer = opt
                if state is not None:
                    opt.state, opt.lr = OptimizerState(state[0], state[1]), state[2]
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    # ------------------------------------------------------------ prediction and attributes
    def _outputs(self, X) -> np.ndarray:
        """The network's output activations for X, float64, shape (n_samples, n_outputs)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return np.asarray(self.model_.predict(X), dtype=np.float64)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def _fitted_model(self, name: str) -> MLP:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet: {name} exists after fit")
        return self.model_

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Weights per layer as scikit-learn lays them out: ``coefs_[i]`` of shape (fan_in, fan_out),
        the transpose of ``model_.weights[i]``; NumPy copies. Assigning a list of such arrays sets
        the network's weights (e.g. to start a warm_start fit from given values)."""
        weights, _ = self._fitted_model("coefs_").get_params()
        return [np.ascontiguousarray(w.T) for w in weights]

    @coefs_.setter
    def coefs_(self, values) -> None:
        model = self._fitted_model("coefs_")
        shapes = [(i, o) for i, o in zip(model.sizes[:-1], model.sizes[1:])]
        new = self._layer_values("coefs_", values, shapes)
        model.set_params([w.T for w in new], model.get_params()[1])

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Biases per layer, ``intercepts_[i]`` of shape (fan_out,); NumPy copies, assignable like coefs_."""
        return self._fitted_model("intercepts_").get_params()[1]

    @intercepts_.setter
    def intercepts_(self, values) -> None:
        model = self._fitted_model("intercepts_")
        new = self._layer_values("intercepts_", values, [(o,) for o in model.sizes[1:]])
        model.set_params(model.get_params()[0], new)

    @staticmethod
    def _layer_values(name, values, shapes) -> list[np.ndarray]:
        """``values`` checked (all of them, before anything is written) against the layer shapes."""
        if not isinstance(values, (list, tuple)) or len(values) != len(shapes):
            got = f"a {type(values).__name__} of length {len(values)}" if isinstance(values, (list, tuple)) \
                else type(values).__name__
            raise ValueError(f"{name} must be a list of {len(shapes)} arrays. Received: {got}")
        out = []
        for i, (value, shape) in enumerate(zip(values, shapes)):
            arr = check.numeric_array(f"{name}[{i}]", value, np.float64)
            if tuple(arr.shape) != shape:
                raise ValueError(f"{name}[{i}] has the wrong shape. Received: {tuple(arr.shape)}. Expected {shape}")
            out.append(to_numpy(arr))
        return out

    @property
    def n_layers_(self) -> int:
        """Layers including the input and the output ones (scikit-learn's count)."""
        return len(self._fitted_model("n_layers_").sizes)

    @property
    def n_outputs_(self) -> int:
        return self._fitted_model("n_outputs_").sizes[-1]

    @property
    def out_activation_(self) -> str:
        """The output activation by scikit-learn's name: "logistic", "softmax" or "identity"."""
        output = self._fitted_model("out_activation_").output
        return {"sigmoid": "logistic"}.get(output, output)


_PARAMETERS_DOC = """
    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default=(100,)
        Width of each hidden layer; ``()`` gives logistic / softmax / linear regression.
    activation : {"relu", "logistic" (alias "sigmoid"), "tanh", "identity", "leaky_relu"}, default="relu"
        Hidden-layer activation ("leaky_relu" is fastbp's; slope 0.01).
    solver : {"adam", "sgd"}, default="adam"
        The update rule. scikit-learn's "lbfgs" is refused (ValueError).
    alpha : float >= 0, default=0.0001
        L2 penalty on the weights (not the biases): ``alpha W / rows`` in a batch's gradient.
    batch_size : int >= 1, "auto" or None, default="auto"
        Examples per step; "auto" is ``min(200, n_samples)``, None the full batch (fastbp's). Larger
        than the training set: clipped, with a warning, as in scikit-learn.
    learning_rate : {"constant", "invscaling", "adaptive"}, default="constant"
        The schedule, for solver="sgd" only (as in scikit-learn). "invscaling":
        ``learning_rate_init / (t_ + 1) ** power_t`` after each epoch; "adaptive": divided by 5 each
        time the no-improvement count exceeds ``n_iter_no_change``, stopping once at most 1e-6.
    learning_rate_init : float > 0, default=0.001
        The initial rate (Adam's rate).
    power_t : float >= 0, default=0.5
        Exponent of "invscaling".
    max_iter : int >= 1, default=200
        Epochs at most (per fit call); reaching it without converging warns ConvergenceWarning.
    shuffle : bool, default=True
        Reshuffle the training rows every epoch.
    random_state : int, RandomState instance or None, default=None
        Initial weights (scikit-learn's draws), the early-stopping split and the shuffles.
    tol : float >= 0, default=1e-4
        An epoch improves when the training loss falls (or, with early stopping, the validation
        score rises) by more than ``tol`` over the best so far.
    verbose : bool or int >= 0, default=False
        Print scikit-learn's progress messages to stdout.
    warm_start : bool, default=False
        ``fit`` continues from the fitted network (a new optimizer, as in scikit-learn) instead of
        starting afresh; loss_curve_ and t_ carry on.
    momentum : float in [0, 1], default=0.9
        SGD momentum.
    nesterovs_momentum : bool, default=True
        Nesterov's momentum for SGD (when momentum > 0).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training rows (scikit-learn's split), stop on the
        validation score (accuracy / R^2) and end with the best epoch's parameters.
    validation_fraction : float in [0, 1), default=0.1
        Share of the rows held out by early stopping.
    beta_1, beta_2 : float in [0, 1), default=0.9, 0.999
        Adam's moment decay rates.
    epsilon : float > 0, default=1e-8
        Adam's epsilon (torch's placement; see the module docstring).
    n_iter_no_change : int >= 1 or numpy.inf, default=10
        Epochs without improvement tolerated (the count must exceed it).
    max_fun : int >= 1, default=15000
        Accepted for compatibility with scikit-learn's signature; only "lbfgs" uses it.
    dtype : {"float64", "float32"}, default="float64"
        fastbp's: precision of the parameters and the arithmetic (float32 is faster, on a GPU by far).
    strategy : {"vectorized", "loop"}, default="vectorized"
        fastbp's: batch matrix form, or the per-example loop (same numbers, the naive way).
"""

_ATTRIBUTES_DOC = """
    model_ : fastbp.MLP, the trained network ``[n_features_in_, *hidden_layer_sizes, n_outputs_]``
    coefs_, intercepts_ : lists of ndarray, scikit-learn's layout (see :attr:`coefs_`)
    loss_curve_ : list of float, each epoch's training loss (carried on by warm_start and partial_fit)
    loss_ : float, the last of them
    best_loss_ : float (None with early stopping), the lowest training loss
    validation_scores_ : list of float (None without early stopping), each epoch's validation score
    best_validation_score_ : float (None without early stopping)
    n_iter_ : int, epochs run by the last call
    t_ : int, training examples seen (``n_iter_ * n_samples`` summed over the calls)
    n_layers_, n_outputs_, out_activation_ : as scikit-learn's
    n_features_in_ : int
    feature_names_in_ : ndarray of str, when X had string column names
"""


def _doc(text: str) -> str:
    return text.replace("{parameters}", _PARAMETERS_DOC).replace("{attributes}", _ATTRIBUTES_DOC)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    __doc__ = _doc("""Multilayer perceptron classifier, scikit-learn's ``MLPClassifier`` on fastbp.

    Two classes: one logistic output with log loss; more: a softmax output with cross-entropy.
    Labels may be ints, strings, bools, whole-valued floats: anything ``numpy.unique`` can sort that
    scikit-learn takes as classes (multilabel targets are not supported).
    {parameters}
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    {attributes}""")

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, max_fun=15000, dtype="float64", strategy="vectorized"):
        super().__init__(hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
                         learning_rate=learning_rate, learning_rate_init=learning_rate_init, power_t=power_t,
                         max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
                         warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
                         early_stopping=early_stopping, validation_fraction=validation_fraction, beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
                         dtype=dtype, strategy=strategy)

    def fit(self, X, y):
        """Train on X (n_samples, n_features) and labels y (n_samples,), at most ``max_iter`` epochs."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """One epoch over X, y; the first call makes the network and needs ``classes``, every label
        that may ever occur (later calls may omit it or must repeat it)."""
        if classes is None and not self.__sklearn_is_fitted__():
            raise ValueError("classes must be given on the first call to partial_fit. Received: classes=None. "
                             "Expected every label that may occur, e.g. classes=np.unique(y_all)")
        return self._fit(X, y, incremental=True, classes=classes)

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

    def _targets(self, y, first, incremental, warm, classes=None):
        """Labels as indices into classes_ (fixed by a fresh fit: y's labels, or ``classes``)."""
        if first:
            known = np.unique(y if classes is None else np.asarray(classes))
            if known.shape[0] < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes to train. Received: "
                                 f"{known.shape[0]} class{'' if known.shape[0] == 1 else 'es'} {known.tolist()}")
        else:
            known = self.classes_
            if classes is not None and not np.array_equal(np.unique(np.asarray(classes)), known):
                raise ValueError("classes must not change between calls to partial_fit. Received: "
                                 f"classes={np.unique(np.asarray(classes))!r}. Expected {known!r} (classes_)")
            if warm and not np.array_equal(np.unique(y), known):
                raise ValueError("warm_start can only be used where y has the same classes as in the previous "
                                 f"call to fit. Received: y with classes {np.unique(y)!r}. Expected {known!r}")
        index = np.searchsorted(known, y)
        unseen = (index >= known.shape[0]) | (known[np.minimum(index, known.shape[0] - 1)] != y)
        if unseen.any():
            raise ValueError(f"y has labels not in classes. Received: {np.unique(y[unseen])!r}. "
                             f"Expected labels among {known!r}")
        return (index.astype(np.float64) if known.shape[0] == 2 else index), {"classes_": known}

    def _network(self, Y, attrs):
        k = attrs["classes_"].shape[0]
        return ("log_loss", "sigmoid", 1) if k == 2 else ("cross_entropy", "softmax", k)

    @staticmethod
    def _stratify(Y) -> bool:
        # scikit-learn stratifies only one-output targets: binary (its multiclass y is one-hot)
        return Y.dtype.kind == "f"

    @staticmethod
    def _loss_scale(n_outputs: int) -> float:
        return 1.0

    @staticmethod
    def _scorer(X_val, Y_val, attrs):
        """Validation accuracy (scikit-learn's score), from the network's outputs on X_val."""
        labels = np.asarray(Y_val).astype(np.int64)

        def score(net) -> float:
            out = to_numpy(net.forward(X_val))
            pred = (out[:, 0] > 0.5).astype(np.int64) if out.shape[1] == 1 else out.argmax(axis=1)
            return float(np.mean(pred == labels))

        return score


class MLPRegressor(RegressorMixin, _BaseMLP):
    __doc__ = _doc("""Multilayer perceptron regressor, scikit-learn's ``MLPRegressor`` on fastbp: identity
    output, squared error (per example ``1/2 sum_j (y_j - a_j)^2``).

    y of shape (n_samples,) is predicted as (n_samples,); y of shape (n_samples, n_targets) as
    (n_samples, n_targets).

    loss : {"squared_error"}, default="squared_error"
        scikit-learn's "poisson" is refused (fastbp has no exponential output).
    {parameters}
    Attributes
    ----------
    {attributes}""")

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, loss="squared_error", solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000, dtype="float64",
                 strategy="vectorized"):
        self.loss = loss
        super().__init__(hidden_layer_sizes, activation, solver=solver, alpha=alpha, batch_size=batch_size,
                         learning_rate=learning_rate, learning_rate_init=learning_rate_init, power_t=power_t,
                         max_iter=max_iter, shuffle=shuffle, random_state=random_state, tol=tol, verbose=verbose,
                         warm_start=warm_start, momentum=momentum, nesterovs_momentum=nesterovs_momentum,
                         early_stopping=early_stopping, validation_fraction=validation_fraction, beta_1=beta_1,
                         beta_2=beta_2, epsilon=epsilon, n_iter_no_change=n_iter_no_change, max_fun=max_fun,
                         dtype=dtype, strategy=strategy)

    def fit(self, X, y):
        """Train on X (n_samples, n_features), y (n_samples,) or (n_samples, n_targets), at most ``max_iter`` epochs."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y):
        """One epoch over X, y (the first call makes the network)."""
        return self._fit(X, y, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Predictions, shape (n_samples,) when fitted on a 1-D y, else (n_samples, n_targets)."""
        out = self._outputs(X)
        return out[:, 0] if self._y_1d else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _hyper(self) -> dict:
        if self.loss == "poisson":
            raise ValueError("loss='poisson' is not provided by fastbp (it needs an exponential output). "
                             "Received: loss='poisson'. Expected 'squared_error'")
        check.choice("loss", self.loss, ("squared_error",))
        return super()._hyper()

    def _validate_xy(self, X, y, reset):
        X, y = validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32),
                             multi_output=True, y_numeric=True)
        return X, np.asarray(y, dtype=np.float64)

    def _targets(self, y, first, incremental, warm, classes=None):
        if not first:
            n_targets = self.model_.sizes[-1]
            if (y.ndim == 1 and n_targets != 1) or (y.ndim == 2 and y.shape[1] != n_targets):
                raise ValueError(f"y has the wrong shape. Received: shape {y.shape}. "
                                 f"Expected (n_samples, {n_targets})" + (" or (n_samples,)" if n_targets == 1 else ""))
        return y, {"_y_1d": y.ndim == 1}

    def _network(self, Y, attrs):
        return "mse", "identity", 1 if Y.ndim == 1 else Y.shape[1]

    @staticmethod
    def _stratify(Y) -> bool:
        return False

    @staticmethod
    def _loss_scale(n_outputs: int) -> float:
        return float(n_outputs)  # scikit-learn's squared error is averaged over the outputs

    @staticmethod
    def _scorer(X_val, Y_val, attrs):
        """Validation R^2 (scikit-learn's score; NaN when the outputs are not finite)."""

        def score(net) -> float:
            out = to_numpy(net.forward(X_val))
            if not np.isfinite(out).all():
                return math.nan
            return float(r2_score(Y_val, out[:, 0] if Y_val.ndim == 1 else out))

        return score
