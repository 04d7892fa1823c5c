"""Out-of-core mini-batches: training data that is never copied whole.

``fit`` on a read-only ``np.memmap`` (``np.load(path, mmap_mode="r")``), or on any array with a
``shape``, a ``dtype`` and row indexing (an h5py dataset, say), streams it: each epoch's
permutation is cut into chunks of whole global mini-batches, and a chunk's rows are read in
sorted order (sequential pages of the file; h5py asks for increasing indices too), cast to the
model dtype and gathered back into batch order in a preallocated buffer. Memory is bounded by the
chunk size, not by the data set: one chunk of model-dtype rows (two with prefetch), one of
source-dtype rows (and one more of model-dtype rows when the dtypes differ), plus the permutation.
The next chunk can be read by a background thread while the current one trains (``prefetch``; off
by default, as measured).

Under MPI the same path reads, for each global batch, only the rows of this rank's share
(:func:`fastbp.parallel.share_bounds`), so a rank touches ``1/size`` of the file per epoch.

The values are checked in one chunked pass before training (NaN/Inf, magnitudes that do not fit
the model dtype, class labels and target ranges), so a rejected fit changes nothing; under MPI each
rank checks only its ``1/size`` of the rows and the ranks agree on the verdict.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .parallel import share_bounds as _share

__all__ = ["BatchStream", "Chunk", "check_streamed", "is_streamed", "sources", "train_epoch"]

DEFAULT_CHUNK_BYTES = 32 << 20  # model-dtype bytes of X and Y rows per chunk
# Read the next chunk in a thread while this one trains? Measured off by default: on the issue's
# 3M x 128 memmap (warm page cache, 2 cores) the thread made epochs 1.2x slower, since the compiled
# Numba epoch holds the GIL and the reader competes for the cores (benchmarks/out_of_core.py).
DEFAULT_PREFETCH = False


def is_streamed(x) -> bool:
    """True for inputs ``fit`` streams instead of copying: a ``np.memmap``, or an array-like
    with ``shape``, ``dtype`` and ``__getitem__`` that is neither a NumPy nor a CuPy array."""
    if isinstance(x, np.memmap):
        return True
    if isinstance(x, (np.ndarray, list, tuple)) or type(x).__module__.split(".")[0] == "cupy":
        return False
    return all(hasattr(x, attr) for attr in ("shape", "dtype", "__getitem__"))


def _describe(x) -> str:
    return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"


def _chunk_rows(row_bytes: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(row_bytes, 1))


def _read(src, index: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = src[index]`` for increasing ``index``; a contiguous run is one slice read."""
    if index.size and index[-1] - index[0] + 1 == index.size:
        np.copyto(out, src[int(index[0]):int(index[-1]) + 1], casting="unsafe")
    elif isinstance(src, np.ndarray):
        np.take(src, index, axis=0, out=out)
    else:
        np.copyto(out, np.asarray(src[index]), casting="unsafe")


def _reorder(src: np.ndarray, inverse, out: np.ndarray, cast) -> None:
    """``out[:] = src[inverse]`` in the model dtype (``cast``: a buffer of it, when src's differs)."""
    if cast is not None:
        np.copyto(cast, src, casting="unsafe")
        src = cast
    if inverse is None:
        np.copyto(out, src)
    else:
        np.take(src, inverse, axis=0, out=out)


# ---------------------------------------------------------------- checks
def _shape_of(name: str, x) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None or not hasattr(x, "__getitem__"):
        raise TypeError(f"{name} must be an array with rows. Received: {type(x).__name__}. "
                        "Expected a NumPy array, a np.memmap or an array-like with shape, dtype and row indexing")
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers. Received: {_describe(x)}. "
                        "Expected a bool, integer or floating dtype")
    return tuple(int(s) for s in shape)


def _host(name: str, x):
    """Lists become NumPy arrays and CuPy arrays come to the host; row-indexable inputs stay."""
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged lists and the like
            raise ValueError(f"{name} could not be read as an array ({exc}). Received: {type(x).__name__} "
                             f"of length {len(x)}") from None
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return x


def sources(X, Y, *, n_features: int, n_outputs: int, loss: str, dtype, share=None,
            chunk_bytes: int | None = None, names=("X", "Y")):
    """``(X, Y, n_samples)``: the training data as host-readable row sources, checked by
    :func:`check_streamed` (lists become arrays; nothing is copied whole otherwise)."""
    X, Y = _host(names[0], X), _host(names[1], Y)
    n = check_streamed(X, Y, n_features=n_features, n_outputs=n_outputs, loss=loss, dtype=dtype, share=share,
                       chunk_bytes=chunk_bytes, names=names)
    return X, Y, n


