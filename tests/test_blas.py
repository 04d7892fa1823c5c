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
    with pytest.raises(BackendUnavailableError, match=r"FASTBP_BLAS='bogus'.*\['auto', 'openblas', 'mkl'\]"):
        blas.choose("bogus")


def test_an_incomplete_mkl_install_is_refused_before_it_can_exit_the_process(monkeypatch):
    monkeypatch.setattr(blas, "_mkl_files", lambda: (None, ["libmkl_core.so"]))
    with pytest.raises(BackendUnavailableError, match="mkl install is incomplete .no libmkl_core.so"):
        blas.choose("mkl")
    monkeypatch.setattr(blas, "cpu_vendor", lambda: "GenuineIntel")
    chosen = blas.choose("auto")
    assert chosen.name == "openblas" and "incomplete" in chosen.reason


def test_mkl_asked_for_but_not_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(blas, "mkl_library", lambda: None)
    with pytest.raises(BackendUnavailableError, match=r"mkl package is not installed.*fastbp\[mkl\]"):
        blas.choose("mkl")


@pytest.mark.parametrize("vendor,have_mkl,expected", [
    ("GenuineIntel", False, "openblas"), ("AuthenticAMD", True, "openblas"), ("AuthenticAMD", False, "openblas"),
    pytest.param("GenuineIntel", True, "mkl", marks=pytest.mark.skipif(not HAVE_MKL, reason="mkl not installed")),
])
def test_auto_takes_mkl_only_where_installed_on_an_intel_cpu(monkeypatch, vendor, have_mkl, expected):
    # where mkl is absent a made-up path stands for it: the branches that do not take MKL never load it
    path = blas.mkl_library() or "/nonexistent/libmkl_rt.so.2"
    monkeypatch.setattr(blas, "mkl_library", lambda: path if have_mkl else None)
    monkeypatch.setattr(blas, "cpu_vendor", lambda: vendor)
    for requested in (None, "", " AUTO "):
        chosen = blas.choose(requested)
        assert chosen.name == expected and chosen.reason.startswith("auto:")
        assert chosen.sgemm and chosen.dgemm
        if vendor != "GenuineIntel" and have_mkl:
            assert "AuthenticAMD" in chosen.reason


def test_the_process_binding_is_what_the_backend_reports():
    """The symbols compiled code calls hold the chosen library's functions, and the thread
    controller the backend drives is that library's own file."""
    import llvmlite.binding as llvm

    import fastbp as fb

    be = fb.backend._create("numba")
    lib = blas.active()
    assert llvm.address_of_symbol("fastbp_sgemm") == lib.sgemm and llvm.address_of_symbol("fastbp_dgemm") == lib.dgemm
    # SciPy's capsules point at cython_blas's wrappers; the path is the BLAS file behind them
    assert blas._blas_behind(blas._library_file(lib.sgemm)) == lib.path and os.path.exists(lib.path)
    assert "cython_blas" not in lib.path
    assert be._blas is not None and os.path.realpath(be._blas.filepath) == lib.path
    info = be.info()
    assert info["blas_used"]["library"] == lib.name and info["blas_used"]["reason"] == lib.reason
    assert info["blas_threads"] == be._blas.get_num_threads()


_TRAIN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastbp as fb
    rng = np.random.default_rng(3)
    out = {}
    for sizes, batch, dtype in (([7, 9, 5, 3], 8, "float64"), ([130, 70, 40, 4], 16, "float64"),
                                ([130, 70, 40, 4], 16, "float32")):  # hand loops, then BLAS GEMMs
        X = rng.standard_normal((40, sizes[0]))
        Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], 40)]
        for opt in ("sgd", "adam"):
            for name in ("numpy", "numba"):
                fb.set_backend(name)
                net = fb.MLP(sizes, activation="tanh", loss="cross_entropy", dtype=dtype, seed=1)
                net.fit(X, Y, epochs=2, batch_size=batch, optimizer=opt, seed=2, progress=False)
                flat = lambda pair: np.concatenate([a.ravel() for part in pair for a in part]).tolist()
                out[f"{sizes[0]}-{dtype}-{opt}-{name}"] = [flat(net.get_params()), flat(net.gradients(X, Y))]
    be = fb.backend._create("numba")
    out["library"] = be.info()["blas_used"]["library"]
    print(json.dumps(out))
