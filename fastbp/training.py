"""The fit loop: epochs of batches, one optimizer step per batch, History, schedules, callbacks.

Written once for every backend and every fast path. Per epoch the loop shuffles, then
either hands the whole epoch to the backend (``train_epoch``, when the backend says it
runs that combination: Numba's compiled epochs, CuPy's captured step) or composes it batch
by batch -- the network's gradients into the flat gradient buffer, then
``backend.update`` applies the optimizer's rule. After the epoch: divergence check
(parameters and optimizer state go back to the epoch's start), History, validation,
schedule, callbacks, early stopping.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import time

import numpy as np

from . import _validate as check
from . import data, optim, parallel
from .errors import TrainingDivergedError
from .network import STRATEGIES

logger = logging.getLogger("fastbp")


class History(list):
    """Per-epoch mean training losses (a list), with every recorded series in ``.history``:
    ``loss``, ``accuracy`` (classification losses: the pre-update outputs of the epoch's batches,
    as Keras reports it), ``lr``, and ``val_loss`` / ``val_accuracy`` with validation data."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {"loss": []}
        self.stopped_epoch: int | None = None  # 0-based epoch after which a callback stopped training
        self.best_epoch: int | None = None  # the epoch early stopping restored, when it did

    def _record(self, logs: dict) -> None:
        for key, value in logs.items():
            if key != "samples_seen":
                self.history.setdefault(key, []).append(value)
        self.append(logs["loss"])


# ---------------------------------------------------------------- callbacks
class Callback:
    """Per-epoch hooks, Keras style. ``self.model`` is the MLP being trained.

    ``on_epoch_end(epoch, logs)`` returning True (or setting ``self.stop_training``) ends the
    fit after that epoch. A plain function ``f(epoch, logs) -> bool | None`` works as well.
    """

    model = None
    stop_training = False

    def on_train_begin(self, logs: dict) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict) -> bool | None:
        return None

    def on_train_end(self, logs: dict) -> None:
        pass


class _FunctionCallback(Callback):
    def __init__(self, fn) -> None:
        self.fn = fn

    def on_epoch_end(self, epoch, logs):
        return self.fn(epoch, logs)


