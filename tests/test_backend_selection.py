"""Backend registry and selection: lazy imports, FASTBP_BACKEND, explicit choices, errors."""

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time

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
    """A copy of the source tree that no installer knows about still finds ``fastbp.kernels``.

    Run from the copy's root (./fastbp shadows anything installed) with the editable
    install's import hook removed, so only backend.py's fallback loader can resolve
    ``fastbp.kernels`` from ``kernels/`` beside ``fastbp/``.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    for package in ("fastbp", "kernels"):
        shutil.copytree(os.path.join(root, package), src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__module__', '').lower()]; "
            "import fastbp as fb, fastbp.kernels.numpy as kn; fb.set_backend('numpy'); "
            "print(fb.__file__, fb.kernels.__file__, kn.__file__, fb.MLP([2, 1]).predict([[0, 0]]).shape)")
    full_env = {k: v for k, v in os.environ.items() if k not in ("FASTBP_BACKEND", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=src, timeout=120)
    assert proc.returncode == 0, proc.stderr
    package, kernels, numpy_kernels, shape = proc.stdout.split(maxsplit=3)
    assert package == str(src / "fastbp" / "__init__.py")
    assert kernels == str(src / "kernels" / "__init__.py")
    assert numpy_kernels == str(src / "kernels" / "numpy.py")
    assert shape.strip() == "(1, 1)"


# ---------------------------------------------------------------- scope: threads and contexts
@pytest.fixture
def two_backends():
    names = fb.available_backends()
    if len(names) < 2:
        pytest.skip("needs two usable backends")
    return names[0], names[1]


@pytest.fixture
def keep_default():
    """Restore the process default after a test that calls set_backend."""
    from fastbp import backend as registry

    saved = registry._process_default()
    yield saved
    registry._default = saved


def test_use_backend_is_per_thread(two_backends):
    """Two threads inside their own ``use_backend`` at the same time each see their own."""
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def work(name):
        with fb.use_backend(name):
            barrier.wait()  # both scopes are open now
            seen[name] = [(fb.get_backend().name, fb.MLP([2, 2]).backend.name) for _ in range(20)]
            barrier.wait()

    threads = [threading.Thread(target=work, args=(name,)) for name in two_backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in two_backends:
        assert seen[name] == [(name, name)] * 20


def test_new_thread_starts_from_the_process_default(two_backends):
    default = fb.get_backend().name
    other = next(n for n in two_backends if n != default)
    seen = []
    with fb.use_backend(other):
        t = threading.Thread(target=lambda: seen.append(fb.get_backend().name))
        t.start()
        t.join()
        assert fb.get_backend().name == other
    assert seen == [default]


def test_use_backend_is_per_asyncio_task(two_backends):
    async def task(name, started, both):
        with fb.use_backend(name):
            started.set()
            await both.wait()
            return [fb.get_backend().name for _ in range(3)]

    async def main():
        events = [asyncio.Event() for _ in two_backends]
        both = asyncio.Event()
        tasks = [asyncio.create_task(task(n, e, both)) for n, e in zip(two_backends, events)]
        for e in events:
            await e.wait()
        both.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [[n] * 3 for n in two_backends]


def test_set_backend_is_the_process_default(two_backends, keep_default):
    first, second = two_backends
    fb.set_backend(first)
    seen = []
    with fb.use_backend(second):
        t = threading.Thread(target=lambda: seen.append(fb.get_backend().name))
        t.start()
        t.join()
    assert seen == [first]  # a scope elsewhere does not leak into other threads
    t = threading.Thread(target=lambda: fb.set_backend(second))
    t.start()
    t.join()
    assert fb.get_backend().name == second  # set in another thread: the default for all


def test_set_backend_inside_a_scope(two_backends, keep_default):
    first, second = two_backends
    fb.set_backend(first)
    with fb.use_backend(first):
        fb.set_backend(second)
        assert fb.get_backend().name == second  # the caller sees what it asked for
    assert fb.get_backend().name == second  # and it is the default after the scope


def test_rejected_use_backend_changes_nothing(two_backends):
    before = fb.get_backend()
    with fb.use_backend(two_backends[1]):
        inner = fb.get_backend()
        with pytest.raises(ValueError, match="Received: name='tpu'"):
            with fb.use_backend("tpu"):
                pass
        with pytest.raises(TypeError, match="name must be a str"):
            with fb.use_backend(None):
                pass
        assert fb.get_backend() is inner
    assert fb.get_backend() is before


def test_first_use_from_many_threads_creates_one_instance(monkeypatch):
    """Backends resolved for the first time from several threads at once: one instance each."""
    from fastbp import backend as registry

    import fastbp.kernels.numpy as numpy_kernels

    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_failures", {})
    real_create = numpy_kernels.create

    def slow_create():  # widens the window in which a second thread could create its own
        time.sleep(0.05)
        return real_create()

    monkeypatch.setattr(numpy_kernels, "create", slow_create)
    barrier = threading.Barrier(4, timeout=30)
    got = []

    def work():
        barrier.wait()
        got.append(registry._load("numpy"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(b is got[0] for b in got)
