"""Optimizers, schedules, early stopping and callbacks: every rule on every backend and fast path
against the plain torch.optim reference (tests/reference.py), and torch.optim itself when installed."""

import copy
import importlib.util
import json

import numpy as np
import pytest
from conftest import make_data
from reference import TorchOptimReference, optimizer_trajectory

import fastbp as fb
from fastbp import optim

RULES = {
    "sgd": dict(kind="sgd", lr=0.2),
    "momentum": dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": dict(kind="sgd", lr=0.05, momentum=0.8, nesterov=True),
    "adam": dict(kind="adam", lr=0.01, weight_decay=1e-3),
    "adamw": dict(kind="adamw", lr=0.01, betas=(0.8, 0.99), weight_decay=0.05),
}


def make_optimizer(spec):
    spec = dict(spec)
    kind = spec.pop("kind")
    return optim.OPTIMIZERS[kind](**spec)


def batches_of(n, batch, epochs, seed):
    rng, out = np.random.default_rng(seed), []
    for _ in range(epochs):
        perm = rng.permutation(n)
        out += [perm[i:i + batch] for i in range(0, n, batch)]
    return out


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("batch_size,strategy", [(1, "vectorized"), (5, "vectorized"), (None, "vectorized"),
                                                 (5, "loop")])
def test_every_rule_follows_the_torch_optim_reference(backend, rule, batch_size, strategy):
    X, Y = make_data(23, 4, 3, "cross_entropy", seed=3)
    net = fb.MLP([4, 6, 3], activation="tanh", loss="cross_entropy", dtype="float64", seed=1)
    W0, b0 = net.get_params()
    epochs = 3
    batch = batch_size or len(X)
    hist = net.fit(X, Y, epochs=epochs, batch_size=batch_size, optimizer=make_optimizer(RULES[rule]),
                   strategy=strategy, seed=7)
    spec = dict(RULES[rule])
    W, b, costs = optimizer_trajectory(W0, b0, "tanh", "softmax", "cross_entropy", X, Y,
                                       batches_of(len(X), batch, epochs, 7), TorchOptimReference(**spec))
    got_W, got_b = net.get_params()
    for g, e in zip(got_W + got_b, W + b):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)
    per_epoch = len(costs) // epochs
    for e in range(epochs):  # the epoch loss: the mean pre-update cost of its batches, weighted by rows
        sizes = [len(i) for i in batches_of(len(X), batch, epochs, 7)[e * per_epoch:(e + 1) * per_epoch]]
        expected = np.dot(costs[e * per_epoch:(e + 1) * per_epoch], sizes) / len(X)
        np.testing.assert_allclose(hist[e], expected, rtol=1e-10)
    assert net.optimizer.steps == len(costs)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("first_transposed_max", [0, 1 << 20], ids=["usual", "first-layer-transposed"])
