"""fastbp.graph: the seeds' computation graph as reverse-mode autodiff on every backend.

Checked against the seed's numbers, central finite differences (fb.gradcheck on graph
functions), torch autograd when it is installed, plain NumPy forward values, and the
fused MLP backward pass (net.gradients), all in float64.
"""

import html
import importlib.util
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fastbp as fb
from conftest import BACKENDS, TOL, make_data
from fastbp import graph

# ---------------------------------------------------------------- the seed


def test_seed_example_exactly():
    x, y, z = graph.Tensor(-2.0), graph.Tensor(5.0), graph.Tensor(-4.0)
    q = x + y
    f = q * z
    assert q.data == 3.0 and f.data == -12.0
    assert q.local_grads == (1.0, 1.0)  # dq/dx, dq/dy, stored at forward time
    assert f.local_grads == (-4.0, 3.0)  # df/dq = z, df/dz = q
    f.backward()
    assert (x.grad, y.grad, z.grad, q.grad, f.grad) == (-4.0, -4.0, 3.0, -4.0, 1.0)
    assert all(type(v) is float for v in (x.grad, q.data, q.local_grads[0]))


def test_seed_logistic_regression_reads_dw_as_a_minus_y_times_x():
    # z = w1 x1 + w2 x2 + b, a = sigmoid(z), L = -[y log a + (1 - y) log(1 - a)]
    x1, x2, y = 1.0, 3.0, 1.0
    w1, w2, b = graph.Tensor(2.0, "w1"), graph.Tensor(-1.0, "w2"), graph.Tensor(1.0, "b")
    z = w1 * x1 + w2 * x2 + b
    a = graph.sigmoid(z)
    L = -(y * graph.log(a) + (1 - y) * graph.log(1 - a))
    L.backward()
    assert z.data == 0.0 and a.data == 0.5 and L.data == math.log(2.0)
    assert z.grad == a.data - y == -0.5  # dL/dz = a - y
    assert (w1.grad, w2.grad, b.grad) == ((a.data - y) * x1, (a.data - y) * x2, a.data - y)
    # the same loss from the logit, stably, with its local gradient a - y
    L.zero_grad()  # clears every node L depends on, the leaves included
    z2 = w1 * x1 + w2 * x2 + b
    L2 = graph.log_loss(z2, y)
    assert L2.local_grads == (-0.5,)
    L2.backward()
    assert L2.data == pytest.approx(math.log(2.0), rel=1e-15)
    assert (w1.grad, w2.grad, b.grad) == (-0.5, -1.5, -0.5)


# ---------------------------------------------------------------- random graphs


UNARY = ["neg", "exp", "log", "sigmoid", "tanh", "relu", "leaky_relu", "square", "recip", "rsub", "rmul", "pow_const"]
BINARY = ["add", "sub", "mul", "div", "pow"]


def random_plan(rng, n_leaves, n_ops):
    """A random DAG: each step applies an op to earlier nodes (so nodes fan out)."""
    plan = []
    for k in range(n_ops):
        n = n_leaves + k
        if rng.random() < 0.5:
            plan.append((str(rng.choice(BINARY)), int(rng.integers(n)), int(rng.integers(n))))
        else:
            plan.append((str(rng.choice(UNARY)), int(rng.integers(n)), None))
    return plan


def run_plan(plan, leaves, F):
    """Evaluate ``plan`` with the functions of ``F`` (graph, numpy or torch); smooth domains only."""
    nodes = list(leaves)
    for op, i, j in plan:
        a, b = nodes[i], (nodes[j] if j is not None else None)
        r = {
            "add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
            "div": lambda: a / (1.5 + b * b),
            "pow": lambda: (a * a + 0.5) ** (0.5 * F.tanh(b)),  # a Tensor exponent
            "neg": lambda: -a, "exp": lambda: F.exp(0.5 * F.tanh(a)), "log": lambda: F.log(a * a + 0.5),
            "sigmoid": lambda: F.sigmoid(a), "tanh": lambda: F.tanh(a), "relu": lambda: F.relu(a),
            "leaky_relu": lambda: F.leaky_relu(a), "square": lambda: a ** 2, "recip": lambda: 1.0 / (1.0 + a * a),
            "rsub": lambda: 2.5 - a, "rmul": lambda: 3.0 * a, "pow_const": lambda: (a * a + 0.25) ** 1.5,
        }[op]()
        nodes.append(r)
    return nodes


