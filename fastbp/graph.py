"""A computation graph with reverse-mode automatic differentiation, on any backend.

The seeds explain backpropagation on a graph: nodes hold values, each node computes
and stores its *local* gradients during the forward pass, and the backward pass
multiplies them along the edges (the chain rule)::

    >>> from fastbp import graph
    >>> x, y, z = graph.Tensor(-2.0), graph.Tensor(5.0), graph.Tensor(-4.0)
    >>> q = x + y                      # q.data == 3.0, q.local_grads == (1.0, 1.0)
    >>> f = q * z                      # f.data == -12.0, f.local_grads == (-4.0, 3.0)
    >>> f.backward()
    >>> x.grad, y.grad, z.grad, q.grad
    (-4.0, -4.0, 3.0, -4.0)

Scalar nodes hold Python floats and keep their local derivatives as floats in
``.local_grads`` (one per parent, in order); the backward pass multiplies the
gradient arriving at a node by each of them, exactly as on paper. Array nodes hold
arrays of the backend that was active when their leaves were made, and every array
operation goes through that backend's kernels (``fastbp.kernels.base``): matmuls are
its GEMM (``Backend.matmul``, transposes by flag, so ``X @ W.T`` copies nothing),
activations and their derivatives its ``activation`` / ``activation_backward``,
losses its fused ``output_delta`` (computed from the logits, like the MLP), the bias
reduction its ``bias_grad``; the remaining elementwise arithmetic uses the backend's
array module (NumPy or CuPy). So a graph runs on numpy, numba and cupy alike.

Each operation below has its forward and its local gradients side by side
(micrograd's habit). Array local gradients are what the backward pass multiplies
by: an array or float multiplied elementwise (``*``, ``exp``, the activations,
the losses), the other operand transposed for ``@`` (``dL/da = g @ b.T``), the
output for ``softmax`` (its vector-Jacobian product is ``a (g - <a, g>)``).

:func:`mlp_loss` writes an :class:`fastbp.MLP`'s forward pass in graph ops and
:func:`mlp_gradients` returns its gradients, the same numbers as ``net.gradients``:
one algorithm, three strategies (graph, fused batch, per-example loop).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import _validate as check
from .backend import array_module_name, get_backend
from .kernels.base import LEAKY_SLOPE

_state = threading.local()  # no_grad nesting depth, per thread


def _recording() -> bool:
    return not getattr(_state, "no_grad", 0)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this context (or a function it decorates) operations record nothing.

    Results have no parents, ``requires_grad`` False and no local gradients, and
    no local gradient is computed: the forward pass alone, for evaluation.
    """
    _state.no_grad = getattr(_state, "no_grad", 0) + 1
    try:
        yield
    finally:
        _state.no_grad -= 1