@pytest.mark.parametrize("sizes", [[4, 6, 5, 3], [4, 3]], ids=["two-hidden", "logistic"])
def test_numba_epoch_with_its_first_layer_transposed_follows_the_reference(monkeypatch, rule, first_transposed_max,
                                                                          sizes):
    """The compiled mini-batch epoch holding the first layer's weights and optimizer state as
    W.T (numba_kernels.FIRST_TRANSPOSED) trains as the reference does, a short last batch
    and a second, untransposed hidden layer included, and hands back the usual layout."""
    from fastbp.kernels.numba import NumbaBackend

    X, Y = make_data(23, 4, 3, "cross_entropy", seed=4)
    spy = []
    with fb.use_backend("numba") as be:
        # every product a GEMM (these shapes are far below the sizes that choose one)
        monkeypatch.setattr(NumbaBackend, "FORWARD_BLAS_MIN", 0)
        monkeypatch.setattr(NumbaBackend, "BACKWARD_BLAS_MIN", 0)
        monkeypatch.setattr(NumbaBackend, "FIRST_TRANSPOSED_MAX", first_transposed_max)
        kernels = be._k

        class Spy:
            def __getattr__(self, name):
                return getattr(kernels, name)

            def batch_epoch(self, *args):
                spy.append(int(args[-1][kernels.FIRST_TRANSPOSED]))
                return kernels.batch_epoch(*args)

        monkeypatch.setattr(be, "_k", Spy())
        net = fb.MLP(sizes, activation="tanh", loss="cross_entropy", dtype="float64", seed=2)
        W0, b0 = net.get_params()
        net.fit(X, Y, epochs=2, batch_size=7, optimizer=make_optimizer(RULES[rule]), seed=5)
        # one more epoch in the usual layout: it continues from the state the epochs handed back
        monkeypatch.setattr(NumbaBackend, "FIRST_TRANSPOSED_MAX", 0)
        net.fit(X, Y, epochs=1, batch_size=7, optimizer=None, seed=6)
    assert spy == [int(first_transposed_max > 0)] * 2 + [0]
    W, b, _ = optimizer_trajectory(W0, b0, "tanh", "softmax", "cross_entropy", X, Y,
                                   batches_of(len(X), 7, 2, 5) + batches_of(len(X), 7, 1, 6),
                                   TorchOptimReference(**RULES[rule]))
    for g, e in zip(sum(net.get_params(), []), W + b):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_sklearn_l2_reaches_weights_only_scaled_by_the_batch_rows(backend):
    X, Y = make_data(17, 3, 1, "mse", seed=2)
    net = fb.MLP([3, 4, 1], activation="relu", dtype="float64", seed=0)
    W0, b0 = net.get_params()
    opt = optim.SGD(lr=0.1, momentum=0.5)
    net.optimizer = opt
    opt._bind(net)
    rule = opt.rule(l2=0.3)
    ref = TorchOptimReference("sgd", lr=0.1, momentum=0.5, l2=0.3)
    params = [w.copy() for w in W0] + [x.copy() for x in b0]
    for idx in (np.arange(0, 6), np.arange(6, 17)):
        net._gradients_into(net._inputs(X[idx]), net.backend.asarray(Y[idx], net.dtype), "vectorized")
        dW, db = [fb.to_numpy(g).copy() for g in net._grad_weights], [fb.to_numpy(g).copy() for g in net._grad_biases]
        net.backend.update(net.spec, rule, net._params, net._grads, opt.state, len(idx))
        ref.step(params, dW + db, [True, True, False, False], len(idx))
    got_W, got_b = net.get_params()
    for g, e in zip(got_W + got_b, params):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
