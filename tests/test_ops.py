"""fb.ops on every backend: plain-NumPy references for 1-D inputs, lists, in-place and transposed calls."""

import numpy as np
import pytest

import fastbp as fb
from conftest import TOL



def _np(x):
    return fb.to_numpy(x)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


PHI = {
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "identity": lambda z: z,
    "softmax": _softmax,
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes_alpha_beta(backend, dtype, trans_a, trans_b):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3) if trans_a else (3, 4)).astype(dtype)
    b = rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(dtype)
    c = rng.normal(size=(3, 5)).astype(dtype)
    want = 2.0 * (a.T if trans_a else a) @ (b.T if trans_b else b) - 0.5 * c
    out = backend.asarray(c)
    got = fb.ops.matmul(backend.asarray(a), backend.asarray(b), out, trans_a=trans_a, trans_b=trans_b,
                        alpha=2.0, beta=-0.5)
    assert got is out
    np.testing.assert_allclose(_np(out), want, **TOL[dtype])


def test_lists_are_read_in_the_call_dtype(backend):
    b = backend.asarray(np.eye(2, dtype=np.float32))
    got = fb.ops.matmul([[1, 2], [3, 4]], b)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(_np(got), [[1, 2], [3, 4]])
    assert fb.ops.hadamard([1.5, 2.0], [2, 2]).dtype == np.float64  # no array given: float64
    np.testing.assert_array_equal(_np(fb.ops.outer([1, 2], [3, 4, 5])), np.outer([1, 2], [3, 4, 5]))


@pytest.mark.parametrize("name", list(PHI))
def test_activation_of_one_example_and_in_place(backend, name):
    z = np.array([-2.0, -0.1, 0.0, 0.3, 4.0])
    want = PHI[name](z)
    np.testing.assert_allclose(_np(fb.ops.activation(name, backend.asarray(z))), want, **TOL["float64"])
    batch = np.stack([z, -z, 2 * z])
    inplace = backend.asarray(batch.copy())
    assert fb.ops.activation(name, inplace, inplace) is inplace
    np.testing.assert_allclose(_np(inplace), PHI[name](batch), **TOL["float64"])


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "softmax"])
def test_activation_backward_of_one_example_matches_the_batch(backend, name):
    rng = np.random.default_rng(1)
    z = rng.normal(size=4)
    a = PHI[name](z)
    g = rng.normal(size=4)
    one = fb.ops.activation_backward(name, backend.asarray(z), backend.asarray(a), backend.asarray(g.copy()))
    batch = fb.ops.activation_backward(name, backend.asarray(z[None]), backend.asarray(a[None]),
                                       backend.asarray(g[None].copy()))
    np.testing.assert_allclose(_np(one), _np(batch)[0], **TOL["float64"])
    eps = 1e-6  # central differences of <phi(z), g>
    numeric = [(PHI[name](z + eps * e) - PHI[name](z - eps * e)) @ g / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(_np(one), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss,output", [("mse", "identity"), ("log_loss", "sigmoid"), ("cross_entropy", "softmax")])
def test_output_delta_of_one_example(backend, loss, output):
    z = np.array([0.5, -1.0, 2.0])
    a = PHI[output](z)
    y = np.array([0.0, 0.0, 1.0])
    delta, total = fb.ops.output_delta(loss, output, backend.asarray(z), backend.asarray(a), backend.asarray(y))
    assert tuple(delta.shape) == (3,)
    want = {"mse": lambda: 0.5 * np.sum((a - y) ** 2),
            "log_loss": lambda: -np.sum(y * np.log(a) + (1 - y) * np.log(1 - a)),
            "cross_entropy": lambda: -np.sum(y * np.log(a))}[loss]()
    assert float(total) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(_np(delta), a - y, **TOL["float64"])  # all three: dc/dz = a - y here


def test_bias_grad_add_bias_sgd_update(backend):
    rng = np.random.default_rng(2)
    d = rng.normal(size=(6, 3))
    np.testing.assert_allclose(_np(fb.ops.bias_grad(backend.asarray(d), alpha=0.5)), 0.5 * d.sum(0), **TOL["float64"])
    z = backend.asarray(d.copy())
    fb.ops.add_bias(z, backend.asarray([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(_np(z), d + [1, 2, 3], **TOL["float64"])
    p = backend.asarray(np.ones(5))
    fb.ops.sgd_update(p, backend.asarray(np.arange(5.0)), 0.25)
    np.testing.assert_allclose(_np(p), 1 - 0.25 * np.arange(5.0), **TOL["float64"])


def test_non_contiguous_views(backend):
    """Strided views give the numbers their copies give (backends may take a slower path)."""
    rng = np.random.default_rng(3)
    big = backend.asarray(rng.normal(size=(6, 8)))
    a, b = big[::2, ::2], big[1::2, 1::2]  # (3, 4) each, strided
    np.testing.assert_allclose(_np(fb.ops.matmul(a, b, trans_b=True)), _np(a) @ _np(b).T, **TOL["float64"])
    np.testing.assert_allclose(_np(fb.ops.hadamard(a, b)), _np(a) * _np(b), **TOL["float64"])
    out = backend.asarray(np.zeros((4, 8)))[:, ::2]
    fb.ops.matmul(a, b, out, trans_a=True)
    np.testing.assert_allclose(_np(out), _np(a).T @ _np(b), **TOL["float64"])