def plan_output(plan, leaves, F):
    nodes = run_plan(plan, leaves, F)
    out = nodes[-1] + 0.5 * nodes[-2]
    return out if not hasattr(out, "sum") else out.sum()


NUMPY_F = SimpleNamespace(exp=np.exp, log=np.log, tanh=np.tanh, sigmoid=lambda t: 1 / (1 + np.exp(-t)),
                          relu=lambda t: np.maximum(t, 0), leaky_relu=lambda t: np.where(t > 0, t, 0.01 * t))


def torch_functions(torch):
    return SimpleNamespace(exp=torch.exp, log=torch.log, tanh=torch.tanh, sigmoid=torch.sigmoid, relu=torch.relu,
                           leaky_relu=lambda t: torch.nn.functional.leaky_relu(t, 0.01))


SCALAR_SEEDS = range(25)


@pytest.mark.parametrize("seed", SCALAR_SEEDS)
def test_random_scalar_graphs_match_central_differences(seed):
    rng = np.random.default_rng(seed)
    plan = random_plan(rng, 4, 12)
    values = [float(v) for v in rng.normal(size=4)]
    f = lambda *leaves: plan_output(plan, leaves, graph)  # noqa: E731
    out = f(*[graph.Tensor(v) for v in values])
    assert type(out.data) is float
    assert out.data == pytest.approx(float(plan_output(plan, [np.float64(v) for v in values], NUMPY_F)), rel=1e-12)
    assert fb.gradcheck(f, values) < 1e-6


@pytest.mark.parametrize("seed", SCALAR_SEEDS)
def test_random_scalar_graphs_match_torch(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    plan = random_plan(rng, 4, 12)
    values = [float(v) for v in rng.normal(size=4)]
    leaves = [graph.Tensor(v) for v in values]
    plan_output(plan, leaves, graph).backward()
    tl = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    plan_output(plan, tl, torch_functions(torch)).backward()
    for leaf, t in zip(leaves, tl):
        expected = 0.0 if t.grad is None else float(t.grad)
        got = 0.0 if leaf.grad is None else leaf.grad
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


# Broadcasting leaves: a matrix, a row, a column, a 0-d array and a Python-float scalar.
TENSOR_SHAPES = [(3, 4), (4,), (3, 1), ()]


def tensor_point(rng):
    return [rng.normal(size=s) for s in TENSOR_SHAPES] + [float(rng.normal())]


@pytest.mark.parametrize("seed", range(8))
def test_random_tensor_graphs_match_central_differences(backend, seed):
    rng = np.random.default_rng(100 + seed)
    plan = random_plan(rng, 5, 12)
    point = tensor_point(rng)
    f = lambda *leaves: plan_output(plan, leaves, graph)  # noqa: E731
    leaves = [graph.Tensor(v) for v in point]
    out = f(*leaves)
    expected = plan_output(plan, [np.asarray(v, dtype=np.float64) for v in point], NUMPY_F)
    np.testing.assert_allclose(out.item(), float(np.sum(expected)), rtol=1e-12)
    out.backward()
    for leaf, v in zip(leaves, point):  # every gradient has its operand's shape (broadcasting undone)
        if leaf.grad is not None:
            assert np.shape(leaf.grad) == np.shape(v)
            assert type(leaf.grad) is float if isinstance(v, float) else leaf.grad.dtype == np.float64
    assert fb.gradcheck(f, point) < 1e-6


@pytest.mark.parametrize("seed", range(8))
def test_random_tensor_graphs_match_torch(backend, seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(100 + seed)
    plan = random_plan(rng, 5, 12)
    point = tensor_point(rng)
    leaves = [graph.Tensor(v) for v in point]
    plan_output(plan, leaves, graph).backward()
    tl = [torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True) for v in point]
    plan_output(plan, tl, torch_functions(torch)).backward()
    for leaf, t in zip(leaves, tl):
        expected = np.zeros(t.shape) if t.grad is None else t.grad.numpy()
        got = np.zeros(t.shape) if leaf.grad is None else fb.to_numpy(leaf.grad)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def array_ops_function(A, B, c, v):
    """Matmuls (2-D, 1-D on either side), transposes, reductions over axes, softmax, log_softmax."""
    h = graph.tanh(A @ B.T + c)  # (5, 3) @ (3, 4) + (4,)
    p = graph.softmax(h)
    lp = graph.log_softmax(h * 2.0)
    u = h @ v  # (5, 4) @ (4,) -> (5,)
    w = v @ B.T.T  # (4,) @ (4, 3) -> (3,)
    s = (p * lp).sum(axis=1) + u / 3.0
    r = h.mean(axis=0, keepdims=True) - h.sum(axis=(0, 1))
    return s.mean() + (r ** 2).sum() + (w @ w) * 0.1 + graph.exp(-(A ** 2)).mean(axis=-1).sum()


def array_point(rng):
    return [rng.normal(size=(5, 3)), rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=4)]