class Tensor:
    """A node of the computation graph: a value, its parents, its local gradients, its gradient.

    Parameters
    ----------
    data : Python number, or array of any backend (NumPy, CuPy, nested lists)
        A number makes a scalar node whose ``.data`` is a Python float. An array is
        moved to the active backend (``fb.get_backend()``); float32 and float64 keep
        their dtype, integers and booleans become float64. NaN, Inf and empty
        arrays are rejected.
    name : str or None
        A label for :func:`to_dot` (writable later: ``q.name = "q"``).
    requires_grad : bool
        Whether ``backward()`` computes this leaf's gradient (and the gradients
        of what depends on it). False for inputs and targets, which saves their
        part of the backward pass (an MLP's ``dL/dX``, for instance).

    Attributes
    ----------
    data : float or backend array
    grad : float, backend array or None
        ``dL/d(this node)`` after ``L.backward()``, shaped like ``data``; None
        before, and after :meth:`zero_grad`. Repeated ``backward()`` calls add up.
    op : str
        The operation that made the node ("" for a leaf).
    parents : tuple of Tensor
    local_grads : tuple
        One per parent: ``d(this node)/d(parent)``, stored at forward time.
    backend : Backend or None
        The backend of an array node; None for a Python-float scalar.

    Operators ``+ - * / ** @``, unary ``-``, ``.T``, :meth:`sum` and :meth:`mean`
    follow NumPy broadcasting, and each operand's gradient is reduced back to its
    shape. Python numbers and plain arrays mix with Tensors as constants (a plain
    array joins the Tensor's backend and dtype).
    """

    __slots__ = ("data", "grad", "name", "op", "parents", "local_grads", "requires_grad", "backend",
                 "_vjp", "__weakref__")
    # NumPy/CuPy arrays defer to our reflected operators (ndarray + Tensor -> Tensor.__radd__).
    __array_ufunc__ = None
    __array_priority__ = 1000

    def __init__(self, data, name: str | None = None, *, requires_grad: bool = True) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None. Received: name={name!r} ({type(name).__name__})")
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be a bool. Received: requires_grad={requires_grad!r} "
                            f"({type(requires_grad).__name__})")
        value, backend = _leaf_value(data)
        _init(self, value, backend, "", (), (), None, requires_grad, name)

    # ------------------------------------------------------------ description
    @property
    def shape(self) -> tuple[int, ...]:
        return () if type(self.data) is float else tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        return 0 if type(self.data) is float else self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float64) if type(self.data) is float else np.dtype(self.data.dtype)

    def numpy(self) -> np.ndarray:
        """A NumPy copy of ``data`` (0-d for a scalar)."""
        if type(self.data) is float:
            return np.array(self.data)
        if array_module_name(self.data) == "cupy":
            return self.backend.to_numpy(self.data)  # a device-to-host copy already
        return np.array(self.data, copy=True)

    def item(self) -> float:
        """The value of a one-element node as a Python float (a device sync on a GPU)."""
        if type(self.data) is float:
            return self.data
        if self.data.size != 1:
            raise ValueError(f"item() needs a one-element Tensor. Received: shape {self.shape}")
        return float(self.backend.to_numpy(self.data).reshape(()))

    __float__ = item

    def __repr__(self) -> str:
        label = f", name={self.name!r}" if self.name else ""
        op = f", op={self.op!r}" if self.op else ""
        if type(self.data) is float:
            grad = "" if self.grad is None else f", grad={self.grad!r}"
            return f"Tensor({self.data!r}{label}{op}{grad})"
        return (f"Tensor(shape={self.shape}, dtype={self.dtype.name}, backend={self.backend.name!r}"
                f"{label}{op}, grad={'None' if self.grad is None else 'set'})")

    # ------------------------------------------------------------ arithmetic: forward beside local grads
    def __add__(self, other):
        a, b, be = _operands(self, other, "+")
        return _node(a.data + b.data, be, "+", (a, b), lambda: (1.0, 1.0))

    def __radd__(self, other):
        a, b, be = _operands(other, self, "+")
        return _node(a.data + b.data, be, "+", (a, b), lambda: (1.0, 1.0))

    def __sub__(self, other):
        a, b, be = _operands(self, other, "-")
        return _node(a.data - b.data, be, "-", (a, b), lambda: (1.0, -1.0))

    def __rsub__(self, other):
        a, b, be = _operands(other, self, "-")
        return _node(a.data - b.data, be, "-", (a, b), lambda: (1.0, -1.0))

    def __neg__(self):
        return _node(-self.data, self.backend, "neg", (self,), lambda: (-1.0,))

    def __mul__(self, other):
        return _mul(*_operands(self, other, "*"))

    def __rmul__(self, other):
        return _mul(*_operands(other, self, "*"))

    def __truediv__(self, other):
        return _div(*_operands(self, other, "/"))

    def __rtruediv__(self, other):
        return _div(*_operands(other, self, "/"))

    def __pow__(self, other):
        return _pow(*_operands(self, other, "**"))

    def __rpow__(self, other):
        return _pow(*_operands(other, self, "**"))

    def __matmul__(self, other):
        return _matmul(*_operands(self, other, "@", broadcast=False))

    def __rmatmul__(self, other):
        return _matmul(*_operands(other, self, "@", broadcast=False))

    @property
    def T(self) -> "Tensor":
        """The transpose (axes reversed; a scalar or 1-D Tensor is its own transpose)."""
        if type(self.data) is float or self.data.ndim < 2:
            return _node(self.data, self.backend, "T", (self,), lambda: (1.0,))
        return _node(self.data.T, self.backend, "T", (self,), lambda: (1.0,), vjp=lambda g: (g.T,))

    def sum(self, axis=None, keepdims: bool = False) -> "Tensor":
        """Sum over ``axis`` (None: all; an int or a tuple of ints); local gradient 1."""
        return _reduce(self, "sum", axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        """Mean over ``axis`` (None: all); local gradient ``1 / count``."""
        return _reduce(self, "mean", axis, keepdims)

    # ------------------------------------------------------------ backward
    def backward(self) -> None:
        """Backpropagate from this scalar node: every node it depends on gets ``.grad``.

        Nodes are visited in reverse topological order (found iteratively, so a chain of
        any depth works); each multiplies the gradient that reached it by its local
        gradients and passes the products to its parents, where a node used twice adds
        both. Gradients add up over repeated calls; :meth:`zero_grad` clears them.
        """
        if self.shape != ():
            raise ValueError(f"backward() needs a scalar node, such as a loss. Received: a Tensor of shape "
                             f"{self.shape}. Expected shape (): reduce it first, e.g. t.sum() or t.mean()")
        if not self.requires_grad:
            raise ValueError("backward() on a node that depends on nothing requiring grad. Received: a node "
                             "made from constants only or under graph.no_grad(). Expected a node built from "
                             "Tensors with requires_grad=True")
        order = _topological(self)
        seed = 1.0 if type(self.data) is float else self.backend.xp.ones((), dtype=self.data.dtype)
        # This pass's gradient per node, and whether the array is ours (safe to add into in place)
        # or another node's gradient passed through unchanged (a sum's factor 1): copied before
        # it is stored, so no two nodes' .grad share memory.
        pending: dict[Tensor, tuple] = {self: (seed, True)}
        for node in reversed(order):
            entry = pending.pop(node, None)
            if entry is None:
                continue
            g, owned = entry
            if not owned:
                g = g.copy()
            node.grad = g if node.grad is None else node.grad + g
            if not node.parents:
                continue
            grads = node._vjp(g) if node._vjp is not None else _chain(node, g)
            for parent, gp in zip(node.parents, grads):
                if gp is None or not parent.requires_grad:
                    continue
                gp = _fit(gp, parent)
                prev = pending.get(parent)
                if prev is None:
                    pending[parent] = (gp, not _aliases(gp, g, node.backend))
                elif prev[1] and type(prev[0]) is not float:
                    prev[0].__iadd__(gp)  # ours alone: accumulate in place
                else:
                    pending[parent] = (prev[0] + gp, True)

    def zero_grad(self) -> None:
        """Clear (set to None) the gradient of this node and of every node it depends on."""
        for node in _all_nodes(self):
            node.grad = None


# ---------------------------------------------------------------- node plumbing


def _init(t, data, backend, op, parents, local_grads, vjp, requires_grad, name=None):
    t.data, t.backend, t.op, t.parents = data, backend, op, parents
    t.local_grads, t._vjp, t.requires_grad, t.name, t.grad = local_grads, vjp, requires_grad, name, None
    return t


def _as_array(x, backend):
    """NumPy turns 0-d results into NumPy scalars; an array node keeps 0-d arrays."""
    if backend is not None and isinstance(x, np.generic):
        return backend.xp.asarray(x)
    return x


def _node(data, backend, op, parents, local_fn, vjp=None) -> Tensor:
    """A result node; its local gradients are computed only when something will need them."""
    data = _as_array(data, backend)
    t = Tensor.__new__(Tensor)
    if _recording() and any(p.requires_grad for p in parents):
        local = tuple(_as_array(l, backend) for l in local_fn())
        return _init(t, data, backend, op, parents, local, vjp, True)
    return _init(t, data, backend, op, (), (), None, False)


def _leaf_value(data):
    """``(value, backend)`` for a new leaf: a float and None, or an array on the active backend."""
    if isinstance(data, Tensor):
        raise TypeError("data is already a Tensor. Received: a Tensor. Expected a Python number or an array "
                        "(pass t.data for a new leaf with the same values)")
    if isinstance(data, numbers.Real) and not hasattr(data, "ndim"):
        value = float(data)
        if not math.isfinite(value):
            raise ValueError(f"data contains NaN or Inf. Received: data={value!r}. Expected a finite number")
        return value, None
    if isinstance(data, np.generic):  # a NumPy scalar such as np.float32(1.5)
        return _leaf_value(float(data)) if data.dtype.kind in "biuf" else _leaf_value(np.asarray(data))
    backend = get_backend()
    arr = check.numeric_array("data", data)
    dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return _on_backend(backend, arr, dtype), backend


def _on_backend(backend, arr, dtype):
    """``arr`` on ``backend`` in ``dtype``, its shape kept (``asarray`` makes 0-d arrays 1-D)."""
    return backend.asarray(arr, dtype).reshape(arr.shape)


def _leaf(data, backend, name=None, requires_grad=True) -> Tensor:
    """A leaf around an array already validated and on ``backend`` (no copy)."""
    return _init(Tensor.__new__(Tensor), data, backend, "", (), (), None, requires_grad, name)


def _lift(x, like, op: str) -> Tensor:
    """``x`` as a Tensor: Tensors as they are, numbers and plain arrays as constants."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Real) and not hasattr(x, "ndim"):
        return _leaf(float(x), None, requires_grad=False)
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return _leaf(float(x), None, requires_grad=False)
    if array_module_name(x) is not None or isinstance(x, (list, tuple)):
        backend = like.backend if like is not None and like.backend is not None else get_backend()
        arr = check.numeric_array(f"the operand of {op!r}", x)
        if like is not None and type(like.data) is not float:
            dtype = like.data.dtype
        else:
            dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        return _leaf(_on_backend(backend, arr, dtype), backend, requires_grad=False)
    raise TypeError(f"{op}: cannot combine a Tensor with {type(x).__name__}. Received: {x!r:.80}. "
                    "Expected a Tensor, a Python number or an array")


def _operands(x, y, op: str, broadcast: bool = True):
    """The two operands as Tensors, their common backend, and a check that their shapes combine."""
    like = x if isinstance(x, Tensor) else y
    a, b = _lift(x, like, op), _lift(y, like, op)
    ba, bb = a.backend, b.backend
    if ba is not None and bb is not None and ba is not bb:
        raise ValueError(f"{op}: the operands live on different backends. Received: {ba.name!r} and {bb.name!r}. "
                         "Expected Tensors made under one backend (build them inside one fb.use_backend(...))")
    be = ba if ba is not None else bb
    if broadcast and be is not None:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together. Expected "
                             "NumPy-broadcastable shapes (in each trailing dimension equal sizes, or 1)") from None
    return a, b, be


def _unary(x, op: str) -> Tensor:
    return x if isinstance(x, Tensor) else _lift(x, None, op)


def _walk(root: Tensor, parents) -> list[Tensor]:
    """The nodes ``parents(node)`` leads to from ``root``, parents before children (iterative DFS,
    so a 100k-node chain needs no recursion)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((p, False) for p in parents(node) if p not in seen)
    return order


def _topological(root: Tensor) -> list[Tensor]:
    """Nodes ``root`` depends on through ``requires_grad`` parents, parents first."""
    return _walk(root, lambda node: [p for p in node.parents if p.requires_grad])


def _all_nodes(root: Tensor) -> list[Tensor]:
    """Every node reachable from ``root`` (constants included), parents first."""
    return _walk(root, lambda node: reversed(node.parents))  # first parent drawn first


def _chain(node: Tensor, g):
    """The chain rule for a node whose local gradients multiply elementwise: ``g * local``."""
    be = node.backend
    return tuple(None if l is None or not p.requires_grad else _times(g, l, be)
                 for p, l in zip(node.parents, node.local_grads))


def _times(g, local, be):
    if type(local) is float:
        return g if local == 1.0 else (-g if local == -1.0 else g * local)
    if type(g) is not float and g.shape == local.shape and g.dtype == local.dtype:
        out = be.empty(g.shape, g.dtype)
        be.hadamard(_rows(g), _rows(local), _rows(out))
        return out
    return g * local


def _fit(gp, parent: Tensor):
    """A gradient reduced to its parent's shape (NumPy broadcasting undone) and dtype."""
    if type(parent.data) is float:
        return gp if type(gp) is float else gp.sum().item()  # a scalar parent of an array node
    shape, dtype = parent.data.shape, parent.data.dtype
    if type(gp) is float:
        return parent.backend.xp.full(shape, gp, dtype=dtype)
    if gp.shape != shape:
        gp = _unbroadcast(gp, shape, parent.backend)
    if gp.dtype != dtype:
        gp = gp.astype(dtype)
    return gp


def _unbroadcast(g, shape, be):
    """Sum ``g`` over the axes broadcasting added or stretched, back to ``shape``."""
    if g.ndim == 2 and len(shape) == 1 and shape[0] == g.shape[1]:  # a bias: the kernel's row sum
        out = be.empty(shape, g.dtype)
        be.bias_grad(g, out)
        return out
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _aliases(gp, g, be) -> bool:
    """Whether ``gp`` may share memory with ``g`` (passed through, not computed); a bounds check."""
    if type(gp) is float or type(g) is float:
        return False
    return gp is g or bool(be.xp.may_share_memory(gp, g))


def _rows(a):
    """A 2-D view for the row-major kernels (which are compiled for 2-D batches)."""
    if a.ndim == 2:
        return a
    return a.reshape(1, -1) if a.ndim < 2 else a.reshape(-1, a.shape[-1])


# ---------------------------------------------------------------- scalar math with IEEE results
# Python raises on 1/0, 0**-1 and exp overflow, where arrays give inf/nan; scalars follow arrays.


def _fdiv(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        return float(np.float64(a) / np.float64(b))


def _fpow(a: float, b: float) -> float:
    try:
        r = a ** b
    except (ZeroDivisionError, OverflowError):
        return float(np.power(np.float64(a), np.float64(b)))
    return float(np.power(np.float64(a), np.float64(b))) if type(r) is complex else float(r)


def _fexp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _flog(x: float) -> float:
    if x > 0:
        return math.log(x)
    return -math.inf if x == 0 else math.nan


def _fsigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _fsoftplus(z: float) -> float:
    """log(1 + e^z) without overflow or cancellation."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _log_any(x, xp):
    return _flog(x) if type(x) is float else xp.log(x)


def _div_any(a, b):
    return _fdiv(a, b) if type(a) is float and type(b) is float else a / b


# ---------------------------------------------------------------- binary operations


def _mul(a: Tensor, b: Tensor, be) -> Tensor:  # d(ab)/da = b, d(ab)/db = a
    if (be is not None and type(a.data) is not float and type(b.data) is not float
            and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype):  # the Hadamard kernel
        out = be.empty(a.data.shape, a.data.dtype)
        be.hadamard(_rows(a.data), _rows(b.data), _rows(out))
    else:
        out = a.data * b.data
    return _node(out, be, "*", (a, b), lambda: (b.data, a.data))


def _div(a: Tensor, b: Tensor, be) -> Tensor:  # d(a/b)/da = 1/b, d(a/b)/db = -(a/b)/b
    out = _div_any(a.data, b.data)
    scalar = be is None
    return _node(out, be, "/", (a, b), lambda: (
        _div_any(1.0, b.data) if scalar or a.requires_grad else None,
        _div_any(-out, b.data) if scalar or b.requires_grad else None))


def _pow(a: Tensor, b: Tensor, be) -> Tensor:  # d(a^b)/da = b a^(b-1), d(a^b)/db = a^b log a
    if be is None:
        out = _fpow(a.data, b.data)
        return _node(out, None, "**", (a, b), lambda: (
            b.data * _fpow(a.data, b.data - 1.0),
            0.0 if a.data == 0 and b.data >= 0 else out * _flog(a.data)))
    xp = be.xp
    out = a.data ** b.data

    def local():
        da = b.data * a.data ** (b.data - 1.0) if a.requires_grad else None
        db = None
        if b.requires_grad:  # 0 where a == 0 and b >= 0 (the limit), NaN where a < 0 (as torch)
            db = out * _log_any(a.data, xp)
            db = xp.where((a.data == 0) & (b.data >= 0), 0.0, db).astype(out.dtype)
        return da, db

    return _node(out, be, "**", (a, b), local)


def _matmul(a: Tensor, b: Tensor, be) -> Tensor:  # d(ab)/da: g @ b.T, d(ab)/db: a.T @ g
    sa, sb = a.shape, b.shape
    if be is None or len(sa) not in (1, 2) or len(sb) not in (1, 2):
        raise ValueError(f"@: expected 1-D or 2-D array operands. Received: shapes {sa} and {sb}")
    if sa[-1] != sb[0]:
        raise ValueError(f"@: shapes {sa} and {sb} are not aligned. Expected the left operand's last dimension "
                         f"({sa[-1]}) to equal the right operand's first ({sb[0]})")
    dtype = np.result_type(a.data.dtype, b.data.dtype)
    A = a.data.reshape(1, -1) if len(sa) == 1 else a.data  # 1-D operands as one row / one column
    B = b.data.reshape(-1, 1) if len(sb) == 1 else b.data
    A, B = A.astype(dtype, copy=False), B.astype(dtype, copy=False)
    m, n = A.shape[0], B.shape[1]
    out = _gemm(be, A, B, False, False)
    out = out.reshape(sa[:-1] + sb[1:])

    def vjp(g):
        g2 = g.reshape(m, n)
        da = _gemm(be, g2, B, False, True, like=a.data).reshape(sa) if a.requires_grad else None
        db = _gemm(be, A, g2, True, False, like=b.data).reshape(sb) if b.requires_grad else None
        return da, db

    return _node(out, be, "@", (a, b), lambda: (B.T if a.requires_grad else None,
                                                A.T if b.requires_grad else None), vjp)


def _gemm(be, x, y, tx: bool, ty: bool, like=None):
    """``op(x) @ op(y)`` in a new array, by the backend's GEMM.

    Laid out like ``like`` (Fortran order when ``like`` is a transposed view), so the
    gradient of ``W.T`` comes back as the transpose of a C-ordered array: ``W``'s own layout.
    """
    m = x.shape[1] if tx else x.shape[0]
    n = y.shape[0] if ty else y.shape[1]
    if like is not None and like.ndim == 2 and like.flags.f_contiguous and not like.flags.c_contiguous:
        out = be.empty((n, m), x.dtype)  # (op(x) op(y))^T = op(y)^T op(x)^T
        be.matmul(y, x, out, trans_a=not ty, trans_b=not tx)
        return out.T
    out = be.empty((m, n), x.dtype)
    be.matmul(x, y, out, trans_a=tx, trans_b=ty)
    return out


# ---------------------------------------------------------------- reductions


def _axes(op: str, axis, shape) -> tuple[int, ...] | None:
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple) else (axis,)
    ndim, out = len(shape), []
    for ax in items:
        if isinstance(ax, bool) or not isinstance(ax, numbers.Integral):
            raise TypeError(f"{op}: axis must be None, an int or a tuple of ints. Received: axis={axis!r}")
        if not -ndim <= ax < ndim:
            raise ValueError(f"{op}: axis {ax} is out of range for a Tensor of shape {shape}. Received: "
                             f"axis={axis!r}. Expected ints in [{-ndim}, {ndim})")
        out.append(int(ax) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis. Received: axis={axis!r}. Expected distinct axes")
    return tuple(sorted(out))


def _reduce(x: Tensor, op: str, axis, keepdims: bool) -> Tensor:
    if not isinstance(keepdims, bool):
        raise TypeError(f"{op}: keepdims must be a bool. Received: keepdims={keepdims!r}")
    shape = x.shape
    axes = _axes(op, axis, shape)
    reduced = tuple(range(len(shape))) if axes is None else axes
    if not reduced:  # a scalar, or axis=(): nothing to reduce
        return _node(x.data, x.backend, op, (x,), lambda: (1.0,))
    count = math.prod(shape[i] for i in reduced)
    scale = 1.0 if op == "sum" else 1.0 / count
    be = x.backend
    out = x.data.sum(axis=axes, keepdims=keepdims)
    if scale != 1.0:
        out = out * scale
    kept = tuple(1 if i in reduced else n for i, n in enumerate(shape))

    def vjp(g):  # every input element gets the output's gradient, times 1 or 1/count
        spread = be.xp.broadcast_to(g.reshape(kept), shape)
        return (spread * scale if scale != 1.0 else spread.copy(),)

    return _node(out, be, op, (x,), lambda: (scale,), vjp)


# ---------------------------------------------------------------- elementwise functions


def exp(x) -> Tensor:
    """``e^x``; local gradient ``e^x`` (the output itself)."""
    x = _unary(x, "exp")
    out = _fexp(x.data) if x.backend is None else x.backend.xp.exp(x.data)
    return _node(out, x.backend, "exp", (x,), lambda: (out,))


def log(x) -> Tensor:
    """Natural log; local gradient ``1 / x``. log(0) = -inf and log(x < 0) = nan, as NumPy."""
    x = _unary(x, "log")
    if x.backend is None:
        return _node(_flog(x.data), None, "log", (x,), lambda: (_fdiv(1.0, x.data),))
    return _node(x.backend.xp.log(x.data), x.backend, "log", (x,), lambda: (1.0 / x.data,))


def _scalar_sigmoid(z):
    s = _fsigmoid(z)
    return s, s * (1.0 - s)


def _scalar_tanh(z):
    t = math.tanh(z)
    return t, 1.0 - t * t


def _scalar_relu(z):
    return (z, 1.0) if z > 0 else (0.0, 0.0)


def _scalar_leaky_relu(z):
    return (z, 1.0) if z > 0 else (LEAKY_SLOPE * z, LEAKY_SLOPE)


def _activation(name: str, x, scalar_fn) -> Tensor:
    """An elementwise activation: the backend's forward kernel, and phi'(z) from its derivative kernel."""
    x = _unary(x, name)
    if x.backend is None:
        value, slope = scalar_fn(x.data)
        return _node(value, None, name, (x,), lambda: (slope,))
    be, z = x.backend, x.data
    a = be.empty(z.shape, z.dtype)
    be.activation(name, _rows(z), _rows(a))

    def local():  # phi'(z) = activation_backward applied to ones
        d = be.xp.ones(z.shape, dtype=z.dtype)
        be.activation_backward(name, _rows(z), _rows(a), _rows(d))
        return (d,)

    return _node(a, be, name, (x,), local)


def sigmoid(x) -> Tensor:
    """``1 / (1 + e^-x)``; local gradient ``a (1 - a)``."""
    return _activation("sigmoid", x, _scalar_sigmoid)


def tanh(x) -> Tensor:
    """``tanh x``; local gradient ``1 - a^2``."""
    return _activation("tanh", x, _scalar_tanh)


def relu(x) -> Tensor:
    """``max(x, 0)``; local gradient 1 where ``x > 0``, else 0."""
    return _activation("relu", x, _scalar_relu)


def leaky_relu(x) -> Tensor:
    """``x`` where ``x > 0``, else ``0.01 x``; local gradient 1 or 0.01."""
    return _activation("leaky_relu", x, _scalar_leaky_relu)


def _last_axis(x: Tensor, op: str) -> None:
    if x.ndim == 0:
        raise ValueError(f"{op}: needs an array with a last axis (the classes). Received: a scalar "
                         f"Tensor. Expected shape (k,) or (n, k)")


def softmax(x) -> Tensor:
    """``e^x / sum e^x`` along the last axis (the backend's row kernel).

    Local gradient: the Jacobian ``diag(a) - a a^T``, applied as ``a (g - <a, g>)`` by the
    backend's ``activation_backward``; ``.local_grads`` holds ``a``.
    """
    x = _unary(x, "softmax")
    _last_axis(x, "softmax")
    be, z = x.backend, x.data
    rows = z.reshape(-1, z.shape[-1])
    a = be.empty(rows.shape, z.dtype)
    be.activation("softmax", rows, a)

    def vjp(g):
        d = g.reshape(rows.shape).copy()
        be.activation_backward("softmax", rows, a, d)
        return (d.reshape(z.shape),)

    return _node(a.reshape(z.shape), be, "softmax", (x,), lambda: (a.reshape(z.shape),), vjp)


def log_softmax(x) -> Tensor:
    """``x - logsumexp(x)`` along the last axis, shifted by the row maximum (no overflow).

    Local gradient: ``I - softmax(x)`` per row, applied as ``g - softmax(x) sum(g)``;
    ``.local_grads`` holds ``softmax(x)``.
    """
    x = _unary(x, "log_softmax")
    _last_axis(x, "log_softmax")
    xp, z = x.backend.xp, x.data
    shifted = z - z.max(axis=-1, keepdims=True)
    out = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))

    def vjp(g):
        return (g - xp.exp(out) * g.sum(axis=-1, keepdims=True),)

    return _node(out, x.backend, "log_softmax", (x,), lambda: (xp.exp(out),), vjp)


def _clip(x: Tensor, lo: float, hi: float) -> Tensor:
    """``x`` clipped into ``[lo, hi]``; local gradient 1 inside, 0 where clipping bit
    (the MLP's log/cross-entropy on a non-logit output reads such a clipped activation)."""
    xp, z = x.backend.xp, x.data
    out = xp.clip(z, lo, hi)
    return _node(out, x.backend, "clip", (x,), lambda: ((out == z).astype(z.dtype),))


# ---------------------------------------------------------------- losses


_LOSS_OUTPUT = {"mse": "identity", "log_loss": "sigmoid", "cross_entropy": "softmax"}
_LOSS_ARG = {"mse": "outputs", "log_loss": "logits", "cross_entropy": "logits"}


def mse(outputs, Y) -> Tensor:
    """Mean over rows of ``1/2 sum_j (y_j - a_j)^2``; local gradient ``(a - y) / n``.

    Parameters
    ----------
    outputs : Tensor of shape (n_samples, n_outputs), (n_samples,) or a scalar
    Y : plain array of targets shaped like ``outputs`` (or a number for a scalar)
    """
    return _loss("mse", outputs, Y)


def log_loss(logits, Y) -> Tensor:
    """Mean over rows of ``-sum_j [y log s(z) + (1 - y) log(1 - s(z))]``, from the logits ``z``.

    Computed as ``(1 - y) softplus(z) + y softplus(-z)`` (no overflow, no cancellation) by
    the backend's fused output kernel, which also gives the local gradient ``(s(z) - y) / n``.

    Parameters
    ----------
    logits : Tensor of shape (n_samples, n_outputs), (n_samples,) or a scalar
    Y : plain array of 0/1 targets (or probabilities) shaped like ``logits``
    """
    return _loss("log_loss", logits, Y)


def cross_entropy(logits, Y) -> Tensor:
    """Mean over rows of ``-sum_j y_j log softmax(z)_j``, from the logits ``z``.

    Computed stably (shifted by the row maximum) by the backend's fused output kernel,
    which also gives the local gradient ``(softmax(z) sum(y) - y) / n``.

    Parameters
    ----------
    logits : Tensor of shape (n_samples, n_classes)
    Y : one-hot rows (or probabilities) of shape (n_samples, n_classes), or integer
        class labels of shape (n_samples,)
    """
    return _loss("cross_entropy", logits, Y)


def _loss(kind: str, x, Y, *, targets_checked: bool = False) -> Tensor:
    arg = _LOSS_ARG[kind]
    if not isinstance(x, Tensor):
        raise TypeError(f"{kind}: {arg} must be a Tensor. Received: {type(x).__name__}. "
                        f"Expected graph.Tensor (wrap an array with graph.Tensor(...))")
    if isinstance(Y, Tensor):
        if Y.requires_grad:
            raise TypeError(f"{kind}: Y must be plain targets. Received: a Tensor that requires grad. "
                            "Expected an array or number (pass Y.data)")
        Y = Y.data
    if x.backend is None:
        return _scalar_loss(kind, x, Y)
    be, z = x.backend, x.data
    if kind == "cross_entropy" and z.ndim != 2:
        raise ValueError(f"cross_entropy: logits must have shape (n_samples, n_classes). Received: shape "
                         f"{tuple(z.shape)}")
    if z.ndim not in (1, 2):
        raise ValueError(f"{kind}: {arg} must have shape (n_samples, n_outputs) or (n_samples,). Received: "
                         f"shape {tuple(z.shape)}")
    if not be.all_finite(z):
        raise ValueError(f"{kind}: {arg} contains NaN or Inf. Received: a Tensor of shape {tuple(z.shape)} with "
                         f"non-finite values. Expected finite {arg} (did the forward pass overflow?)")
    n = z.shape[0]
    z2 = z if z.ndim == 2 else z.reshape(n, 1)
    if targets_checked:
        y2 = Y
    else:
        y2 = check.targets("Y", Y, n_samples=n, n_outputs=z2.shape[1], loss=kind, dtype=z.dtype)
        y2 = be.asarray(y2, z.dtype)
    output = _LOSS_OUTPUT[kind]
    if output == "identity":
        a2 = z2
    else:
        a2 = be.empty(z2.shape, z.dtype)
        be.activation(output, z2, a2)
    track = _recording() and x.requires_grad
    if track:  # the fused kernel: dC/dz per row, and the summed cost, in one pass
        delta = be.empty(z2.shape, z.dtype)
        total = be.output_delta(kind, output, z2, a2, y2, delta)
        delta *= 1.0 / n
    else:
        total = be.loss_sum(kind, output, z2, a2, y2)
    value = be.xp.asarray(total / n, dtype=z.dtype)
    return _node(value, be, kind, (x,), lambda: (delta.reshape(z.shape),))


def _scalar_loss(kind: str, x: Tensor, Y) -> Tensor:
    """One example with one output: the same formulas in Python floats."""
    arg = _LOSS_ARG[kind]
    if kind == "cross_entropy":
        raise ValueError("cross_entropy: logits must have shape (n_samples, n_classes). Received: a scalar "
                         "Tensor. Expected at least two classes in a 2-D Tensor")
    if isinstance(Y, bool) or not isinstance(Y, numbers.Real):
        arr = check.numeric_array("Y", Y)
        if arr.size != 1:
            raise ValueError(f"{kind}: Y must be one target for a scalar {arg}. Received: shape {tuple(arr.shape)}")
        Y = float(arr.reshape(-1)[0])
    y, z = float(Y), x.data
    if not math.isfinite(y):
        raise ValueError(f"Y contains NaN or Inf. Received: Y={y!r}. Expected a finite target")
    if not math.isfinite(z):
        raise ValueError(f"{kind}: {arg} contains NaN or Inf. Received: {arg}={z!r}. Expected a finite value")
    if kind == "mse":
        d = z - y
        return _node(0.5 * d * d, None, "mse", (x,), lambda: (d,))
    if not 0.0 <= y <= 1.0:
        raise ValueError(f"Y out of range for log_loss. Received: Y={y!r}. Expected a target in [0, 1]")
    value = (1.0 - y) * _fsoftplus(z) + y * _fsoftplus(-z)
    return _node(value, None, "log_loss", (x,), lambda: (_fsigmoid(z) - y,))


# ---------------------------------------------------------------- an MLP in graph ops

_ACTIVATIONS: dict[str, Callable] = {"sigmoid": sigmoid, "relu": relu, "tanh": tanh, "leaky_relu": leaky_relu,
                                     "softmax": softmax, "identity": lambda t: t}


def mlp_loss(net, X, Y):
    """An :class:`fastbp.MLP`'s mean cost on ``X, Y``, written in graph ops.

    ``Z^l = A^(l-1) @ W^l.T + b^l``, ``A^l = phi(Z^l)``, then the net's loss: from the
    logits where the MLP computes it so (sigmoid + log_loss, softmax + cross_entropy),
    else on the clipped output activation, as the MLP does.

    Parameters
    ----------
    net : fastbp.MLP
    X : array of shape (n_samples, n_inputs)
    Y : targets as ``net.loss`` accepts them

    Returns
    -------
    (loss, weights, biases) : the scalar loss Tensor and the leaf Tensors of ``W^l``
        and ``b^l``, on ``net.backend``, sharing memory with ``net.weights`` and
        ``net.biases`` (no copy). ``X`` and ``Y`` are constants (no gradient).
    """
    from . import MLP

    if not isinstance(net, MLP):
        raise TypeError(f"net must be a fastbp MLP. Received: {type(net).__name__}")
    spec, be = net.spec, net.backend
    Xc = check.features("X", X, spec.sizes[0], spec.dtype)
    Yc = check.targets("Y", Y, n_samples=Xc.shape[0], n_outputs=spec.sizes[-1], loss=spec.loss, dtype=spec.dtype)
    Xd, Yd = be.asarray(Xc, spec.dtype), be.asarray(Yc, spec.dtype)
    weights = [_leaf(w, be, f"W{l + 1}") for l, w in enumerate(net.weights)]
    biases = [_leaf(b, be, f"b{l + 1}") for l, b in enumerate(net.biases)]
    a = _leaf(Xd, be, "X", requires_grad=False)
    last = spec.n_layers - 1
    for l in range(spec.n_layers):
        z = a @ weights[l].T + biases[l]
        if l < last:
            a = _ACTIVATIONS[spec.hidden](z)
    loss_name, output = spec.loss, spec.output
    if (loss_name, output) in (("log_loss", "sigmoid"), ("cross_entropy", "softmax")):
        loss = _loss(loss_name, z, Yd, targets_checked=True)
    elif loss_name == "mse":
        loss = _loss("mse", _ACTIVATIONS[output](z), Yd, targets_checked=True)
    else:  # another output: the cost of the clipped activation (flat, so no gradient, where clipping bit)
        eps = float(np.finfo(spec.dtype).eps)
        ac = _clip(_ACTIVATIONS[output](z), eps, 1.0 - eps)
        y = _leaf(Yd, be, "Y", requires_grad=False)
        per_element = y * log(ac) + (1.0 - y) * log(1.0 - ac) if loss_name == "log_loss" else y * log(ac)
        loss = per_element.sum() * (-1.0 / Xd.shape[0])
    loss.name = "loss"
    return loss, weights, biases


def mlp_gradients(net, X, Y):
    """``net.gradients(X, Y)`` by the computation graph: ``(dWs, dbs)`` of the mean cost.

    The same numbers as the fused batch pass (``strategy="vectorized"``) and the per-example
    loop, by a general reverse-mode graph (:func:`mlp_loss`, then ``backward()``); what
    ``fastbp bench`` times as the "graph" strategy.

    Returns
    -------
    dWs, dbs : lists of backend arrays shaped like ``net.weights`` and ``net.biases``
    """
    loss, weights, biases = mlp_loss(net, X, Y)
    loss.backward()
    return [w.grad for w in weights], [b.grad for b in biases]


# ---------------------------------------------------------------- pictures


def _fmt(v) -> str:
    return f"{v + 0.0:.6g}"  # + 0.0: no "-0"


def _summary(value, backend) -> str:
    """A number as itself; an array as its shape, dtype and first few numbers."""
    if value is None:
        return "none"
    if type(value) is float:
        return _fmt(value)
    if value.ndim == 0:
        return _fmt(float(backend.to_numpy(value)))
    head = backend.to_numpy(value.reshape(-1)[:3])
    numbers_ = ", ".join(_fmt(float(v)) for v in head) + (", ..." if value.size > 3 else "")
    return f"{tuple(value.shape)} {value.dtype} [{numbers_}]"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(root: Tensor) -> str:
    """Graphviz DOT of the graph behind ``root``.

    Every node shows its name and operation, its value and its gradient (arrays
    summarised by shape, dtype and a few numbers); every edge, from a parent to the
    node it feeds, shows that node's local gradient with respect to the parent
    (``dq/dx = 1`` when both are named). Constants are dashed.
    """
    if not isinstance(root, Tensor):
        raise TypeError(f"root must be a graph.Tensor. Received: {type(root).__name__}")
    nodes = _all_nodes(root)
    ids = {node: f"n{i}" for i, node in enumerate(nodes)}
    lines = ["digraph fastbp_graph {", "  rankdir=LR;",
             '  node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for node in nodes:
        title = node.name or ""
        if node.op:
            title = f"{title} = {node.op}" if title else node.op
        title = title or ("constant" if not node.requires_grad else "leaf")
        grad = "no grad" if not node.requires_grad and node.grad is None else f"grad {_summary(node.grad, node.backend)}"
        label = f"{title}\nvalue {_summary(node.data, node.backend)}\n{grad}"
        style = ', style="rounded,dashed"' if not node.requires_grad and not node.parents else ""
        lines.append(f'  {ids[node]} [label="{_dot_escape(label)}"{style}];')
    for node in nodes:
        for i, parent in enumerate(node.parents):
            local = node.local_grads[i] if i < len(node.local_grads) else None
            text = ""  # no local gradient: nothing flows back along this edge
            if local is not None:
                text = _summary(local, node.backend)
                if node.op == "@":  # matmul's local gradient multiplies from one side
                    text = f"g @ {text}" if i == 0 else f"{text} @ g"
                text = f"d{node.name}/d{parent.name} = {text}" if node.name and parent.name else f"local {text}"
            lines.append(f'  {ids[parent]} -> {ids[node]} [label="{_dot_escape(text)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


_DRAW_FORMATS = ("svg", "png", "pdf")
_GRAPHVIZ_HELP = ("graph.draw renders with the graphviz Python package and Graphviz's `dot` program, and {missing}. "
                  "Install both: pip install graphviz (the Python package; '.[graph]' in the fastbp checkout) and apt-get install graphviz "
                  "(Debian/Ubuntu; brew install graphviz on macOS, conda install graphviz in conda). "
                  "graph.to_dot(node) needs neither")


def draw(root: Tensor, path, *, format: str | None = None) -> Path:
    """Render :func:`to_dot` of ``root`` to ``path`` (SVG, PNG or PDF, from the suffix or ``format``).

    Needs the ``graphviz`` Python package (``pip install graphviz``) and Graphviz's
    ``dot`` program (Debian package ``graphviz``); raises ImportError naming both when either
    is missing, and writes nothing then. Returns the path written.
    """
    if not isinstance(root, Tensor):
        raise TypeError(f"root must be a graph.Tensor. Received: {type(root).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike. Received: {path!r} ({type(path).__name__})")
    path = Path(path)
    fmt = format if format is not None else path.suffix.lstrip(".").lower()
    if fmt not in _DRAW_FORMATS:
        raise ValueError(f"unsupported image format. Received: format={fmt!r} (path={str(path)!r}). Expected one "
                         f"of {list(_DRAW_FORMATS)}, from the path's suffix or format=")
    source = to_dot(root)
    try:
        import graphviz
    except ImportError as exc:
        raise ImportError(_GRAPHVIZ_HELP.format(missing="the Python package `graphviz` is not installed")) from exc
    try:
        image = graphviz.Source(source).pipe(format=fmt)
    except graphviz.ExecutableNotFound as exc:
        raise ImportError(_GRAPHVIZ_HELP.format(missing="Graphviz's `dot` program is not on PATH")) from exc
    path.write_bytes(image)
    return path


__all__ = ["Tensor", "no_grad", "exp", "log", "sigmoid", "relu", "tanh", "leaky_relu", "softmax", "log_softmax",
           "mse", "log_loss", "cross_entropy", "to_dot", "draw", "mlp_loss", "mlp_gradients"]
