"""The dispatched kernels, per backend and shape: matmul, Hadamard, outer product.

Shapes are those of a 784-128-10 MLP at batch 256 (plus a large square GEMM and a
4096-row batch), so each group is one piece of a backpropagation step and compares
the backends on the same work; ``extra_info`` carries the FLOP or element count.
These are measurements, not tests: nothing asserts a speed.
"""

from __future__ import annotations

import pytest

DTYPES = ["float32", "float64"]
# id: (what it is in backprop, shape of a, shape of b, trans_a, trans_b) for out = op(a) @ op(b)
MATMULS = {
    "forward-256x784x128": ("forward Z = A @ W.T", (256, 784), (128, 784), False, True),
    "weightgrad-128x256x784": ("weight gradient dW = D.T @ A", (256, 128), (256, 784), True, False),
    "hiddendelta-256x10x128": ("hidden delta D @ W", (256, 10), (10, 128), False, False),
    "square-1024": ("square GEMM", (1024, 1024), (1024, 1024), False, False),
}
HADAMARDS = {"256x128": (256, 128), "4096x128": (4096, 128), "4096x784": (4096, 784)}
OUTERS = {"128x784": (128, 784), "10x128": (10, 128)}  # dW += delta a^T, one example


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MATMULS))
def test_matmul(benchmark, kit, case, dtype):
    what, shape_a, shape_b, trans_a, trans_b = MATMULS[case]
    kit.warm(dtype)
    a, b = kit.array(dtype, *shape_a), kit.array(dtype, *shape_b, seed=1)
    m, k = (shape_a[1], shape_a[0]) if trans_a else shape_a
    n = shape_b[0] if trans_b else shape_b[1]
    out = kit.be.empty((m, n), dtype)
    benchmark.group = f"matmul {m}x{k}x{n} ({what}) {dtype}"
    benchmark.extra_info.update(flops=2 * m * k * n, m=m, k=k, n=n, trans_a=trans_a, trans_b=trans_b)
    benchmark(kit.synced(lambda: kit.be.matmul(a, b, out, trans_a=trans_a, trans_b=trans_b)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(HADAMARDS))
def test_hadamard(benchmark, kit, case, dtype):
    shape = HADAMARDS[case]
    kit.warm(dtype)
    a, b = kit.array(dtype, *shape), kit.array(dtype, *shape, seed=1)
    out = kit.be.empty(shape, dtype)
    benchmark.group = f"hadamard {case} {dtype}"
    benchmark.extra_info.update(elements=shape[0] * shape[1])
    benchmark(kit.synced(lambda: kit.be.hadamard(a, b, out)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(OUTERS))
def test_outer(benchmark, kit, case, dtype):
    rows, cols = OUTERS[case]
    kit.warm(dtype)
    x, y = kit.array(dtype, rows), kit.array(dtype, cols, seed=1)
    out = kit.be.zeros((rows, cols), dtype)
    benchmark.group = f"outer product, accumulating (dW += d a^T) {case} {dtype}"
    benchmark.extra_info.update(flops=2 * rows * cols)
    benchmark(kit.synced(lambda: kit.be.outer(x, y, out, alpha=0.5, accumulate=True)))