@pytest.mark.parametrize("rule", sorted(RULES))
def test_trajectory_equals_torch_optim_itself(rule):
    import torch

    X, Y = make_data(20, 5, 2, "mse", seed=4)
    net = fb.MLP([5, 7, 2], activation="sigmoid", loss="mse", dtype="float64", seed=2)
    W0, b0 = net.get_params()
    layers = [torch.nn.Linear(5, 7).double(), torch.nn.Linear(7, 2).double()]
    with torch.no_grad():
        for lin, W, b in zip(layers, W0, b0):
            lin.weight.copy_(torch.from_numpy(W))
            lin.bias.copy_(torch.from_numpy(b))
    params = [p for lin in layers for p in lin.parameters()]
    spec = dict(RULES[rule])
    kind = spec.pop("kind")
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    topt = cls(params, **spec)
    batches = batches_of(len(X), 4, 3, 11)
    for idx in batches:
        topt.zero_grad()
        out = torch.sigmoid(layers[0](torch.from_numpy(X[idx])))
        out = layers[1](out)
        cost = 0.5 * ((out - torch.from_numpy(Y[idx])) ** 2).sum(dim=1).mean()
        cost.backward()
        topt.step()
    net.fit(X, Y, epochs=3, batch_size=4, optimizer=make_optimizer(RULES[rule]), seed=11)
    got_W, got_b = net.get_params()
    for lin, W, b in zip(layers, got_W, got_b):
        np.testing.assert_allclose(W, lin.weight.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b, lin.bias.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_state_persists_across_fits_and_through_save_load(backend, rule, tmp_path):
    X, Y = make_data(30, 4, 2, "log_loss", seed=5)
    make = lambda: fb.MLP([4, 5, 2], activation="relu", loss="log_loss", dtype="float64", seed=3)  # noqa: E731
    whole = make()
    whole.fit(X, Y, epochs=2, batch_size=7, optimizer=make_optimizer(RULES[rule]), seed=1)
    whole.fit(X, Y, epochs=2, batch_size=7, seed=2)
    split = make()
    split.fit(X, Y, epochs=2, batch_size=7, optimizer=make_optimizer(RULES[rule]), seed=1)
    split.save(tmp_path / "mid.npz")
    loaded = fb.MLP.load(tmp_path / "mid.npz")
    assert type(loaded.optimizer) is type(split.optimizer) and loaded.optimizer.steps == split.optimizer.steps
    loaded.fit(X, Y, epochs=2, batch_size=7, seed=2)
    for a, b in zip(loaded.get_params()[0] + loaded.get_params()[1], whole.get_params()[0] + whole.get_params()[1]):
        np.testing.assert_array_equal(a, b)
    # a fresh name restarts the state; without it the trajectory would differ
    restarted = fb.MLP.load(tmp_path / "mid.npz")
    restarted.fit(X, Y, epochs=2, batch_size=7, optimizer=RULES[rule]["kind"], seed=2)
    assert restarted.optimizer.steps == 10
    assert not np.array_equal(fb.to_numpy(restarted._params), fb.to_numpy(whole._params))


def test_pickle_keeps_the_optimizer_state():
    import pickle

    X, Y = make_data(12, 3, 1, "mse")
    net = fb.MLP([3, 4, 1], dtype="float64", seed=0)
    net.fit(X, Y, epochs=2, batch_size=4, optimizer="adam", seed=0)
    clone = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(fb.to_numpy(clone.optimizer.state.buffers), fb.to_numpy(net.optimizer.state.buffers))
    net.fit(X, Y, epochs=1, batch_size=4, seed=1)
    clone.fit(X, Y, epochs=1, batch_size=4, seed=1)
    np.testing.assert_array_equal(fb.to_numpy(clone._params), fb.to_numpy(net._params))


def test_version_1_files_still_load(tmp_path):
    net = fb.MLP([3, 2], dtype="float64", seed=0)
    s = net.spec
    np.savez(tmp_path / "v1.npz", format_version=np.int64(1), sizes=np.asarray(s.sizes, np.int64),
             activation=np.str_(s.hidden), output=np.str_(s.output), loss=np.str_(s.loss),
             dtype=np.str_(s.dtype.name), params=fb.to_numpy(net._params))
    loaded = fb.MLP.load(tmp_path / "v1.npz")
    np.testing.assert_array_equal(fb.to_numpy(loaded._params), fb.to_numpy(net._params))
    assert loaded.optimizer is None
    X, Y = make_data(6, 3, 2, "mse")
    loaded.fit(X, Y, epochs=1)
    assert isinstance(loaded.optimizer, optim.SGD) and loaded.optimizer.lr == 0.1


def test_lr_and_optimizer_semantics():
    X, Y = make_data(10, 3, 1, "mse")
    net = fb.MLP([3, 1], dtype="float64", seed=0)
    net.fit(X, Y)
    assert isinstance(net.optimizer, optim.SGD) and net.optimizer.lr == 0.1
    net.fit(X, Y, lr=0.05)  # a number sets the model's own optimizer's rate
    assert net.optimizer.lr == 0.05
    own = net.optimizer
    net.fit(X, Y)  # None continues it
    assert net.optimizer is own and own.lr == 0.05
    net.fit(X, Y, optimizer="adam", lr=0.02)
    assert isinstance(net.optimizer, optim.Adam) and net.optimizer.lr == 0.02 and net.optimizer.steps == 1
    net.fit(X, Y, optimizer="adamw")
    assert net.optimizer.lr == 0.001 and net.optimizer.weight_decay == 0.01


def _snapshot(net):
    opt = net.optimizer
    state = None if opt is None or opt.state is None else fb.to_numpy(opt.state.buffers).copy()
    return fb.to_numpy(net._params).copy(), opt, None if opt is None else (opt.get_config(), opt.steps), state


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(optimizer="rmsprop"), ValueError, "unknown optimizer.*'rmsprop'"),
    (dict(optimizer=3), TypeError, "optimizer must be"),
    (dict(optimizer=optim.SGD(lr=0.1), lr=0.1), ValueError, "lr given together with an optimizer instance"),
    (dict(lr=-1.0), ValueError, "lr out of range"),
    (dict(lr=float("nan")), ValueError, "lr out of range"),
    (dict(lr=1e-320), ValueError, "lr does not fit the model's dtype"),
    (dict(schedule="cosine"), TypeError, "schedule must be"),
    (dict(callbacks=[3]), TypeError, r"callbacks\[0\] must be"),
    (dict(callbacks=[fb.EarlyStopping()]), ValueError, "needs validation data"),
    (dict(validation_split=1.5), ValueError, "validation_split out of range"),
    (dict(validation_split=0.2, validation_data=([[0, 0, 0]], [0])), ValueError, "given together"),
])
def test_bad_fit_arguments_change_nothing(backend, kwargs, exc, match):
    X, Y = make_data(10, 3, 1, "mse")
    net = fb.MLP([3, 2, 1], seed=0)
    net.fit(X, Y, optimizer="adam", epochs=1)
    before = _snapshot(net)
    with pytest.raises(exc, match=match):
        net.fit(X, Y, **kwargs)
    after = _snapshot(net)
    np.testing.assert_array_equal(before[0], after[0])
    assert before[1] is after[1] and before[2] == after[2]
    np.testing.assert_array_equal(before[3], after[3])


