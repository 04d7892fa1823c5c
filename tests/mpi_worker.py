"""One MPI rank of tests/test_mpi.py: ``mpiexec -n N python tests/mpi_worker.py CASE OUTDIR [DATA]``.

Each rank runs the cases of CASE and pickles what it saw (parameters, histories, the exceptions
it raised) to ``OUTDIR/rank<r>.pkl``; the test compares every rank with the single-process
fits of the same cases. The case tables live here so the test builds the same fits.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

import numpy as np

import fastbp as fb
from fastbp import training
from fastbp.parallel import share_bounds

N, N_IN, N_OUT = 50, 4, 3


def data(loss="cross_entropy", seed=0):
    """The data set every case trains on: float64 inputs and targets valid for ``loss``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, N_IN))
    if loss == "cross_entropy":
        return X, rng.integers(0, N_OUT, size=N)
    return X, rng.normal(size=(N, N_OUT))


def optimizers():
    """Every optimizer (fresh instances: each fit binds its own)."""
    return {
        "sgd": "sgd",
        "sgd_momentum": fb.optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam": fb.optim.Adam(lr=0.01),
        "adamw": fb.optim.AdamW(lr=0.01, weight_decay=0.05),
    }


def model(seed=1, loss="cross_entropy"):
    return fb.MLP([N_IN, 6, N_OUT], activation="tanh", loss=loss, dtype="float64", seed=seed)


def equivalence_cases(memmap_dir=None):
    """(name, model seed, fit data, fit kwargs) of every fit that must match a single process.

    Batch 7 of 50 rows gives uneven shares on 2 and 3 ranks and a last batch of one row, which
    leaves some ranks without rows in that step.
    """
    X, y = data()
    cases = []
    for name, opt in optimizers().items():
        cases.append((f"{name}", 1, (X, y), dict(epochs=3, batch_size=7, optimizer=opt, seed=5)))
    Xr, Yr = data("mse", seed=2)
    cases.append(("full_batch_in_order_mse", 1, (Xr, Yr),
                  dict(epochs=4, batch_size=None, optimizer="adam", shuffle=False, loss="mse")))
    cases.append(("validation_and_callbacks", 1, (X, y),
                  dict(epochs=4, batch_size=8, lr=0.2, validation_split=0.2,
                       callbacks=[fb.EarlyStopping(monitor="val_loss", patience=1)])))
    if memmap_dir is not None:
        Xm = np.load(os.path.join(memmap_dir, "X.npy"), mmap_mode="r")
        ym = np.load(os.path.join(memmap_dir, "y.npy"), mmap_mode="r")
        cases.append(("memmap", 1, (Xm, ym), dict(epochs=3, batch_size=6, optimizer="adamw", seed=3)))
    return cases


def diverging():
    """A linear model whose loss overflows in its second epoch: (model, data, fit kwargs)."""
    X, Y = data("mse", seed=2)
    net = fb.MLP([N_IN, 6, N_OUT], activation="identity", loss="mse", dtype="float64", seed=1)
    return net, (X * 10, Y * 10), dict(epochs=4, batch_size=10, lr=0.03, seed=0, progress=False)


def fit_case(seed, fit_data, kwargs, comm=None):
    kwargs = dict(kwargs)
    net = model(seed, kwargs.pop("loss", "cross_entropy"))
    history = net.fit(*fit_data, progress=False, comm=comm, **kwargs)  # the public entry point
    return net._params.copy(), dict(history.history), net.optimizer.state.steps


class HostStaged(np.ndarray):
    """Stands in for a CuPy array on the host: only ``get(out=)`` and ``set()`` reach MPI."""

    def get(self, out):
        np.copyto(out, self.view(np.ndarray))
        return out

    def set(self, host):
        np.copyto(self.view(np.ndarray), host)


class FakeGpu:
    """A backend that says it is a GPU, so the Collective stages buffers through the host."""

    is_gpu = True
    synchronized = 0

    def synchronize(self):
        self.synchronized += 1


