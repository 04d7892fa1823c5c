"""Data-parallel training over MPI: everything fastbp says to mpi4py lives here.

Every rank runs the same ``fit`` on the same data set; ``batch_size`` is the global batch.
Each rank computes the mean gradient of its share of a global mini-batch (contiguous rows of
the batch, shares differing by at most one row), scales it by ``share / batch`` and one in-place
``Allreduce(SUM)`` of the flat gradient buffer leaves on every rank the exact mean over the whole
batch, so every rank applies the same optimizer step as a single process would. The batch's cost
sum and correct count travel in a small float64 ``Iallreduce`` that overlaps the gradient's.

Failure never hangs: ``fit``'s checks run on every rank and end in one exchange,
:meth:`Collective.settle`, of each rank's error (or none) with the arguments that must match; the
:func:`collective_checks` decorator makes an error raised before that point take part in it too. So
bad input on one rank raises the same exception on all of them before anything is touched, and the
per-step loss every rank tests for divergence is the same reduced number. Every collective here
is entered by every rank in the same order; none is skipped by some.

mpi4py is imported only when a communicator is given (``import fastbp`` stays light).
"""

from __future__ import annotations

import functools
import sys

import numpy as np

__all__ = ["Collective", "collective_checks", "share_bounds"]

# Exceptions rebuilt by type on the ranks that did not raise them; anything else travels pickled.
_REBUILT = {cls.__name__: cls for cls in (ValueError, TypeError, FileNotFoundError, MemoryError, RuntimeError)}


def share_bounds(rows: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a global batch of ``rows`` that ``rank`` of ``size`` computes.

    Contiguous and as even as possible: the first ``rows % size`` ranks take one row more.
    """
    q, r = divmod(rows, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def _mpi():
    from mpi4py import MPI

    return MPI


def _check_comm(comm):
    """``comm`` when it is an mpi4py intra-communicator; TypeError otherwise, without importing
    mpi4py just to say no (an object from mpi4py means the module is already loaded)."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator. Received: comm={comm!r} "
                        f"({type(comm).__name__}). Expected e.g. mpi4py.MPI.COMM_WORLD, or None")
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an intra-communicator with this rank in it. Received: comm={comm!r}. "
                        "Expected e.g. mpi4py.MPI.COMM_WORLD or a comm.Split() of it")
    return comm