@pytest.mark.parametrize("make,match", [
    (lambda: optim.SGD(lr=0), "lr out of range"),
    (lambda: optim.SGD(momentum=-0.1), "momentum out of range"),
    (lambda: optim.SGD(momentum=float("nan")), "momentum out of range"),
    (lambda: optim.SGD(nesterov=True), "nesterov=True needs momentum"),
    (lambda: optim.SGD(nesterov="yes"), "nesterov must be a bool"),
    (lambda: optim.Adam(betas=(0.9, 1.0)), r"betas\[1\] out of range"),
    (lambda: optim.Adam(betas=(-0.1, 0.9)), r"betas\[0\] out of range"),
    (lambda: optim.Adam(betas=0.9), "betas must be a pair"),
    (lambda: optim.Adam(eps=-1e-8), "eps out of range"),
    (lambda: optim.AdamW(weight_decay=-1), "weight_decay out of range"),
    (lambda: optim.StepLR(0), "step_size must be"),
    (lambda: optim.CosineAnnealingLR(T_max=0), "T_max must be"),
    (lambda: optim.ReduceLROnPlateau(factor=1.0), "factor out of range"),
    (lambda: fb.EarlyStopping(monitor="acc"), "unknown monitor"),
    (lambda: fb.EarlyStopping(patience=-1), "patience out of range"),
])
def test_bad_hyper_parameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_an_instance_trains_one_model():
    X, Y = make_data(8, 3, 1, "mse")
    opt = optim.Adam()
    a, b = fb.MLP([3, 1], seed=0), fb.MLP([3, 1], seed=0)
    a.fit(X, Y, optimizer=opt)
    with pytest.raises(ValueError, match="already trains another model"):
        b.fit(X, Y, optimizer=opt)
    assert b.optimizer is None
    b.fit(X, Y, optimizer=copy.deepcopy(opt))