def staged_allreduce(comm):
    """The host-staged allreduce and broadcast the CuPy backend takes, on stand-in device arrays:
    rank r holds the mean gradient ``r + 1`` of a share of ``r + 1`` rows of a batch."""
    from fastbp.parallel import Collective

    coll = Collective(comm, FakeGpu())
    rank, size = comm.Get_rank(), comm.Get_size()
    grads = np.full(5, rank + 1.0, np.float32).view(HostStaged)
    total_rows = size * (size + 1) // 2
    loss, correct = coll.allreduce_gradients(grads, rank + 1, total_rows, loss_sum=2.0 * (rank + 1), n_correct=rank)
    params = np.full(3, float(rank), np.float64).view(HostStaged)
    coll.broadcast_(params)
    return coll.cuda_aware, np.asarray(grads).copy(), loss, correct, np.asarray(params).copy()


def _error(exc):
    return type(exc).__name__, str(exc)


def main(case, outdir, memmap_dir=None):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out = {"size": comm.Get_size()}
    if case == "equivalence":
        for name, seed, fit_data, kwargs in equivalence_cases(memmap_dir):
            out[name] = fit_case(seed, fit_data, kwargs, comm)
        # each rank starts from a different model: rank 0's parameters and shuffle stream win
        X, y = data()
        net = model(seed=rank)
        history = training.fit(net, X, y, epochs=2, batch_size=9, optimizer="adam", progress=False, comm=comm)
        out["rank0_wins"] = (net._params.copy(), list(history), net._rng.bit_generator.state)
        out["staged"] = staged_allreduce(comm)
    elif case == "errors":
        X, y = data()
        net = model()
        before = net._params.copy()
        bad = X.copy()
        if rank == 1:  # in the rows rank 1 checks (each rank checks its 1/size of the data set)
            bad[share_bounds(N, 1, comm.Get_size())[0] + 1, 2] = np.nan
        attempts = {
            "nan_on_rank_1": lambda: training.fit(net, bad, y, epochs=1, batch_size=8, comm=comm),
            "epochs_differ": lambda: training.fit(net, X, y, epochs=2 + (rank == comm.Get_size() - 1),
                                                  batch_size=8, comm=comm),
            "batch_below_ranks": lambda: training.fit(net, X, y, epochs=1, batch_size=1, comm=comm),
            "labels_out_of_range_on_rank_1": lambda: training.fit(
                net, X, np.where(rank == 1, y + N_OUT, y), epochs=1, batch_size=8, comm=comm),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
                out[name] = None
            except Exception as exc:  # noqa: BLE001 -- recorded for the test to compare
                out[name] = _error(exc)
            out[name + "_unchanged"] = bool(np.array_equal(net._params, before))
        # a model that diverges: every rank raises in the same epoch and restores the same parameters
        big, fit_data, kwargs = diverging()
        try:
            training.fit(big, *fit_data, comm=comm, **kwargs)
            out["diverged"] = None
        except fb.TrainingDivergedError as exc:
            out["diverged"] = (_error(exc), len(exc.history), big._params.copy(), big.optimizer.state.steps)
        # nothing was left half-done on the communicator: a normal fit still works
        out["after"] = fit_case(1, (X, y), dict(epochs=1, batch_size=7, seed=5), comm)
    else:
        raise SystemExit(f"unknown case {case!r}")
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def dying(how):
    """Rank 1 fails in its second epoch (an uncaught exception, or SIGKILL); the others are then
    in a collective. The job must end, not hang."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    X, y = data()

    def fail(epoch, logs):
        if epoch == 1 and comm.Get_rank() == 1:
            if how == "kill":
                os.kill(os.getpid(), 9)
            raise RuntimeError("rank 1 fails on purpose")

    training.fit(model(), X, y, epochs=20, batch_size=8, callbacks=[fail], comm=comm)
    print(f"rank {comm.Get_rank()} finished", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "dying":  # no safety net here: what fastbp does on its own is under test
        dying(sys.argv[3])
        sys.exit(0)
    try:
        main(*sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)  # one rank failing must end the job, not leave the others waiting