class EarlyStopping(Callback):
    """Stop once ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    monitor : "val_loss" (default; needs validation data), "loss", "val_accuracy" or "accuracy".
        Losses improve downwards, accuracies upwards.
    restore_best : put back the parameters of the best epoch when training ends (whether it
        stopped early or ran out of epochs), like Keras's ``restore_best_weights``.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best=True) -> None:
        check.choice("monitor", monitor, ("val_loss", "loss", "val_accuracy", "accuracy"))
        self.monitor = monitor
        self.patience = check.positive_int("patience", patience, minimum=0)
        self.min_delta = _non_negative("min_delta", min_delta)
        if not isinstance(restore_best, (bool, np.bool_)):
            raise TypeError(f"restore_best must be a bool. Received: restore_best={restore_best!r}")
        self.restore_best = bool(restore_best)
        self._sign = -1.0 if monitor.endswith("accuracy") else 1.0  # compare as "lower is better"

    def on_train_begin(self, logs):
        self.best, self.best_epoch, self.wait, self._best_params = math.inf, None, 0, None
        self.stop_training = False

    def on_epoch_end(self, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does not record. "
                             f"Received logs with {sorted(k for k in logs if k != 'samples_seen')}")
        value = self._sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_params = self.model._params.copy()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stop_training = True
        return None

    def on_train_end(self, logs):
        if self.restore_best and self._best_params is not None:
            self.model._params[...] = self._best_params
            self._best_params = None


# ---------------------------------------------------------------- fit
@parallel.collective_checks  # with comm: an error before the ranks settle is raised alike on all of them
def fit(net, X, Y, epochs=1, batch_size=32, lr=None, optimizer=None, shuffle=True, strategy="vectorized",
        progress=None, validation_data=None, validation_split=0.0, seed=None, schedule=None,
        callbacks=None, threads=None, comm=None) -> History:
    """Train ``net`` by backpropagation on the mean cost; returns the per-epoch :class:`History`.

    Parameters
    ----------
    X : array of shape (n_samples, n_inputs)
    Y : array of shape (n_samples, n_outputs); integer labels (n_samples,) for cross_entropy;
        (n_samples,) for a one-output model.
    epochs : int >= 1
    batch_size : int >= 1 or None
        1 = per-example SGD, b = mini-batch, None (or >= n_samples) = full batch.
    lr : float > 0 or None
        None keeps the optimizer's rate; a number sets it (for a name or the model's own optimizer).
    optimizer : None, "sgd", "adam", "adamw" or an :class:`fastbp.optim.Optimizer`
        None continues the model's optimizer and its state (``SGD(lr=0.1)`` for a new model); a
        name starts that optimizer afresh with its defaults; an instance is used as it is.
    shuffle : bool
        Reshuffle the examples every epoch (seeded); False takes consecutive rows in order.
    strategy : "vectorized" or "loop" (the per-example loop inside each batch).
    progress : bool or None, a tqdm bar; None shows it when stderr is a terminal.
    validation_data : (X_val, Y_val) or None; adds ``val_loss`` (and ``val_accuracy``).
    validation_split : float in [0, 1): hold out the last fraction of the rows (before any
        shuffling) as validation data, as Keras does.
    seed : int or None, the shuffle's seed; None continues the model's stream.
    schedule : :class:`fastbp.optim.Schedule` or None, the per-epoch learning-rate schedule.
    callbacks : list of :class:`Callback` (e.g. :class:`EarlyStopping`) or functions
        ``f(epoch, logs) -> bool | None`` called after every epoch; True stops training.
    threads : int >= 1 or None
        BLAS threads for this fit (threadpoolctl's ``threadpool_limits`` semantics, restored
        afterwards); None leaves the backend's own choice.
    comm : an mpi4py communicator or None
        Data-parallel training over MPI (README, "Scale-out"): every rank passes the same
        arguments and data; ``batch_size`` is the global batch; each rank reads only its share of
        every batch, and every rank ends with the parameters a single-process fit would give. Bad
        input on any rank raises the same error on all. (Inside, ``comm`` is a parallel.Collective.)

    X and Y may be a read-only ``np.memmap`` (``np.load(path, mmap_mode="r")``) or any array with
    row indexing: they are then streamed in chunks (:mod:`fastbp.data`), never copied whole.

    The history's entries are the mean pre-update cost of each epoch's batches. If the cost
    becomes NaN or Inf, training stops with TrainingDivergedError and the parameters and the
    optimizer state are those from the start of that epoch (the last ones known finite).
    """
    # ---- every check before anything changes
    epochs = check.positive_int("epochs", epochs)
    batch_size = check.positive_int("batch_size", batch_size, allow_none=True)
    if not isinstance(shuffle, (bool, np.bool_)):
        raise TypeError(f"shuffle must be a bool. Received: shuffle={shuffle!r}")
    check.choice("strategy", strategy, STRATEGIES)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be a bool or None. Received: progress={progress!r}")
    seed = check.seed("seed", seed)
    opt, new_lr = optim.resolve(optimizer, lr, net.optimizer)
    opt._check_owner(net)
    _check_lr_fits(new_lr if new_lr is not None else opt.lr, net.dtype)
    if schedule is not None and not isinstance(schedule, optim.Schedule):
        raise TypeError(f"schedule must be an fb.optim.Schedule or None. Received: schedule={schedule!r} "
                        f"({type(schedule).__name__})")
    hooks = _callbacks(callbacks)
    threads = check.positive_int("threads", threads, allow_none=True)
    split = _non_negative("validation_split", validation_split)
    if split >= 1.0:
        raise ValueError(f"validation_split out of range. Received: validation_split={validation_split!r}. "
                         "Expected a float in [0, 1)")
    if split and validation_data is not None:
        raise ValueError("validation_split and validation_data given together. Received: "
                         f"validation_split={validation_split!r} and validation_data. Expected one of them")
    stream = comm is not None or data.is_streamed(X) or data.is_streamed(Y)
    if stream:  # read chunk by chunk; under MPI each rank checks and reads only its share of the rows
        Xd, Yd, n = data.sources(X, Y, n_features=net.spec.sizes[0], n_outputs=net.spec.sizes[-1],
                                 loss=net.spec.loss, dtype=net.dtype, share=comm and (comm.rank, comm.size))
    else:
        Xd, Yd = net._inputs_targets(X, Y)
        n = Xd.shape[0]
    val = None
    if split:
        n_train = int(Xd.shape[0] * (1.0 - split))
        if n_train < 1 or n_train == Xd.shape[0]:
            raise ValueError(f"validation_split={validation_split!r} of {Xd.shape[0]} rows leaves "
                             f"{n_train} for training and {Xd.shape[0] - n_train} for validation. Expected both >= 1")
        if stream:  # the held-out rows come into memory; the training rows [0, n_train) stay streamed
            val, n = net._inputs_targets(np.asarray(Xd[n_train:]), np.asarray(Yd[n_train:])), n_train
        else:
            Xd, Yd, val = Xd[:n_train], Yd[:n_train], (Xd[n_train:], Yd[n_train:])
            n = n_train
    elif validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError("validation_data must be a pair (X_val, Y_val). "
                            f"Received: {type(validation_data).__name__}")
        val = net._inputs_targets(*validation_data, names=("validation_data[0]", "validation_data[1]"))
    watchers = [h for h in hooks if isinstance(h, EarlyStopping)]
    watchers += [schedule] if isinstance(schedule, optim.ReduceLROnPlateau) else []
    for watcher in watchers:  # what they monitor must be recorded, known before anything trains
        what = f"{type(watcher).__name__}(monitor={watcher.monitor!r})"
        if watcher.monitor.startswith("val_") and val is None:
            raise ValueError(f"{what} needs validation data. Received: validation_data=None and "
                             "validation_split=0. Expected one of them, or monitor='loss'")
        if watcher.monitor.endswith("accuracy") and net.spec.loss == "mse":
            raise ValueError(f"{what} needs a classification loss; this model's is 'mse', which records "
                             "no accuracy. Expected monitor='loss' or 'val_loss'")

    if comm is not None:  # the ranks agree before anything changes (the same error on all, or none)
        comm.check_batch(n if batch_size is None else min(batch_size, n), n, batch_size)
        comm.settle(None, dict(n=n, epochs=epochs, batch_size=batch_size, shuffle=shuffle, strategy=strategy,
                               seed=seed, sizes=net.sizes, dtype=net.dtype.name, optimizer=repr(opt), lr=new_lr))

    # ---- accepted: from here on the model changes
    net.optimizer = opt
    if new_lr is not None:
        opt.lr = new_lr
    opt._bind(net)
    trainer = _Trainer(net, opt, Xd, Yd, val, epochs, batch_size, shuffle, strategy, progress, seed, schedule, hooks,
                       n=n, stream=stream, comm=comm)
    if comm is not None:  # every rank starts from rank 0's parameters, optimizer state and shuffle stream
        comm.broadcast_(net._params, opt.state.buffers, opt.state.step)
        comm.broadcast_rng(trainer.rng)
    if threads is None:
        return trainer.run()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        return trainer.run()


class _Trainer:
    """One fit's loop; every check has passed before it is made."""

    def __init__(self, net, opt, Xd, Yd, val, epochs, batch_size, shuffle, strategy, progress, seed,
                 schedule, hooks, n=None, stream=False, comm=None) -> None:
        self.net, self.opt, self.val, self.hooks, self.schedule = net, opt, val, hooks, schedule
        self.be, self.spec = net.backend, net.spec
        self.X, self.Y = Xd, Yd
        self.n = Xd.shape[0] if n is None else n
        self.epochs, self.shuffle, self.strategy = epochs, shuffle, strategy
        self.batch = self.n if batch_size is None else min(batch_size, self.n)
        self.rng = net._rng if seed is None else np.random.default_rng(seed)
        self.show = (sys.stderr.isatty() if progress is None else bool(progress)) and (comm is None or comm.rank == 0)
        self.comm, self.stream = comm, None
        if stream:
            self.stream = data.BatchStream(Xd, Yd, n_outputs=net.spec.sizes[-1], loss=net.spec.loss, dtype=net.dtype,
                                           batch=self.batch, backend=self.be, n=self.n,
                                           share=comm and (comm.rank, comm.size))
        self.count = net.spec.loss != "mse"  # accuracy for classification losses
        self._shuffled = None  # (X, Y) copies in an epoch's order, for the batch-by-batch path

    def run(self) -> History:
        net, be, opt = self.net, self.be, self.opt
        dtype = net.dtype
        snapshot = be.empty(net._params.shape, dtype)
        state_snapshot = be.empty(opt.state.buffers.shape, dtype)
        history = History()
        for hook in self.hooks:
            hook.model = net
            hook.stop_training = False  # a callback reused from an earlier fit starts afresh, as in Keras
            hook.on_train_begin({})
        if self.schedule is not None:
            self.schedule.start(opt.lr)
        logger.info("fit: backend=%s dtype=%s n=%d batch_size=%d epochs=%d strategy=%s optimizer=%r",
                    be.name, dtype.name, self.n, self.batch, self.epochs, self.strategy, opt)
        bar = _progress_bar(self.epochs, self.show)
        samples = 0
        # with no callbacks (they may read or save the generator), the next epoch's shuffle is
        # drawn by the epoch's kernel as it trains, where the backend can (_KernelDraw)
        draw = None
        if (self.shuffle and self.stream is None and not self.hooks and self.epochs > 0
                and be.draws_next_order(self.spec, self.batch, self.strategy)):
            draw = _KernelDraw.of(self.rng, self.n)
        try:
            # overflow shows up as a non-finite loss, reported as TrainingDivergedError
            with np.errstate(over="ignore", invalid="ignore"):
                for epoch in range(self.epochs):
                    t0 = time.perf_counter()
                    snapshot[...] = net._params
                    state_snapshot[...] = opt.state.buffers
                    step0 = opt.state.steps
                    if draw is None:
                        rng_state = self.rng.bit_generator.state  # a diverged epoch must not move the stream
                    rule = opt.rule()
                    if self.stream is not None:  # chunks of rows (under MPI: allreduce per batch)
                        order = self.rng.permutation(self.n) if self.shuffle else None
                        loss_sum, n_done, correct = data.train_epoch(net, self.stream, order, rule, opt.state,
                                                                     self.strategy, self.count, self.comm)
                    elif draw is not None:
                        if epoch > 0:  # the order the last epoch's kernel drew is this one's: now in use
                            draw.advance()
                        order = draw.order
                        loss_sum, n_done, correct = self._epoch(
                            order, rule, draw.next_order() if epoch + 1 < self.epochs else None)
                    else:
                        order = self.rng.permutation(self.n) if self.shuffle else None
                        order = None if order is None else be.index_array(order)
                        loss_sum, n_done, correct = self._epoch(order, rule)
                    epoch_loss = float(loss_sum) / max(n_done, 1)
                    if n_done < self.n or not math.isfinite(epoch_loss) or not be.all_finite(net._params):
                        if draw is not None:  # the stream put back to before this epoch's order was drawn
                            rng_state, draw = draw.before_state(), None
                        net._params[...] = snapshot
                        opt.state.buffers[...] = state_snapshot
                        opt.state.step[0] = step0
                        self.rng.bit_generator.state = rng_state
                        raise TrainingDivergedError(
                            f"training diverged: the loss became NaN or Inf in epoch {epoch + 1} ({opt!r}); "
                            f"parameters and optimizer state restored to those at the start of epoch "
                            f"{epoch + 1}. Try a smaller lr or standardised inputs.", history)
                    samples += self.n
                    logs = {"loss": epoch_loss}
                    if self.count:
                        logs["accuracy"] = int(correct) / self.n
                    logs["lr"] = opt.lr
                    if self.val is not None:
                        logs.update(net._evaluate(*self.val))
                    logs["samples_seen"] = samples
                    history._record(logs)
                    if self.schedule is not None:
                        opt.lr = _scheduled_lr(self.schedule, epoch, logs, dtype)
                    stop = False
                    for hook in self.hooks:
                        stop = bool(hook.on_epoch_end(epoch, logs)) or hook.stop_training or stop
                    if bar is not None:
                        bar.set_postfix(loss=f"{epoch_loss:.4g}", samples_s=f"{self.n / (time.perf_counter() - t0):.3g}")
                        bar.update(1)
                    if stop:
                        history.stopped_epoch = epoch
                        break
        finally:
            if draw is not None:  # the generator left where drawing each order in turn leaves it
                draw.close()
            if bar is not None:
                bar.close()
        for hook in self.hooks:
            hook.on_train_end({})
            if isinstance(hook, EarlyStopping) and hook.restore_best and hook.best_epoch is not None:
                history.best_epoch = hook.best_epoch
        return history

    def _epoch(self, order, rule, next_order=None):
        """One epoch over the rows in ``order`` (None: as they are): the backend's whole-epoch
        fast path when it has one for this (it reads the rows in that order in place), else
        batch by batch over a shuffled copy. ``next_order``: where the epoch's kernel draws the
        next epoch's order (``_KernelDraw.next_order``; only where ``draws_next_order``)."""
        be, spec, net, st = self.be, self.spec, self.net, self.opt.state
        if be.has_compiled_epoch and be.supports_epoch(spec, self.batch, self.strategy, rule):
            extra = {} if next_order is None else {"next_order": next_order}  # (a Backend of before takes none)
            return be.train_epoch(spec, net._params, net._grads, self.X, self.Y, self.batch, rule, st, self.strategy,
                                  order=order, **extra)
        if next_order is not None:  # a backend that draws, but not in this rule's epoch: drawn here
            from fastbp.kernels import numba_random

            out, state_in, state_out = next_order
            state_out[...] = state_in
            numba_random.permutation_into(state_out, out)
        Xs, Ys = self.X, self.Y
        if order is not None:
            if self._shuffled is None:  # made on first use, kept for the fit's later epochs
                self._shuffled = be.empty(self.X.shape, net.dtype), be.empty(self.Y.shape, net.dtype)
            Xs, Ys = self._shuffled
            be.take_rows(self.X, order, Xs)
            be.take_rows(self.Y, order, Ys)
        check_each = not be.is_gpu  # reading a GPU loss back every batch would stall the stream
        total, correct = 0.0, 0
        for start in range(0, self.n, self.batch):
            stop = min(start + self.batch, self.n)
            batch_loss, batch_correct = net._gradients_into(Xs[start:stop], Ys[start:stop], self.strategy,
                                                            count=self.count)
            if check_each and not math.isfinite(batch_loss):
                return total, start, correct
            be.update(spec, rule, net._params, net._grads, st, stop - start)
            total = total + batch_loss
            correct = correct + batch_correct
        return total, self.n, correct