def test_array_ops_match_central_differences(backend):
    point = array_point(np.random.default_rng(7))
    assert fb.gradcheck(array_ops_function, point) < 1e-6


def test_array_ops_match_torch(backend):
    torch = pytest.importorskip("torch")
    point = array_point(np.random.default_rng(7))
    leaves = [graph.Tensor(v) for v in point]
    out = array_ops_function(*leaves)
    out.backward()

    A, B, c, v = (torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in point)
    h = torch.tanh(A @ B.T + c)
    p = torch.softmax(h, dim=-1)
    lp = torch.log_softmax(h * 2.0, dim=-1)
    s = (p * lp).sum(dim=1) + (h @ v) / 3.0
    r = h.mean(dim=0, keepdim=True) - h.sum()
    w = v @ B
    ref = s.mean() + (r ** 2).sum() + (w @ w) * 0.1 + torch.exp(-(A ** 2)).mean(dim=-1).sum()
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-12)
    for leaf, t in zip(leaves, (A, B, c, v)):
        np.testing.assert_allclose(fb.to_numpy(leaf.grad), t.grad.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- losses


def _targets(loss, n, k, rng):
    if loss == "cross_entropy":
        return np.eye(k)[rng.integers(0, k, n)]
    if loss == "log_loss":
        return rng.integers(0, 2, (n, k)).astype(float)
    return rng.normal(size=(n, k))


def _reference_loss(loss, z, y):
    """The MLP's per-row costs, averaged over rows, written plainly."""
    if loss == "mse":
        return 0.5 * np.sum((y - z) ** 2) / z.shape[0]
    if loss == "log_loss":
        a = 1 / (1 + np.exp(-z))
        return -np.sum(y * np.log(a) + (1 - y) * np.log(1 - a)) / z.shape[0]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return -np.sum(y * np.log(e / e.sum(axis=1, keepdims=True))) / z.shape[0]


@pytest.mark.parametrize("loss", ["mse", "log_loss", "cross_entropy"])
def test_losses_match_reference_and_central_differences(backend, loss):
    rng = np.random.default_rng(3)
    z0, y = rng.normal(size=(6, 4)), _targets(loss, 6, 4, rng)
    fn = getattr(graph, loss)
    out = fn(graph.Tensor(z0), y)
    assert out.item() == pytest.approx(_reference_loss(loss, z0, y), rel=1e-12)
    assert fb.gradcheck(lambda z: fn(z, y), [z0]) < 1e-7


@pytest.mark.parametrize("loss", ["mse", "log_loss", "cross_entropy"])
def test_losses_match_torch(backend, loss):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    z0, y = rng.normal(size=(6, 4)), _targets(loss, 6, 4, rng)
    z = graph.Tensor(z0)
    out = getattr(graph, loss)(z, y)
    out.backward()
    zt, yt = torch.tensor(z0, requires_grad=True), torch.tensor(y)
    ref = {"mse": lambda: 0.5 * F.mse_loss(zt, yt, reduction="sum") / 6,
           "log_loss": lambda: F.binary_cross_entropy_with_logits(zt, yt, reduction="sum") / 6,
           "cross_entropy": lambda: F.cross_entropy(zt, yt.argmax(dim=1))}[loss]()
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(fb.to_numpy(z.grad), zt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_losses_are_stable_at_extreme_logits(backend):
    z0 = np.array([[1000.0, -1000.0, 0.0], [-800.0, 800.0, 5.0]])
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for fn in (graph.log_loss, graph.cross_entropy):
        z = graph.Tensor(z0)
        out = fn(z, y)
        out.backward()
        assert np.isfinite(out.item()) and np.isfinite(fb.to_numpy(z.grad)).all()
    # log_loss: (1 - y) softplus(z) + y softplus(-z) summed, / rows; gradient (sigmoid(z) - y) / rows
    z = graph.Tensor(z0)
    out = graph.log_loss(z, y)
    out.backward()
    assert out.item() == pytest.approx((1000.0 + 1000.0 + math.log(2) + 800.0 + 800.0 + 5.0 + math.log1p(math.exp(-5)))
                                       / 2, rel=1e-12)
    sig = 1 / (1 + np.exp(-np.clip(z0, -700, 700)))
    np.testing.assert_allclose(fb.to_numpy(z.grad), (sig - y) / 2, rtol=1e-12, atol=1e-300)
    # cross-entropy from the logits: row 1 costs 2000 (its target logit is 2000 below the max)
    assert graph.cross_entropy(graph.Tensor(z0), y).item() == pytest.approx((2000.0 + 1600.0) / 2, rel=1e-12)


def test_loss_targets_in_other_forms(backend):
    rng = np.random.default_rng(5)
    z0, labels = rng.normal(size=(5, 3)), np.array([0, 2, 1, 1, 0])
    onehot = np.eye(3)[labels]
    assert graph.cross_entropy(graph.Tensor(z0), labels).item() == pytest.approx(
        graph.cross_entropy(graph.Tensor(z0), onehot).item(), rel=1e-15)
    col = rng.normal(size=5)  # one output: logits and targets of shape (n,)
    y = rng.integers(0, 2, 5).astype(float)
    assert graph.log_loss(graph.Tensor(col), y).item() == pytest.approx(
        graph.log_loss(graph.Tensor(col[:, None]), y[:, None]).item(), rel=1e-15)
    assert graph.mse(graph.Tensor(col), y).item() == pytest.approx(0.5 * np.mean((col - y) ** 2), rel=1e-14)
    assert graph.mse(graph.Tensor(0.5), 2.0).data == 0.5 * 1.5 ** 2


# ---------------------------------------------------------------- one algorithm, three strategies

ACTIVATIONS = ["sigmoid", "relu", "tanh", "identity", "leaky_relu"]
CONFIGS = [("mse", None), ("log_loss", None), ("cross_entropy", None),
           ("mse", "softmax"), ("mse", "sigmoid"), ("log_loss", "tanh"), ("cross_entropy", "sigmoid")]


def _flat(grads):
    dWs, dbs = grads
    return np.concatenate([fb.to_numpy(g).ravel() for g in list(dWs) + list(dbs)])


@pytest.mark.parametrize("loss,output", CONFIGS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_in_graph_ops_gives_net_gradients(backend, activation, loss, output):
    net = fb.MLP([5, 7, 4, 3], activation=activation, loss=loss, output=output, dtype="float64", seed=3)
    X, Y = make_data(11, 5, 3, loss, seed=1)
    X = 0.5 * X if output in ("tanh", "sigmoid") and loss != "mse" else X
    expected = net.gradients(X, Y)
    got = graph.mlp_gradients(net, X, Y)
    for g, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert g.shape == e.shape and g.dtype == e.dtype and type(g) is type(e)
    np.testing.assert_allclose(_flat(got), _flat(expected), **TOL["float64"])
    loss_t, _, _ = graph.mlp_loss(net, X, Y)
    assert loss_t.item() == pytest.approx(net.loss(X, Y), rel=1e-12)


def test_mlp_gradients_float32_labels_and_logistic_regression(backend):
    net = fb.MLP([6, 9, 4], activation="tanh", loss="cross_entropy", dtype="float32", seed=5)
    X, labels = make_data(16, 6, 4, "cross_entropy", seed=2, labels=True)
    got = graph.mlp_gradients(net, X, labels)
    assert all(g.dtype == np.float32 for g in got[0] + got[1])
    np.testing.assert_allclose(_flat(got), _flat(net.gradients(X, labels)), **TOL["float32"])
    lr = fb.LogisticRegression(3, dtype="float64", seed=0)
    X, y = make_data(9, 3, 1, "log_loss", seed=4)
    np.testing.assert_allclose(_flat(graph.mlp_gradients(lr, X, y[:, 0])), _flat(lr.gradients(X, y[:, 0])),
                               **TOL["float64"])


def test_mlp_loss_shares_the_parameters_and_skips_dX(backend):
    net = fb.MLP([4, 3, 2], dtype="float64", seed=0)
    X, Y = make_data(5, 4, 2, "mse")
    loss, weights, biases = graph.mlp_loss(net, X, Y)
    assert [w.name for w in weights] == ["W1", "W2"] and [b.name for b in biases] == ["b1", "b2"]
    assert all(w.data is nw for w, nw in zip(weights + biases, net.weights + net.biases))  # no copy
    loss.backward()
    x_node = next(n for n in graph._all_nodes(loss) if n.name == "X")
    assert not x_node.requires_grad and x_node.grad is None
    with pytest.raises(TypeError, match="net must be a fastbp MLP"):
        graph.mlp_loss("net", X, Y)
    with pytest.raises(ValueError, match="X has the wrong shape"):
        graph.mlp_gradients(net, X[:, :3], Y)


# ---------------------------------------------------------------- accumulation, depth, no_grad


def test_fan_out_accumulates_and_repeated_backward_adds_without_double_counting():
    x = graph.Tensor(3.0)
    h = x * x  # used twice below
    f = h + h * x + x  # x^2 + x^3 + x: df/dx = 2x + 3x^2 + 1 = 34
    f.backward()
    assert x.grad == 34.0 and h.grad == 1.0 + 3.0
    f.backward()  # grads add up; intermediates are not propagated twice
    assert x.grad == 68.0 and h.grad == 8.0
    f.zero_grad()
    assert x.grad is None and h.grad is None and f.grad is None
    f.backward()
    assert x.grad == 34.0


def test_fan_out_of_arrays_gives_separate_gradient_arrays(backend):
    x = graph.Tensor(np.arange(1.0, 5.0))
    y = x + x  # both edges carry the same upstream gradient
    z = y * 1.0
    (z.sum() + y.sum()).backward()
    np.testing.assert_array_equal(fb.to_numpy(x.grad), np.full(4, 4.0))
    grads = [x.grad, y.grad, z.grad]
    for i in range(3):  # no two nodes' gradients share memory, so writing into one is safe
        for j in range(i + 1, 3):
            assert not np.shares_memory(fb.to_numpy(grads[i]), fb.to_numpy(grads[j]))


def test_deep_chain_of_100k_nodes():
    x = graph.Tensor(0.5)
    y = x
    for _ in range(100_000):
        y = y + x
    assert sys.getrecursionlimit() < 100_000
    y.backward()
    assert x.grad == 100_001.0 and y.data == 0.5 * 100_001
    y.zero_grad()
    assert x.grad is None


def test_deep_array_chain(backend):
    x = graph.Tensor(np.ones(3))
    y = x
    for _ in range(5_000):
        y = graph.tanh(y) * 0.5 + x
    y.sum().backward()
    assert fb.to_numpy(x.grad).shape == (3,) and np.isfinite(fb.to_numpy(x.grad)).all()


def test_no_grad_records_nothing_and_computes_no_local_gradient(backend, monkeypatch):
    x = graph.Tensor(np.ones((2, 3)))

    def boom(*args, **kwargs):
        raise AssertionError("a local gradient was computed under no_grad")

    monkeypatch.setattr(type(backend), "activation_backward", boom)
    monkeypatch.setattr(type(backend), "output_delta", boom)
    with graph.no_grad():
        out = graph.mse(graph.sigmoid(x * 2.0), np.zeros((2, 3)))
    assert not out.requires_grad and out.parents == () and out.local_grads == ()
    assert out.item() == pytest.approx(0.5 * 3 * (1 / (1 + math.exp(-2))) ** 2)
    with pytest.raises(ValueError, match="depends on nothing requiring grad"):
        out.backward()

    @graph.no_grad()
    def evaluate(t):
        return (t * t).sum()

    assert not evaluate(x).requires_grad
    assert (x * x).requires_grad  # recording resumes after the context


def test_requires_grad_false_leaves_get_no_gradient():
    x, c = graph.Tensor(2.0), graph.Tensor(5.0, requires_grad=False)
    f = x * c
    f.backward()
    assert x.grad == 5.0 and c.grad is None


def test_plain_arrays_and_numbers_mix_as_constants(backend):
    t = graph.Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]))
    m = np.array([[1.0, 0.0], [0.0, 2.0]])
    out = (m @ t + 1 - t / 2 + 2 ** t).sum() + (np.ones(2) * t).mean()
    assert isinstance(out, graph.Tensor)
    out.backward()
    d = fb.to_numpy(t.data)
    expected = m.T @ np.ones((2, 2)) - 0.5 + np.log(2) * 2 ** d + 0.25
    np.testing.assert_allclose(fb.to_numpy(t.grad), expected, rtol=1e-12)


