"""Backend registry and selection: lazy imports, FASTBP_BACKEND, explicit choices, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastbp as fb


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter (the env var is read once, at import)."""
    full_env = {k: v for k, v in os.environ.items() if k != "FASTBP_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)


def test_import_is_light():
    proc = run_python("import sys, fastbp; print('numba' in sys.modules, 'cupy' in sys.modules, "
                      "'sklearn' in sys.modules, 'torch' in sys.modules, 'tqdm' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"] * 5


def test_numpy_backend_does_not_import_numba_or_cupy():
    proc = run_python("import sys, fastbp as fb; fb.set_backend('numpy'); fb.MLP([2, 2]).predict([[1, 2]]); "
                      "print('numba' in sys.modules, 'cupy' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", fb.available_backends())
def test_env_var_selects_backend(name):
    proc = run_python("import fastbp as fb; print(fb.get_backend().name, fb.MLP([2, 3]).backend.name)",
                      FASTBP_BACKEND=name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [name, name]


def test_env_var_auto_picks_the_fastest_usable():
    proc = run_python("import fastbp as fb; print(fb.get_backend().name)", FASTBP_BACKEND="auto")
    assert proc.returncode == 0, proc.stderr
    usable = fb.available_backends()
    expected = next(b for b in ("cupy", "numba", "numpy") if b in usable)
    assert proc.stdout.strip() == expected


def test_env_var_unknown_name_is_a_clear_error():
    proc = run_python("import fastbp as fb; fb.get_backend()", FASTBP_BACKEND="tpu")
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr
    assert "FASTBP_BACKEND='tpu'" in proc.stderr
    assert "['auto', 'cupy', 'numba', 'numpy']" in proc.stderr


def test_env_var_is_read_once_at_import():
    proc = run_python("import os, fastbp as fb; os.environ['FASTBP_BACKEND'] = 'tpu'; print(fb.get_backend().name)",
                      FASTBP_BACKEND="numpy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy"


def test_set_backend_unknown_name():
    before = fb.get_backend()
    with pytest.raises(ValueError, match=r"Received: name='gpu'. Expected one of \['auto', 'cupy', 'numba', 'numpy'\]"):
        fb.set_backend("gpu")
    with pytest.raises(TypeError, match="name must be a str"):
        fb.set_backend(3)
    assert fb.get_backend() is before


def test_unavailable_backend_raises_with_reason_and_fix():
    status = fb.backend_status()
    missing = [name for name, why in status.items() if why is not None]
    if not missing:
        pytest.skip("every backend is usable on this machine")
    before = fb.get_backend()
    for name in missing:
        with pytest.raises(fb.BackendUnavailableError) as info:
            fb.set_backend(name)
        err = info.value
        assert err.backend == name and err.reason
        assert "pip install" in err.fix or "driver" in err.fix
        assert name in str(err) and err.reason in str(err)
        assert fb.get_backend() is before  # no silent fallback, no change


def test_use_backend_is_scoped():
    outer = fb.get_backend()
    with fb.use_backend("numpy") as be:
        assert be.name == "numpy" and fb.get_backend() is be
        net = fb.MLP([2, 2])
    assert fb.get_backend() is outer
    assert net.backend.name == "numpy"  # a model stays on the backend it was made on


def test_available_backends_always_has_numpy():
    names = fb.available_backends()
    assert "numpy" in names
    assert set(names) <= {"numpy", "numba", "cupy"}


def test_to_numpy_from_lists_and_arrays(backend):
    arr = backend.asarray(np.arange(6.0).reshape(2, 3))
    out = fb.to_numpy(arr)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    assert fb.to_numpy([[1, 2]]).shape == (1, 2)


def test_source_tree_imports_without_install(tmp_path):
    """Run from the repository root (./fastbp shadows site-packages): fastbp.kernels still resolves."""
    proc = run_python("import fastbp as fb; fb.set_backend('numpy'); print(fb.MLP([2, 1]).predict([[0, 0]]).shape)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 1)"