class _KernelDraw:
    """A fit's shuffles drawn by its epochs' kernels: each epoch's kernel draws the next
    epoch's order while it trains (Fisher-Yates steps beside the training steps; drawn apart,
    the permutation was ~10% of a tiny net's epoch), from a copy of the generator's PCG64 state
    (kernels/numba_random.py: NumPy's ``permutation``, bit for bit). The generator itself is
    written once, by ``close``: left where drawing each used order in turn leaves it (a
    generator shared with another fit at the same time loses that fit's draws). On divergence
    ``before_state()`` is its state before the failed epoch's order was drawn."""

    def __init__(self, rng, state: np.ndarray, n: int) -> None:
        from fastbp.kernels import numba_random

        self._random, self.rng = numba_random, rng
        self._before = state  # rng's, before the current order was drawn
        self.order = rng.permutation(n).astype(np.int64, copy=False)  # the first as NumPy draws it (int32 on some)
        self.committed = numba_random.pcg64_state(rng)  # after it: the orders used so far
        self._next, self._drawn = np.empty(n, np.int64), np.empty_like(self.committed)

    @classmethod
    def of(cls, rng, n: int):
        """None where ``rng`` is not a PCG64 generator (fit then draws with NumPy as before)."""
        from fastbp.kernels import numba_random

        state = numba_random.pcg64_state(rng)
        return None if state is None else cls(rng, state, n)

    def next_order(self):
        """``(out, state_in, state_out)`` for the kernel: the next order into ``out``, drawn from
        ``state_in``, the state after it into ``state_out`` (written only when it finished)."""
        return self._next, self.committed, self._drawn

    def advance(self) -> None:
        """The next epoch begins: the order the last one's kernel drew is now in use (not
        sooner: an exception between epochs must leave that draw undone)."""
        self.order, self._next = self._next, self.order
        self._before, self.committed, self._drawn = self.committed, self._drawn, self._before

    def before_state(self) -> dict:
        return self._random.pcg64_state_dict(self._before)

    def close(self) -> None:
        self.rng.bit_generator.state = self._random.pcg64_state_dict(self.committed)