@pytest.mark.parametrize("schedule,expected", [
    (lambda: optim.ConstantLR(), lambda e: 0.1),
    (lambda: optim.StepLR(2, gamma=0.5), lambda e: 0.1 * 0.5 ** (e // 2)),
    (lambda: optim.ExponentialLR(0.9), lambda e: 0.1 * 0.9 ** e),
    (lambda: optim.CosineAnnealingLR(4, eta_min=0.01), lambda e: 0.01 + 0.09 * (1 + np.cos(np.pi * e / 4)) / 2),
    (lambda: optim.InverseScalingLR(0.5), lambda e: 0.1 / (10 * e + 1) ** 0.5),
])
def test_schedules_set_each_epochs_rate(backend, schedule, expected):
    X, Y = make_data(10, 3, 1, "mse")
    net = fb.MLP([3, 1], dtype="float64", seed=0)
    hist = net.fit(X, Y, epochs=6, batch_size=3, lr=0.1, schedule=schedule())
    np.testing.assert_allclose(hist.history["lr"], [expected(e) for e in range(6)], rtol=1e-12)
    # the rate really trained: a replay epoch by epoch with those rates gives the same parameters
    replay = fb.MLP([3, 1], dtype="float64", seed=0)
    for e, lr in enumerate(hist.history["lr"]):
        replay.fit(X, Y, epochs=1, batch_size=3, lr=lr)
    np.testing.assert_array_equal(fb.to_numpy(replay._params), fb.to_numpy(net._params))


def test_reduce_on_plateau_cuts_the_rate_after_patience():
    sched = optim.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=2, min_delta=0.0)
    sched.start(1.0)
    rates = [sched.next_lr(e, {"loss": v}) for e, v in enumerate([3.0, 2.0, 2.0, 2.5, 1.0, 1.0, 1.0])]
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_early_stopping_restores_the_best_epoch(backend):
    X, Y = make_data(60, 4, 3, "cross_entropy", seed=8)
    Xv, Yv = make_data(30, 4, 3, "cross_entropy", seed=9)
    Xv = Xv + 1.5  # shifted, so that validation loss turns upwards while training improves
    kwargs = dict(batch_size=10, lr=0.5, seed=0)
    replay = fb.MLP([4, 16, 3], activation="relu", loss="cross_entropy", dtype="float64", seed=0)
    params, val = [], []
    for e in range(30):
        replay.fit(X, Y, epochs=1, seed=e, batch_size=10, lr=0.5)
        params.append(fb.to_numpy(replay._params).copy())
        val.append(replay.loss(Xv, Yv))
    net = fb.MLP([4, 16, 3], activation="relu", loss="cross_entropy", dtype="float64", seed=0)
    stopper = fb.EarlyStopping(patience=3)
    hist = fb.History()
    for e in range(30):  # one fit per epoch so the shuffles match the replay's seeds
        kwargs["seed"] = e
        if e == 0:
            stopper.on_train_begin({})
        h = net.fit(X, Y, epochs=1, **{k: v for k, v in kwargs.items()}, validation_data=(Xv, Yv))
        hist.append(h[0])
        stopper.model = net
        stopper.on_epoch_end(e, {"val_loss": h.history["val_loss"][0]})
        if stopper.stop_training:
            break
    best = int(np.argmin(val[:e + 1]))
    assert stopper.best_epoch == best and e < 29
    stopper.on_train_end({})
    np.testing.assert_array_equal(fb.to_numpy(net._params), params[best])


def test_early_stopping_inside_one_fit(backend):
    X, Y = make_data(60, 4, 3, "cross_entropy", seed=8)
    net = fb.MLP([4, 16, 3], activation="relu", loss="cross_entropy", dtype="float64", seed=0)
    seen = []
    hist = net.fit(X, Y, epochs=200, batch_size=10, lr=0.5, validation_split=0.25, seed=0,
                   callbacks=[fb.EarlyStopping(patience=2), lambda e, logs: seen.append(logs["val_loss"])])
    assert hist.stopped_epoch is not None and len(hist) == hist.stopped_epoch + 1 < 200
    assert hist.best_epoch == int(np.argmin(seen))
    Xv, Yv = X[45:], Y[45:]
    np.testing.assert_allclose(net.loss(Xv, Yv), min(seen), rtol=1e-12)


def test_a_function_callback_stops_training_and_sees_the_logs(backend):
    X, Y = make_data(20, 3, 2, "log_loss")
    net = fb.MLP([3, 2], loss="log_loss", dtype="float64", seed=0)
    logs_seen = []

    def stop_at_three(epoch, logs):
        logs_seen.append(dict(logs))
        return epoch == 2

    hist = net.fit(X, Y, epochs=10, batch_size=5, callbacks=[stop_at_three])
    assert len(hist) == 3 and hist.stopped_epoch == 2
    assert {"loss", "accuracy", "lr", "samples_seen"} <= set(logs_seen[0])
    assert [d["samples_seen"] for d in logs_seen] == [20, 40, 60]


@pytest.mark.parametrize("batch_size,strategy", [(1, "vectorized"), (4, "vectorized"), (None, "vectorized"),
                                                 (4, "loop")])
def test_training_accuracy_is_that_of_the_pre_update_outputs(backend, batch_size, strategy):
    X, Y = make_data(21, 3, 4, "cross_entropy", seed=6)
    net = fb.MLP([3, 5, 4], activation="tanh", loss="cross_entropy", dtype="float64", seed=0)
    ref = fb.MLP([3, 5, 4], activation="tanh", loss="cross_entropy", dtype="float64", seed=0)
    hist = net.fit(X, Y, epochs=2, batch_size=batch_size, shuffle=False, strategy=strategy)
    batch = batch_size or len(X)
    for e in range(2):
        correct = 0
        for start in range(0, len(X), batch):
            xb, yb = X[start:start + batch], Y[start:start + batch]
            correct += int((ref.predict(xb).argmax(1) == yb.argmax(1)).sum())
            ref.fit(xb, yb, epochs=1, batch_size=None, shuffle=False)
        assert hist.history["accuracy"][e] == correct / len(X)


def test_saved_optimizer_fields_are_readable(tmp_path):
    X, Y = make_data(8, 3, 1, "mse")
    net = fb.MLP([3, 1], dtype="float64", seed=0)
    net.fit(X, Y, optimizer=optim.AdamW(lr=0.003, betas=(0.8, 0.9)))
    net.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        meta = json.loads(str(f["optimizer"]))
        assert meta == {"kind": "adamw", "config": {"lr": 0.003, "betas": [0.8, 0.9], "eps": 1e-8,
                                                    "weight_decay": 0.01}}
        assert int(f["optimizer_step"]) == 1 and f["optimizer_state"].shape == (2, net.n_params)


# ---------------------------------------------------------------- review findings, each reproduced first
def test_an_instance_stays_bound_after_its_model_is_gone():
    import gc

    X, Y = make_data(8, 3, 2, "mse")
    opt = optim.Adam(lr=0.01)
    fb.MLP([3, 4, 2], seed=5).fit(X, Y, optimizer=opt)
    gc.collect()  # the first model is gone; its moments must not leak into a new one
    fresh = fb.MLP([3, 4, 2], seed=5)
    with pytest.raises(ValueError, match="already trains another model"):
        fresh.fit(X, Y, optimizer=opt)
    assert fresh.optimizer is None


def test_an_unpickled_models_optimizer_is_bound_to_it():
    import pickle

    X, Y = make_data(8, 3, 2, "mse")
    a = fb.MLP([3, 4, 2], seed=0)
    a.fit(X, Y, optimizer="adam")
    c = pickle.loads(pickle.dumps(a))
    assert c.optimizer._owner() is c
    with pytest.raises(ValueError, match="already trains another model"):
        fb.MLP([3, 4, 2], seed=0).fit(X, Y, optimizer=c.optimizer)


@pytest.mark.parametrize("kwargs,match", [
    (dict(callbacks=[fb.EarlyStopping(monitor="accuracy")]), "needs a classification loss"),
    (dict(callbacks=[fb.EarlyStopping(monitor="val_accuracy")]), "needs validation data"),
    (dict(schedule=optim.ReduceLROnPlateau(monitor="val_loss")), "needs validation data"),
    (dict(schedule=optim.ReduceLROnPlateau(monitor="accuracy")), "needs a classification loss"),
])
def test_monitors_are_checked_before_anything_trains(backend, kwargs, match):
    X, Y = make_data(12, 3, 2, "mse")
    net = fb.MLP([3, 4, 2], seed=1)
    before = fb.to_numpy(net._params).copy()
    with pytest.raises(ValueError, match=match):
        net.fit(X, Y, epochs=3, **kwargs)
    np.testing.assert_array_equal(fb.to_numpy(net._params), before)
    assert net.optimizer is None
    with pytest.raises(ValueError, match="unknown monitor"):
        optim.ReduceLROnPlateau(monitor="vall_loss")


def test_reduce_on_plateau_reads_accuracy_upwards():
    sched = optim.ReduceLROnPlateau(monitor="accuracy", factor=0.5, patience=1, min_delta=0.0)
    sched.start(1.0)
    assert [sched.next_lr(e, {"accuracy": a}) for e, a in enumerate([0.7, 0.9, 0.95, 1.0, 1.0])] == \
        [1.0, 1.0, 1.0, 1.0, 0.5]


def test_save_load_continues_the_shuffle_stream_too(backend):
    import io

    X, Y = make_data(30, 3, 2, "mse", seed=2)
    a = fb.MLP([3, 4, 2], dtype="float64", seed=1)
    a.fit(X, Y, optimizer="adam", batch_size=8)
    buf = io.BytesIO()
    a.save(buf)
    buf.seek(0)
    b = fb.MLP.load(buf)
    a.fit(X, Y, batch_size=8)  # shuffle=True, seed=None: both continue their own (equal) streams
    b.fit(X, Y, batch_size=8)
    np.testing.assert_array_equal(fb.to_numpy(a._params), fb.to_numpy(b._params))


def test_schedules_keep_the_rate_a_positive_number_of_the_dtype(backend):
    X, Y = make_data(10, 3, 1, "mse")
    net = fb.MLP([3, 1], dtype="float32", seed=0)
    hist = net.fit(X, Y, epochs=4, lr=1e-3, schedule=optim.ExponentialLR(gamma=1e-30))
    assert len(hist) == 4 and all(lr > 0 and np.float32(lr) > 0 for lr in hist.history["lr"])
    net.fit(X, Y)  # the rate it was left with is still one the next fit accepts
    with pytest.raises(fb.TrainingDivergedError):  # a rate grown past the dtype: divergence, not OverflowError
        net.fit(X, Y, epochs=3, lr=0.01, schedule=optim.ExponentialLR(gamma=1e200))


def test_a_reused_callback_starts_each_fit_afresh():
    class StopAtTwo(fb.Callback):
        def on_epoch_end(self, epoch, logs):
            if epoch == 2:
                self.stop_training = True

    X, Y = make_data(10, 3, 1, "mse")
    net, cb = fb.MLP([3, 1], seed=0), StopAtTwo()
    assert len(net.fit(X, Y, epochs=5, callbacks=[cb])) == 3
    assert len(net.fit(X, Y, epochs=5, callbacks=[cb])) == 3


def test_a_diverged_epoch_leaves_the_shuffle_stream_where_it_was(backend):
    X, Y = make_data(40, 3, 2, "mse", seed=3)
    X = X * 50
    net = fb.MLP([3, 8, 2], activation="relu", dtype="float64", seed=0)
    state = net._rng.bit_generator.state
    with pytest.raises(fb.TrainingDivergedError):
        net.fit(X, Y, epochs=50, batch_size=4, lr=5.0)
    replay = fb.MLP([3, 8, 2], activation="relu", dtype="float64", seed=0)
    epochs_done = None
    try:
        replay.fit(X, Y, epochs=50, batch_size=4, lr=5.0)
    except fb.TrainingDivergedError as exc:
        epochs_done = len(exc.history)
    assert epochs_done is not None
    # the stream after the failed fit is the one after the epochs that completed, not one further
    check = np.random.default_rng()
    check.bit_generator.state = state
    for _ in range(epochs_done):
        check.permutation(len(X))
    assert net._rng.bit_generator.state == check.bit_generator.state


def test_ops_sgd_update_on_strided_views_is_the_same_everywhere(backend):
    params = backend.asarray(np.arange(10.0), np.float64)[::2]
    grads = backend.asarray(np.ones(10), np.float64)[::2]
    fb.ops.sgd_update(params, grads, 0.5)
    np.testing.assert_array_equal(fb.to_numpy(params), np.arange(10.0)[::2] - 0.5)