def check_streamed(X, Y, *, n_features: int, n_outputs: int, loss: str, dtype, share=None,
                   chunk_bytes: int | None = None, names=("X", "Y")) -> int:
    """Check a streamed ``X, Y`` as ``fit`` checks in-memory data, reading them chunk by chunk.

    ``share = (rank, size)`` limits the value checks to that rank's part of the rows (the ranks
    then agree on the verdict); shapes are always checked whole. Returns ``n_samples``; raises
    ValueError/TypeError naming the argument.
    """
    dtype = np.dtype(dtype)
    nx, ny = names
    xs = _shape_of(nx, X)
    if len(xs) != 2 or xs[1] != n_features:
        raise ValueError(f"{nx} has the wrong shape. Received: {_describe(X)}. Expected shape (n_samples, {n_features})")
    n = xs[0]
    if n == 0:
        raise ValueError(f"{nx} is empty. Received: {_describe(X)}. Expected at least one sample")
    ys = _shape_of(ny, Y)
    labels = len(ys) == 1 and ys[0] == n and loss == "cross_entropy"
    if not (labels or ys == (n, n_outputs) or (len(ys) == 1 and ys[0] == n and n_outputs == 1)):
        expected = f"shape ({n}, {n_outputs})"
        if loss == "cross_entropy":
            expected += f" or integer labels of shape ({n},)"
        elif n_outputs == 1:
            expected += f" or ({n},)"
        raise ValueError(f"{ny} has the wrong shape. Received: {_describe(Y)}. Expected {expected}")
    lo, hi = (0, n) if share is None else _share(n, *share)
    step = _chunk_rows(n_features * np.dtype(X.dtype).itemsize, chunk_bytes or DEFAULT_CHUNK_BYTES)
    limit = float(np.finfo(dtype).max)
    y_lo, y_hi = np.inf, -np.inf
    for start in range(lo, hi, step):
        stop = min(start + step, hi)
        for name, src in ((nx, X), (ny, Y)):
            block = np.asarray(src[start:stop])
            if block.dtype.kind != "f":
                continue
            bad = ~np.isfinite(block)
            if bad.any():
                row = start + int(np.flatnonzero(bad.reshape(stop - start, -1).any(axis=1))[0])
                raise ValueError(f"{name} contains NaN or Inf (first at row {row}). Received: {_describe(src)}. "
                                 "Expected finite values")
            if block.dtype.itemsize > dtype.itemsize and float(np.abs(block).max()) > limit:
                raise ValueError(f"{name} does not fit the model's dtype. Received: a value of magnitude "
                                 f"{float(np.abs(block).max()):.3g} in rows [{start}, {stop}). "
                                 f"Expected magnitudes up to {limit:.3g} ({dtype.name})")
        yb = np.asarray(Y[start:stop])
        if labels and yb.dtype.kind == "f" and not bool((yb == np.floor(yb)).all()):
            raise ValueError(f"{ny} as class labels must be whole numbers. Received: {_describe(Y)} "
                             f"with a fractional value in rows [{start}, {stop})")
        y_lo, y_hi = min(y_lo, float(yb.min())), max(y_hi, float(yb.max()))
    where = "" if (lo, hi) == (0, n) else f" among rows [{lo}, {hi})"
    if labels and (y_lo < 0 or y_hi >= n_outputs):
        raise ValueError(f"{ny} has class labels out of range. Received: labels in [{int(y_lo)}, {int(y_hi)}]{where}. "
                         f"Expected integers in [0, {n_outputs - 1}] for {n_outputs} outputs")
    if not labels and loss == "log_loss" and (y_lo < 0 or y_hi > 1):
        raise ValueError(f"{ny} out of range for log_loss. Received: values in [{y_lo}, {y_hi}]{where}. "
                         "Expected targets in [0, 1]")
    if not labels and loss == "cross_entropy" and y_lo < 0:
        raise ValueError(f"{ny} out of range for cross_entropy. Received: a minimum of {y_lo}{where}. "
                         "Expected non-negative targets (one-hot rows or probabilities)")
    return n


# ---------------------------------------------------------------- batches
@dataclass
class Chunk:
    """Consecutive global mini-batches, as this rank's rows of them.

    ``X`` (rows, n_features) and ``Y`` (rows, n_outputs) are backend arrays in the model dtype;
    batch ``j`` of the chunk is rows ``bounds[j][0]:bounds[j][1]`` of them, and ``sizes[j]`` is
    that batch's global row count (all ranks together). Valid until the next chunk is asked for.
    """

    X: object
    Y: object
    bounds: list[tuple[int, int]]
    sizes: list[int]
    first_batch: int