def test_mixed_dtypes_give_gradients_in_each_leafs_dtype(backend):
    a = graph.Tensor(np.ones(3, dtype=np.float32))
    b = graph.Tensor(np.full(3, 2.0))
    (a * b).sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    np.testing.assert_array_equal(fb.to_numpy(a.grad), np.full(3, 2.0, np.float32))


def test_array_ops_run_the_backend_kernels(backend, monkeypatch):
    calls = []
    for name in ("matmul", "activation", "activation_backward", "output_delta", "bias_grad", "hadamard"):
        original = getattr(type(backend), name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(type(backend), name, spy)
    X, W, b = graph.Tensor(np.ones((4, 3))), graph.Tensor(np.ones((2, 3))), graph.Tensor(np.zeros(2))
    h = graph.relu(X @ W.T + b)
    graph.cross_entropy(h * h, np.eye(2)[[0, 1, 0, 1]]).backward()
    assert {"matmul", "activation", "activation_backward", "output_delta", "bias_grad", "hadamard"} <= set(calls)


# ---------------------------------------------------------------- errors


def test_shape_mismatches_name_the_op_and_both_shapes(backend):
    a, b = graph.Tensor(np.ones((3, 4))), graph.Tensor(np.ones(5))
    for op, fn in (("+", lambda: a + b), ("*", lambda: a * b), ("-", lambda: b - a), ("/", lambda: a / b)):
        with pytest.raises(ValueError, match=re.escape(f"{op}: shapes ")) as info:
            fn()
        assert "(3, 4)" in str(info.value) and "(5,)" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("@: shapes (3, 4) and (5,) are not aligned")):
        a @ b
    with pytest.raises(ValueError, match=re.escape("@: shapes (2, 3) and (4, 5) are not aligned")):
        graph.Tensor(np.ones((2, 3))) @ np.ones((4, 5))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        graph.Tensor(np.ones((2, 2, 2))) @ a
    with pytest.raises(ValueError, match="1-D or 2-D"):
        graph.Tensor(2.0) @ graph.Tensor(3.0)


