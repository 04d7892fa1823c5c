"""kernels/blas.py: which BLAS library the Numba backend's GEMMs call (FASTBP_BLAS), and that
every library it can bind trains to the same numbers as the NumPy reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

from fastbp.errors import BackendUnavailableError  # noqa: E402
from fastbp.kernels import blas  # noqa: E402

HAVE_MKL = blas.mkl_library() is not None
LIBRARIES = ["openblas", pytest.param("mkl", marks=pytest.mark.skipif(not HAVE_MKL, reason="mkl not installed"))]


def test_a_bad_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"FASTBP_BLAS='bogus'.*\['auto', 'openblas', 'mkl'\]"):
        blas.choose("bogus")


def test_mkl_asked_for_but_not_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(blas, "mkl_library", lambda: None)
    with pytest.raises(BackendUnavailableError, match=r"mkl package is not installed.*fastbp\[mkl\]"):
        blas.choose("mkl")


@pytest.mark.parametrize("vendor,have_mkl,expected", [
    ("GenuineIntel", False, "openblas"), ("AuthenticAMD", True, "openblas"), ("AuthenticAMD", False, "openblas"),
    pytest.param("GenuineIntel", True, "mkl", marks=pytest.mark.skipif(not HAVE_MKL, reason="mkl not installed")),
])
def test_auto_takes_mkl_only_where_installed_on_an_intel_cpu(monkeypatch, vendor, have_mkl, expected):
    real = blas.mkl_library()
    monkeypatch.setattr(blas, "mkl_library", lambda: real if have_mkl else None)
    monkeypatch.setattr(blas, "cpu_vendor", lambda: vendor)
    for requested in (None, "", " AUTO "):
        chosen = blas.choose(requested)
        assert chosen.name == expected and chosen.reason.startswith("auto:")
        assert chosen.sgemm and chosen.dgemm


def test_the_process_binding_is_what_the_backend_reports():
    import fastbp as fb

    be = fb.backend._create("numba")
    lib = blas.active()
    assert be.blas_library is lib
    info = be.info()
    assert info["blas_used"]["library"] == lib.name and info["blas_used"]["reason"] == lib.reason


_TRAIN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastbp as fb
    rng = np.random.default_rng(3)
    out = {}
    for sizes, batch in (([7, 9, 5, 3], 8), ([130, 70, 40, 4], 16)):  # hand loops, then BLAS GEMMs
        X = rng.standard_normal((40, sizes[0]))
        Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], 40)]
        for opt in ("sgd", "adam"):
            for name in ("numpy", "numba"):
                fb.set_backend(name)
                net = fb.MLP(sizes, activation="tanh", loss="cross_entropy", dtype="float64", seed=1)
                net.fit(X, Y, epochs=2, batch_size=batch, optimizer=opt, seed=2, progress=False)
                flat = lambda pair: np.concatenate([a.ravel() for part in pair for a in part]).tolist()
                out[f"{sizes[0]}-{opt}-{name}"] = [flat(net.get_params()), flat(net.gradients(X, Y))]
    be = fb.backend._create("numba")
    out["library"] = be.info()["blas_used"]["library"]
    print(json.dumps(out))
""")


def _run(env_value: str, code: str):
    env = dict(os.environ, FASTBP_BLAS=env_value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_library_trains_as_the_numpy_reference(library):
    """Compiled mini-batch epochs (hand-loop and BLAS products, plain SGD fused into the GEMM,
    Adam through the update pass) and the per-batch gradient, float64, in a process bound to
    ``library``, against the NumPy backend at 1e-10."""
    proc = _run(library, _TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("library") == library
    for key in [k for k in out if k.endswith("-numba")]:
        ref = out[key.replace("-numba", "-numpy")]
        for got, want in zip(out[key], ref):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=key)


def test_a_bad_variable_fails_the_backend_not_the_import():
    code = textwrap.dedent("""
        import fastbp as fb
        from fastbp.kernels import numba_kernels  # importing the kernels does not fail
        try:
            fb.backend._create("numba")
        except ValueError as exc:
            print("ValueError:", exc)
    """)
    proc = _run("nonsense", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError: unknown BLAS library. Received: FASTBP_BLAS='nonsense'" in proc.stdout
