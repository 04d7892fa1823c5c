"""The JAX peer's two forms (fastbp.bench.peers.jax_throughput) train the same trajectory.

jax is not imported at collection (``find_spec``, not ``importorskip``): the peer sets
XLA_FLAGS for its first import of jax, and importing jax here first would take that away
from every test in the run.
"""

import importlib.util

import numpy as np
import pytest

from fastbp.bench import peers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="jax is not installed (pip install jax)")


def _xor(n, seed=0):
    X = np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32)
    return X, (X[:, :1] * X[:, 1:] > 0).astype(np.float32)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_scan_and_jit_forms_train_the_same_shuffled_trajectory(optimizer):
    # 13 rows in batches of 4 (a last batch of 1), 3 epochs, each reshuffled: the forms draw the
    # same permutations from the seed, so they must end at the same parameters and loss (float32)
    X, Y = _xor(13)
    kw = dict(sizes=[2, 8, 1], activation="sigmoid", loss="log_loss", X=X, Y=Y, batch_size=4, lr=0.1, epochs=3,
              optimizer=optimizer, seed=3, params=peers.init_params([2, 8, 1], 1), return_params=True)
    scan, jit = (peers.jax_throughput(**kw, form=form) for form in ("scan", "jit"))
    other_seed = peers.jax_throughput(**(kw | {"seed": 4}), form="scan")  # other shuffles, the same start
    for (w, b), (jw, jb), (ow, _) in zip(scan["params"], jit["params"], other_seed["params"]):
        assert w.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_allclose(w, jw, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b, jb, rtol=0, atol=1e-6)
        assert np.abs(w - ow).max() > 1e-4  # the order mattered, so agreeing above means something
    assert scan["final_loss"] == pytest.approx(jit["final_loss"], rel=1e-5)
    assert {scan["n_samples"], jit["n_samples"]} == {13} and scan["form"] == "scan" and jit["form"] == "jit"

    # a later call reuses the compiled functions, and no epoch (nor seed) traced them again
    again = peers.jax_throughput(**kw, form="scan")
    assert not again["compiled_now"]
    np.testing.assert_array_equal(again["params"][0][0], scan["params"][0][0])
    mine = [fns for key, fns in peers._JAX_FUNCTIONS.items() if key[:4] == ((2, 8, 1), "sigmoid", "log_loss", 4)]
    assert len(mine) >= 2  # scan and jit
    for fns in mine:
        for name, fn in fns.items():
            if hasattr(fn, "_cache_size"):  # the jitted ones: one trace each, whatever the epoch
                assert fn._cache_size() == 1, name