class Collective:
    """One fit's view of an MPI communicator: agreement, broadcast and the per-step allreduce.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm
        Every rank of it takes part in the fit.
    backend : fastbp backend
        Where the parameters and gradients live; GPU buffers are staged through host memory
        unless the MPI library reports CUDA awareness.
    """

    def __init__(self, comm, backend) -> None:
        self.comm = _check_comm(comm)
        self.MPI = _mpi()
        self.backend = backend
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.settled = False  # whether the ranks have exchanged their verdict on the arguments
        self._scalars = np.zeros(2)  # [loss_sum, n_correct] of one step, float64 on every dtype
        self._host: dict[tuple, np.ndarray] = {}  # host staging buffers for GPU arrays
        self.cuda_aware = bool(getattr(backend, "is_gpu", False) and self._query_cuda_aware())
        if self.size > 1:
            _abort_on_uncaught(self.MPI)

    def _query_cuda_aware(self) -> bool:
        query = getattr(self.MPI, "Query_cuda_support", None)  # mpi4py >= 4 (MPIX_Query_cuda_support)
        try:
            return bool(query()) if query is not None else False
        except Exception:  # noqa: BLE001 -- a library without the extension: stage through the host
            return False

    def __repr__(self) -> str:
        return f"Collective(rank={self.rank}, size={self.size}, staging={'device' if self.cuda_aware else 'host'})"

    # ------------------------------------------------------------ agreement
    def settle(self, error: BaseException | None = None, signature: dict | None = None) -> None:
        """The one agreement of a fit: every rank calls it once, with the exception its checks
        raised (or None) and the values that must match; raises on all ranks or on none."""
        self.settled = True
        self._raise_if_any(error, signature)

    def _raise_if_any(self, error, signature) -> None:
        payload = None if error is None else _encode(error)
        gathered = self.comm.allgather((payload, signature))
        for rank, (payload, _) in enumerate(gathered):
            if payload is not None:
                raise _decode(payload, rank, self.size) from (error if rank == self.rank else None)
        first = gathered[0][1] or {}
        for rank, (_, sig) in enumerate(gathered[1:], start=1):
            for key in first:
                if (sig or {}).get(key) != first[key]:
                    raise ValueError(f"fit arguments differ between ranks: every rank must pass the same. "
                                     f"Received: {key}={first[key]!r} on rank 0, {key}={(sig or {}).get(key)!r} "
                                     f"on rank {rank}. Expected the same {key} on all {self.size} ranks")

    def check_batch(self, batch: int, n_samples: int, batch_size) -> None:
        """ValueError when a global batch cannot give every rank at least one row (raised before
        :meth:`settle`, so every rank raises it)."""
        if batch < self.size:
            raise ValueError(f"batch_size is smaller than the number of MPI ranks: every rank needs at least one "
                             f"row of each batch. Received: batch_size={batch_size!r} (n_samples={n_samples}) on "
                             f"comm.size={self.size}. Expected a batch of at least {self.size} rows")

    # ------------------------------------------------------------ broadcast
    def broadcast_(self, *arrays) -> None:
        """Overwrite each array, in place, with rank 0's (initial parameters, optimizer state)."""
        for a in arrays:
            if a is None or a.size == 0:
                continue
            if isinstance(a, np.ndarray):  # host data (a step counter, NumPy-backend buffers)
                self.comm.Bcast(a, root=0)
            elif self.backend.is_gpu and not self.cuda_aware:
                host = self._staging(a)
                a.get(out=host)
                self.comm.Bcast(host, root=0)
                a.set(host)
            else:
                if self.backend.is_gpu:
                    self.backend.synchronize()
                self.comm.Bcast(a, root=0)

    def broadcast_rng(self, rng: np.random.Generator) -> None:
        """Give ``rng`` rank 0's state, so every rank draws the same shuffles as rank 0 would alone."""
        rng.bit_generator.state = self.comm.bcast(rng.bit_generator.state, root=0)

    # ------------------------------------------------------------ the per-step reduction
    def share(self, rows: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of a global batch of ``rows``."""
        return share_bounds(rows, self.rank, self.size)

    def allreduce_gradients(self, grads, local_rows: int, global_rows: int, loss_sum, n_correct=0):
        """The exact global mean gradient of a batch, in place in ``grads`` on every rank.

        ``grads`` holds the mean gradient of this rank's ``local_rows`` (anything when 0: it is
        zeroed), ``global_rows`` the batch's total. Returns ``(loss_sum, n_correct)`` summed over
        the ranks, as a float and an int -- the same numbers on every rank, so divergence is seen
        by all of them at the same step.
        """
        MPI, comm = self.MPI, self.comm
        if local_rows == 0:
            grads[...] = 0
        elif local_rows != global_rows:
            grads *= grads.dtype.type(local_rows / global_rows)
        scalars = self._scalars
        scalars[0] = float(loss_sum) if local_rows else 0.0
        scalars[1] = float(n_correct) if local_rows else 0.0
        request = comm.Iallreduce(MPI.IN_PLACE, scalars, op=MPI.SUM)
        try:
            if self.backend.is_gpu and not self.cuda_aware:
                host = self._staging(grads)
                grads.get(out=host)  # synchronizes the stream: the gradient is complete
                comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
                grads.set(host)
            else:
                if self.backend.is_gpu:
                    self.backend.synchronize()
                comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        finally:
            request.Wait()
        return float(scalars[0]), int(round(scalars[1]))

    def _staging(self, a) -> np.ndarray:
        key = (a.shape, np.dtype(a.dtype).str)
        host = self._host.get(key)
        if host is None:
            host = self._host[key] = _pinned_empty(a.shape, a.dtype)
        return host


def collective_checks(fit):
    """Decorator for ``fit(net, ..., comm=None)``: with an mpi4py ``comm`` the fit runs with a
    :class:`Collective` in its place, and an error raised before ``fit`` reached
    :meth:`Collective.settle` (its checks) is agreed on, so every rank raises the same one."""

    @functools.wraps(fit)
    def run(net, *args, comm=None, **kwargs):
        if comm is None or isinstance(comm, Collective):
            return fit(net, *args, comm=comm, **kwargs)
        coll = Collective(comm, getattr(net, "backend", None))
        try:
            return fit(net, *args, comm=coll, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- re-raised, the same on every rank
            if coll.settled:
                raise
            coll.settle(exc)
            raise  # not reached: settle raises the agreed error

    return run


_ABORT_HOOKED = False


def _abort_on_uncaught(MPI) -> None:
    """Make an exception that nothing catches end the whole job with ``MPI_Abort``, as ``python
    -m mpi4py`` does: without it the failing rank waits in ``MPI_Finalize`` at exit and the others
    in their next collective, forever. Installed once, chained after the current excepthook."""
    global _ABORT_HOOKED
    if _ABORT_HOOKED:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
    _ABORT_HOOKED = True


def _pinned_empty(shape, dtype) -> np.ndarray:
    """Page-locked host memory where CuPy can give it (faster device copies), else plain."""
    cupyx = sys.modules.get("cupyx")
    if cupyx is not None:
        try:
            return cupyx.empty_pinned(shape, dtype=dtype)
        except Exception:  # noqa: BLE001 -- pinned memory is an optimisation only
            pass
    return np.empty(shape, dtype=dtype)


def _encode(exc: BaseException) -> tuple[str, str, bytes | None]:
    import pickle

    try:
        blob = pickle.dumps(exc)
    except Exception:  # noqa: BLE001 -- unpicklable exceptions travel as type name and message
        blob = None
    return type(exc).__name__, str(exc), blob


def _decode(payload, rank: int, size: int) -> BaseException:
    """The failing rank's exception, rebuilt identically on every rank."""
    import pickle

    name, message, blob = payload
    text = f"on rank {rank} of {size}: {message}"
    cls = _REBUILT.get(name)
    if cls is None and blob is not None:
        try:
            cls = type(pickle.loads(blob))
        except Exception:  # noqa: BLE001
            cls = None
    try:
        return cls(text) if cls is not None else RuntimeError(f"{name} {text}")
    except Exception:  # noqa: BLE001 -- an exception class with a different constructor
        return RuntimeError(f"{name} {text}")