class BatchStream:
    """The mini-batches of a fit over ``X, Y``, gathered chunk by chunk.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features) with row indexing (np.memmap, ndarray, ...)
    Y : array-like of shape (n_samples, n_outputs), or (n_samples,) labels / one-output targets
    n_outputs, loss, dtype : the model's output width, loss name and dtype
    batch : int, the global mini-batch size (already clipped to n_samples)
    backend : the model's backend (rows reach it once per chunk)
    share : (rank, size) or None; under MPI this rank reads only its share of every batch
    chunk_bytes : model-dtype bytes of one chunk of this rank's X and Y rows (at least one batch)
    prefetch : read the next chunk in a background thread (None: ``DEFAULT_PREFETCH`` when an
        epoch has several chunks)
    n : train on rows ``[0, n)`` only (None: all of them)
    """

    def __init__(self, X, Y, *, n_outputs: int, loss: str, dtype, batch: int, backend, share=None,
                 chunk_bytes: int | None = None, prefetch: bool | None = None, n: int | None = None) -> None:
        self.X, self.Y, self.backend = X, Y, backend
        self.dtype = np.dtype(dtype)
        self.n = int(X.shape[0]) if n is None else int(n)  # rows [0, n) train (validation_split holds out the rest)
        self.n_features = int(X.shape[1])
        self.n_outputs, self.batch = int(n_outputs), int(batch)
        self.labels = len(Y.shape) == 1 and loss == "cross_entropy"
        self.rank, self.size = share if share is not None else (0, 1)
        self.n_batches = -(-self.n // self.batch)
        local_max = -(-self.batch // self.size)  # the most rows any rank holds of one batch
        row_bytes = (self.n_features + self.n_outputs) * self.dtype.itemsize
        budget = _chunk_rows(row_bytes, DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes))
        self.batches_per_chunk = max(1, min(self.n_batches, budget // local_max))
        self.n_chunks = -(-self.n_batches // self.batches_per_chunk)
        self.prefetch = (self.n_chunks > 1 and DEFAULT_PREFETCH) if prefetch is None else bool(prefetch)
        rows = self.batches_per_chunk * local_max
        n_buffers = 2 if self.prefetch else 1
        self._out = [(np.empty((rows, self.n_features), self.dtype), np.empty((rows, self.n_outputs), self.dtype))
                     for _ in range(n_buffers)]
        yshape = (rows,) if len(Y.shape) == 1 else (rows, self.n_outputs)
        self._tmp = (np.empty((rows, self.n_features), X.dtype), np.empty(yshape, Y.dtype))
        # the sorted read cast to the model dtype, when the source's differs (take() cannot cast)
        self._cast = (None if X.dtype == self.dtype else np.empty((rows, self.n_features), self.dtype),
                      None if Y.dtype == self.dtype or len(Y.shape) == 1 else np.empty(yshape, self.dtype))
        self._device = None
        if backend.xp is not np:  # one device buffer pair, refilled per chunk (stream-ordered)
            self._device = (backend.empty((rows, self.n_features), self.dtype),
                            backend.empty((rows, self.n_outputs), self.dtype))

    # ------------------------------------------------------------ layout
    def _plan(self, c: int, order: np.ndarray | None):
        """This rank's source rows for chunk ``c`` (in batch order) and each batch's bounds."""
        b0 = c * self.batches_per_chunk
        b1 = min(b0 + self.batches_per_chunk, self.n_batches)
        pieces, bounds, sizes, pos = [], [], [], 0
        B, last = self.batch, self.n - (self.n_batches - 1) * self.batch
        full = b1 - b0 if b1 < self.n_batches or last == B else b1 - b0 - 1
        if full:
            lo, hi = _share(B, self.rank, self.size)
            start = b0 * B
            if order is None:
                grid = np.arange(start, start + full * B, dtype=np.int64).reshape(full, B)
            else:
                grid = order[start:start + full * B].reshape(full, B)
            pieces.append(grid[:, lo:hi].ravel())
            for _ in range(full):
                bounds.append((pos, pos + hi - lo))
                sizes.append(B)
                pos += hi - lo
        if full < b1 - b0:  # the epoch's shorter last batch
            lo, hi = _share(last, self.rank, self.size)
            start = (self.n_batches - 1) * B
            seg = np.arange(start + lo, start + hi, dtype=np.int64) if order is None else order[start + lo:start + hi]
            pieces.append(np.asarray(seg, dtype=np.int64))
            bounds.append((pos, pos + hi - lo))
            sizes.append(last)
            pos += hi - lo
        index = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return index, bounds, sizes, b0

    def _fill(self, c: int, order, buffers):
        """Read chunk ``c`` into ``buffers`` (host, model dtype, batch order)."""
        index, bounds, sizes, b0 = self._plan(c, order)
        m = index.size
        out_x, out_y = buffers[0][:m], buffers[1][:m]
        tmp_x, tmp_y = self._tmp[0][:m], self._tmp[1][:m]
        if m:
            inverse = None  # batch row i is row inverse[i] of the sorted read (None: the same row)
            if order is not None:
                where = np.argsort(index)
                index = index[where]
                inverse = np.empty_like(where)
                inverse[where] = np.arange(m)
            _read(self.X, index, tmp_x)
            _read(self.Y, index, tmp_y)
            # a gather (take), not a scatter: NumPy's fancy-index assignment measured ~10x slower
            _reorder(tmp_x, inverse, out_x, None if self._cast[0] is None else self._cast[0][:m])
            if self.labels:
                out_y.fill(0)
                out_y[np.arange(m), (tmp_y if inverse is None else tmp_y[inverse]).astype(np.intp)] = 1
            elif tmp_y.ndim == 1:
                out_y[:, 0] = tmp_y if inverse is None else tmp_y[inverse]
            else:
                _reorder(tmp_y, inverse, out_y, None if self._cast[1] is None else self._cast[1][:m])
        return out_x, out_y, bounds, sizes, b0

    def _to_backend(self, filled) -> Chunk:
        out_x, out_y, bounds, sizes, b0 = filled
        if self._device is not None:
            m = out_x.shape[0]
            dx, dy = self._device[0][:m], self._device[1][:m]
            dx.set(out_x)
            dy.set(out_y)
            out_x, out_y = dx, dy
        return Chunk(out_x, out_y, bounds, sizes, b0)

    # ------------------------------------------------------------ iteration
    def epoch(self, order: np.ndarray | None) -> Iterator[Chunk]:
        """The chunks of one epoch over the permutation ``order`` (None: rows in order).

        With prefetch, chunk ``c + 1`` is read while the caller trains on chunk ``c``; a
        chunk's arrays are reused once the next one is asked for.
        """
        if order is not None:
            order = np.asarray(order, dtype=np.int64)
        if not self.prefetch:
            for c in range(self.n_chunks):
                yield self._to_backend(self._fill(c, order, self._out[0]))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastbp-prefetch") as pool:
            pending = pool.submit(self._fill, 0, order, self._out[0])
            try:
                for c in range(self.n_chunks):
                    filled = pending.result()
                    pending = None
                    if c + 1 < self.n_chunks:
                        pending = pool.submit(self._fill, c + 1, order, self._out[(c + 1) % 2])
                    yield self._to_backend(filled)
            finally:
                if pending is not None:  # the caller stopped early (divergence, an error)
                    pending.cancel() or pending.exception()


def train_epoch(net, stream: BatchStream, order, rule, state, strategy: str, count: bool, coll=None):
    """One epoch of ``net`` over ``stream``; returns ``(loss_sum, n_done, n_correct)`` as
    :meth:`Backend.train_epoch` does (``n_done`` short of ``n`` when a batch's cost was not
    finite; that batch's update is not applied).

    Single-process, a chunk of whole batches goes to the backend's compiled epoch where it has
    one; under MPI (``coll``) each batch is composed -- this rank's gradient, the weighted
    allreduce, then the same ``backend.update`` on every rank with the global batch's rows.
    """
    be, spec = net.backend, net.spec
    compiled = coll is None and be.has_compiled_epoch and be.supports_epoch(spec, stream.batch, strategy, rule)
    check_each = coll is not None or not be.is_gpu  # a GPU loss read back every batch would stall it
    total, done, correct = 0.0, 0, 0
    for chunk in stream.epoch(order):
        if compiled:
            loss_sum, n_done, n_correct = be.train_epoch(spec, net._params, net._grads, chunk.X, chunk.Y,
                                                         stream.batch, rule, state, strategy)
            total, done, correct = total + loss_sum, done + n_done, correct + n_correct
            if n_done < chunk.X.shape[0]:
                return total, done, correct
            continue
        for (lo, hi), rows in zip(chunk.bounds, chunk.sizes):
            if hi > lo:
                loss, n_correct = net._gradients_into(chunk.X[lo:hi], chunk.Y[lo:hi], strategy, count=count)
            else:  # a last batch with fewer rows than ranks: this rank adds nothing
                loss, n_correct = 0.0, 0
            if coll is not None:
                loss, n_correct = coll.allreduce_gradients(net._grads, hi - lo, rows, loss, n_correct)
            if check_each and not math.isfinite(loss):
                return total, done, correct
            be.update(spec, rule, net._params, net._grads, state, rows)
            total, done, correct = total + loss, done + rows, correct + n_correct
    return total, done, correct