# ---------------------------------------------------------------- helpers
def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Received: {name}={value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} out of range. Received: {name}={value!r}. Expected a finite number >= 0")
    return float(value)


def _check_lr_fits(lr: float, dtype: np.dtype) -> None:
    """The rate as the model's dtype holds it must still be a positive finite number."""
    info = np.finfo(dtype)
    if lr > float(info.max) or dtype.type(lr) == 0:
        raise ValueError(f"lr does not fit the model's dtype. Received: lr={lr!r}. Expected a value between "
                         f"{float(info.smallest_subnormal):.3g} and {float(info.max):.3g} ({dtype.name})")


def _scheduled_lr(schedule, epoch: int, logs: dict, dtype: np.dtype) -> float:
    """The schedule's next rate, kept inside what the model's dtype can hold as a positive rate
    (a decay to 0 or a growth past the dtype's maximum would otherwise stop training midway or
    leave the optimizer with a rate the next fit refuses)."""
    try:
        lr = float(schedule.next_lr(epoch, logs))
    except OverflowError:
        lr = math.inf
    if math.isnan(lr):
        raise ValueError(f"{schedule!r} gave lr=nan after epoch {epoch + 1}. Expected a positive number")
    info = np.finfo(dtype)
    return min(max(lr, float(info.tiny)), float(info.max))


def _callbacks(callbacks) -> list[Callback]:
    if callbacks is None:
        return []
    if isinstance(callbacks, (Callback,)) or callable(callbacks):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of fb.Callback or functions. Received: callbacks={callbacks!r} "
                        f"({type(callbacks).__name__})")
    hooks = []
    for i, cb in enumerate(callbacks):
        if isinstance(cb, Callback):
            hooks.append(cb)
        elif callable(cb):
            hooks.append(_FunctionCallback(cb))
        else:
            raise TypeError(f"callbacks[{i}] must be an fb.Callback or a function f(epoch, logs). "
                            f"Received: {cb!r} ({type(cb).__name__})")
    return hooks


def _progress_bar(epochs: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, unit="epoch", desc="fastbp fit", file=sys.stderr)