def test_backward_on_a_non_scalar_is_an_error(backend):
    t = graph.Tensor(np.ones((3, 4)))
    with pytest.raises(ValueError, match=re.escape("Received: a Tensor of shape (3, 4)")):
        (t * 2).backward()
    assert t.grad is None


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs two usable backends")
def test_mixing_backends_is_an_error():
    with fb.use_backend(BACKENDS[0]):
        a = graph.Tensor(np.ones(3))
    with fb.use_backend(BACKENDS[1]):
        b = graph.Tensor(np.ones(3))
        with pytest.raises(ValueError, match=f"different backends. Received: '{BACKENDS[0]}' and '{BACKENDS[1]}'"):
            a + b
        with pytest.raises(ValueError, match="different backends"):
            b @ a
    assert a.backend.name == BACKENDS[0] and b.backend.name == BACKENDS[1]


def test_non_finite_loss_inputs_are_rejected(backend):
    bad = np.array([[0.0, np.inf], [1.0, 2.0]])
    for fn in (graph.mse, graph.log_loss, graph.cross_entropy):
        z = graph.Tensor(np.ones((2, 2)))
        with np.errstate(over="ignore"):
            overflowed = z * 1e308 * 10.0  # a forward pass that overflowed to inf
        with pytest.raises(ValueError, match=f"{fn.__name__}: .* contains NaN or Inf"):
            fn(overflowed, np.eye(2))
        with pytest.raises(ValueError, match="Y contains NaN or Inf"):
            fn(z, np.array([[np.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="log_loss: logits contains NaN or Inf"):
        graph.log_loss(graph.Tensor(1e308) * 10.0, 1.0)
    with pytest.raises(ValueError, match="data contains NaN or Inf"):
        graph.Tensor(bad)
    with pytest.raises(ValueError, match="data contains NaN or Inf"):
        graph.Tensor(float("nan"))


def test_bad_arguments_name_what_was_received(backend):
    t = graph.Tensor(np.ones((2, 3)))
    with pytest.raises(TypeError, match="cannot combine a Tensor with str"):
        t + "a"
    with pytest.raises(TypeError, match="name must be a str"):
        graph.Tensor(1.0, name=3)
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        graph.Tensor(1.0, requires_grad=1)
    with pytest.raises(TypeError, match="already a Tensor"):
        graph.Tensor(t)
    with pytest.raises(TypeError, match="must hold real numbers"):
        graph.Tensor(np.array(["a"]))
    with pytest.raises(ValueError, match="data is empty"):
        graph.Tensor(np.ones((0, 3)))
    with pytest.raises(ValueError, match=re.escape("sum: axis 2 is out of range for a Tensor of shape (2, 3)")):
        t.sum(axis=2)
    with pytest.raises(TypeError, match="axis must be None, an int or a tuple of ints"):
        t.mean(axis="rows")
    with pytest.raises(ValueError, match="softmax: needs an array with a last axis"):
        graph.softmax(graph.Tensor(1.0))
    with pytest.raises(ValueError, match=re.escape("cross_entropy: logits must have shape (n_samples, n_classes)")):
        graph.cross_entropy(graph.Tensor(np.ones(3)), np.ones(3))
    with pytest.raises(ValueError, match="Y out of range for log_loss"):
        graph.log_loss(t, np.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="Y has the wrong shape"):
        graph.mse(t, np.ones((3, 2)))
    with pytest.raises(TypeError, match="Y must be plain targets"):
        graph.mse(t, graph.Tensor(np.ones((2, 3))))
    with pytest.raises(TypeError, match="outputs must be a Tensor"):
        graph.mse(np.ones((2, 3)), np.ones((2, 3)))


# ---------------------------------------------------------------- gradcheck on graph functions


def test_gradcheck_on_a_function_catches_a_wrong_gradient(monkeypatch):
    f = lambda a, b: graph.tanh(a * b).sum()  # noqa: E731
    point = [np.array([0.3, -0.2]), 0.7]
    assert fb.gradcheck(f, point) < 1e-8
    monkeypatch.setattr(graph, "_scalar_tanh", lambda z: (math.tanh(z), 2.0))
    with fb.use_backend("numpy") as be:
        original = type(be).activation_backward

        def wrong(self, name, z, a, delta):
            original(self, name, z, a, delta)
            delta *= 1.5

        monkeypatch.setattr(type(be), "activation_backward", wrong)
        assert fb.gradcheck(f, point) > 0.1
    assert fb.gradcheck(lambda x: graph.tanh(x) * 2.0, 0.3) > 0.1  # the scalar path, patched above


def test_gradcheck_function_argument_errors():
    with pytest.raises(TypeError, match="Y is only for an MLP"):
        fb.gradcheck(lambda a: a.sum(), [np.ones(2)], np.ones(2))
    with pytest.raises(ValueError, match=re.escape("f must return a scalar graph.Tensor. Received: a Tensor of shape (2,)")):
        fb.gradcheck(lambda a: a * 2.0, [np.ones(2)])
    with pytest.raises(ValueError, match="f must return a scalar graph.Tensor. Received: float"):
        fb.gradcheck(lambda a: 1.0, [np.ones(2)])
    with pytest.raises(ValueError, match="X holds no arguments"):
        fb.gradcheck(lambda: graph.Tensor(1.0), [])
    with pytest.raises(TypeError, match="net must be a fastbp MLP or a function"):
        fb.gradcheck(3, [np.ones(2)])
    with pytest.raises(TypeError, match="Y is required to check an MLP"):
        fb.gradcheck(fb.MLP([2, 1], dtype="float64"), np.ones((1, 2)))


# ---------------------------------------------------------------- pictures

NODE = re.compile(r'^\s*(n\d+) \[label="((?:[^"\\]|\\.)*)"(?:, style="[^"]*")?\];$', re.M)
EDGE = re.compile(r'^\s*(n\d+) -> (n\d+) \[label="((?:[^"\\]|\\.)*)"\];$', re.M)


def parse_dot(text):
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    nodes = {nid: label.split("\\n") for nid, label in NODE.findall(text)}
    edges = [(a, b, label) for a, b, label in EDGE.findall(text)]
    assert len(nodes) + len(edges) == sum(1 for line in text.splitlines() if re.match(r"\s*n\d", line))
    return nodes, edges


def test_to_dot_parses_back_to_the_seed_graph():
    x, y, z = graph.Tensor(-2.0, "x"), graph.Tensor(5.0, "y"), graph.Tensor(-4.0, "z")
    q = x + y
    q.name = "q"
    f = q * z
    f.name = "f"
    f.backward()
    nodes, edges = parse_dot(graph.to_dot(f))
    by_title = {lines[0]: (nid, lines[1:]) for nid, lines in nodes.items()}
    assert set(by_title) == {"x", "y", "z", "q = +", "f = *"}
    assert by_title["x"][1] == ["value -2", "grad -4"] and by_title["z"][1] == ["value -4", "grad 3"]
    assert by_title["q = +"][1] == ["value 3", "grad -4"] and by_title["f = *"][1] == ["value -12", "grad 1"]
    ident = {title: nid for title, (nid, _) in by_title.items()}
    assert set(edges) == {(ident["x"], ident["q = +"], "dq/dx = 1"), (ident["y"], ident["q = +"], "dq/dy = 1"),
                          (ident["q = +"], ident["f = *"], "df/dq = -4"), (ident["z"], ident["f = *"], "df/dz = 3")}


def test_to_dot_summarises_arrays_and_marks_constants(backend):
    W = graph.Tensor(np.arange(6.0).reshape(2, 3), "W")
    out = (graph.Tensor(np.ones((4, 3)), "X", requires_grad=False) @ W.T * 2.0).sum()
    text = graph.to_dot(out)
    nodes, edges = parse_dot(text)
    titles = [lines[0] for lines in nodes.values()]
    assert sorted(titles) == sorted(["W", "T", "X", "@", "constant", "*", "sum"])
    w_lines = next(lines for lines in nodes.values() if lines[0] == "W")
    assert w_lines[1] == "value (2, 3) float64 [0, 1, 2, ...]" and w_lines[2] == "grad none"
    assert any(label.startswith("local (3, 4) float64 [1, 1, 1, ...] @ g") for _, _, label in edges)
    assert sum(label == "" for _, _, label in edges) == 1  # X -> @: X needs no gradient
    assert text.count('style="rounded,dashed"') == 2  # X and the constant 2
    assert len(edges) == 6


def _graphviz_usable():
    return importlib.util.find_spec("graphviz") is not None and shutil.which("dot") is not None


@pytest.mark.skipif(not _graphviz_usable(), reason="needs the graphviz Python package and Graphviz's dot")
def test_draw_renders_svg_and_png(tmp_path):
    x, y = graph.Tensor(-2.0, "x"), graph.Tensor(5.0, "y")
    f = x * y
    f.backward()
    svg = graph.draw(f, tmp_path / "f.svg")
    text = html.unescape(svg.read_text())  # Graphviz writes "-" as "&#45;"
    assert "<svg" in text and "value -2" in text and "grad 5" in text and "local -2" in text
    png = graph.draw(f, tmp_path / "f.img", format="png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_without_graphviz_names_both_packages_and_writes_nothing(tmp_path, monkeypatch):
    f = graph.Tensor(1.0) * 2.0
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` now fails
    with pytest.raises(ImportError) as info:
        graph.draw(f, tmp_path / "f.svg")
    message = str(info.value)
    assert "pip install graphviz" in message and "apt-get install graphviz" in message
    assert "Python package `graphviz` is not installed" in message
    assert not (tmp_path / "f.svg").exists()
    with pytest.raises(ValueError, match="unsupported image format. Received: format='gif'"):
        graph.draw(f, tmp_path / "f.gif")
    with pytest.raises(TypeError, match="path must be a str"):
        graph.draw(f, 3)


def test_draw_without_the_dot_program_names_both(tmp_path, monkeypatch):
    pytest.importorskip("graphviz")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here
    with pytest.raises(ImportError) as info:
        graph.draw(graph.Tensor(1.0) * 2.0, tmp_path / "f.svg")
    assert "`dot` program is not on PATH" in str(info.value) and "pip install graphviz" in str(info.value)
    assert not (tmp_path / "f.svg").exists()


def test_importing_graph_stays_light():
    code = ("import sys, fastbp, fastbp.graph; "
            "print(sorted(m for m in ('numba', 'cupy', 'torch', 'graphviz', 'jax', 'mpi4py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert fb.graph is graph


def test_readme_graph_examples_run_and_say_what_they_compute(tmp_path, monkeypatch):
    """The README's code blocks for the graph, run as written (the picture into a temporary folder)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Computation graph"):readme.index("## Layout")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    if not _graphviz_usable():
        monkeypatch.setattr(graph, "draw", lambda root, path: Path(path).write_text(graph.to_dot(root)))
    ns = {}
    exec(blocks[0], ns)
    assert (ns["x"].grad, ns["y"].grad, ns["z"].grad, ns["q"].grad) == (-4.0, -4.0, 3.0, -4.0)
    exec(blocks[1], ns)
    assert ns["a"].local_grads == (0.25,) and ns["z"].grad == ns["a"].data - 1.0 == -0.5
    assert (ns["w1"].grad, ns["w2"].grad, ns["b"].grad) == (-0.5, -1.5, -0.5)
    assert (tmp_path / "benchmarks/results/graph-seed.svg").exists()
    assert (tmp_path / "benchmarks/results/graph-logistic.svg").exists()