""")


def _run(env_value: str, code: str, timeout: float = 600, **more_env):
    env = dict(os.environ, FASTBP_BLAS=env_value, **more_env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_library_trains_as_the_numpy_reference(library):
    """Compiled mini-batch epochs (hand-loop and BLAS products, plain SGD fused into the GEMM,
    Adam through the update pass) and the per-batch gradient, in a process bound to
    ``library``, against the NumPy backend: float64 at 1e-10, float32 at 1e-4."""
    proc = _run(library, _TRAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("library") == library
    for key in [k for k in out if k.endswith("-numba")]:
        ref = out[key.replace("-numba", "-numpy")]
        tol = dict(rtol=1e-10, atol=1e-12) if "float64" in key else dict(rtol=1e-4, atol=1e-5)
        for got, want in zip(out[key], ref):
            np.testing.assert_allclose(got, want, err_msg=key, **tol)


def test_a_bad_variable_fails_the_backend_not_the_import_nor_a_direct_kernel_call():
    """numba unavailable, saying why; auto falls back to numpy; a kernel called directly still
    has a BLAS bound (it would jump to address 0 otherwise)."""
    code = textwrap.dedent("""
        import numpy as np
        import fastbp as fb
        from fastbp.kernels import numba_kernels as K  # importing the kernels does not fail
        try:
            fb.backend._create("numba")
        except fb.BackendUnavailableError as exc:
            print("unavailable:", exc)
        print("available:", fb.available_backends())
        A, B, C = np.ones((2, 3)), np.ones((3, 4)), np.zeros((2, 4))
        K.gemm(False, False, 1.0, A, B, 0.0, C)
        print("direct gemm:", C.sum())
    """)
    proc = _run("nonsense", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unavailable: backend 'numba' is unavailable: unknown BLAS library. Received: FASTBP_BLAS='nonsense'" in proc.stdout
    assert "'numba'" not in proc.stdout.split("\navailable: ")[1].splitlines()[0]
    assert "direct gemm: 24.0" in proc.stdout


def test_a_forked_child_trains_per_example_after_its_parent_used_libgomps_own_pool():
    """The per-example rows' team beside OpenBLAS is libgomp's own pool, which does not survive
    fork(): the child must train without it (a region there would wait forever)."""
    if not blas._loadable("libgomp.so.1"):
        pytest.skip("no libgomp here: no per-example team to fork")
    code = textwrap.dedent("""
        import os, signal
        import numpy as np
        import fastbp as fb
        from fastbp.kernels import blas
        from fastbp.kernels import numba_kernels as K
        be = fb.backend._create("numba")
        be.set_threads(2)
        X, y = np.random.default_rng(0).random((64, 600)), np.arange(64) % 3
        fit = lambda: fb.MLP([600, 60, 3], loss="cross_entropy", seed=0).fit(
            X, y, epochs=1, batch_size=1, progress=False, threads=2, optimizer=fb.optim.SGD(lr=0.1, momentum=0.9))
        with fb.use_backend("numba"):
            fit()  # 36k first-layer weights: the rows ran on the pool (the callback compiled here)
            print("pool:", blas._OWN_POOL_PID == os.getpid() and K.callback_loaded(np.float32, "example"))
            pid = os.fork()
            if pid == 0:
                signal.alarm(60)  # a hang ends the child rather than leave it behind
                fit()
                os._exit(0 if blas.own_libgomp() == (0, 0, 0) else 3)
        _, status = os.waitpid(pid, 0)
        print("child:", os.waitstatus_to_exitcode(status))
    """)
    proc = _run("openblas", code, timeout=120, FASTBP_COMPILE_HELPER="0")  # a hang fails as TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pool: True" in proc.stdout and "child: 0" in proc.stdout


@pytest.mark.skipif(not HAVE_MKL, reason="mkl not installed")
def test_a_forked_child_of_an_mkl_parent_trains_on_one_thread():
    """libgomp's pool does not survive fork(): a 2-thread MKL GEMM, or an update pass on its
    team, in the child would hang."""
    if not blas._loadable("libgomp.so.1"):
        pytest.skip("no libgomp here: MKL runs sequentially, nothing to cap")
    code = textwrap.dedent("""
        import os, sys
        import numpy as np
        import fastbp as fb
        be = fb.backend._create("numba")
        be.set_threads(2)
        a = np.ones((400, 400)); out = np.empty((400, 400))
        be.matmul(a, a, out)  # the parent's pool is running
        X, y = np.random.default_rng(0).random((256, 600)), np.arange(256) % 3
        fit = lambda: fb.MLP([600, 60, 3], loss="cross_entropy", seed=0).fit(X, y, epochs=1, batch_size=128, progress=False, threads=2,
                                                       optimizer=fb.optim.SGD(lr=0.1, momentum=0.9))
        with fb.use_backend("numba"):
            fit()  # and its update passes' team (36k weights in the first layer)
        pid = os.fork()
        if pid == 0:
            be.matmul(a, a, out)
            with fb.use_backend("numba"):
                fit()
            os._exit(0 if out[0, 0] == 400 and be.info()["blas_threads_policy"]["threads"] == 1 else 3)
        _, status = os.waitpid(pid, 0)
        print("child:", os.waitstatus_to_exitcode(status))
    """)
    proc = _run("mkl", code, timeout=120)  # a hang fails as TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child: 0" in proc.stdout
