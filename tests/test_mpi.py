"""Data-parallel fit over MPI: the same model as one process, on every rank; failures never hang.

Each test launches ``mpiexec -n 2`` or ``-n 3`` on tests/mpi_worker.py as a subprocess with a
timeout (a hang fails the test instead of blocking CI) and compares what every rank saw with the
single-process fits computed here. Skipped when mpi4py or mpiexec is missing.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastbp as fb
from fastbp import training

sys.path.insert(0, str(Path(__file__).parent))
import mpi_worker as worker  # noqa: E402

WORKER = Path(__file__).with_name("mpi_worker.py")
TIMEOUT_S = 240  # generous for a loaded 2-core machine; a hang shows up as a failure after it


def _mpiexec():
    """The mpiexec beside this interpreter (the mpich wheel's, matching mpi4py) or on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


pytestmark = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
                                reason="needs mpi4py and mpiexec (pip install 'fastbp[mpi]')")


def launch(n, case, tmp_path, *extra, backend="numpy", timeout=TIMEOUT_S):
    """Run ``case`` on ``n`` ranks; returns (exit status, output); a hang fails the test."""
    env = dict(os.environ, FASTBP_BACKEND=backend, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(WORKER), case, str(tmp_path), *map(str, extra)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a hang is killed whole
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {case} hung for {timeout} s; output:\n{output}")
    return proc.returncode, output


def run_ranks(n, case, tmp_path, *extra, backend="numpy"):
    """Run ``case`` on ``n`` ranks; returns every rank's pickled record."""
    returncode, output = launch(n, case, tmp_path, *extra, backend=backend)
    assert returncode == 0, f"mpiexec -n {n} {case} failed ({returncode}):\n{output}"
    records = []
    for rank in range(n):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            records.append(pickle.load(f))
    assert all(r["size"] == n for r in records), "the ranks did not share one communicator"
    return records


def _memmap_files(tmp_path):
    X, y = worker.data(seed=7)
    np.save(tmp_path / "X.npy", X.astype(np.float32))  # float32 on disk, float64 model: cast per chunk
    np.save(tmp_path / "y.npy", y.astype(np.int16))
    return tmp_path


_RUNS: dict = {}


@pytest.fixture(params=[(2, "numpy"), (3, "numpy"), (2, "numba")], ids=lambda p: f"{p[0]}ranks-{p[1]}")
def equivalence(request, tmp_path_factory):
    """The equivalence case's records on 2 and 3 ranks, and on 2 with the Numba backend's kernels
    (one mpiexec run each, shared by the tests that read them)."""
    n, backend = request.param
    if backend not in fb.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    if request.param not in _RUNS:
        tmp = tmp_path_factory.mktemp(f"mpi{n}{backend}")
        _RUNS[request.param] = (tmp, run_ranks(n, "equivalence", tmp, _memmap_files(tmp), backend=backend))
    return _RUNS[request.param]


def test_fit_matches_one_process_on_every_rank(equivalence):
    tmp_path, records = equivalence
    for name, seed, fit_data, kwargs in worker.equivalence_cases(tmp_path):
        params, history, steps = worker.fit_case(seed, fit_data, kwargs)
        for rank, rec in enumerate(records):
            got_params, got_history, got_steps = rec[name]
            np.testing.assert_allclose(got_params, params, rtol=1e-10, atol=1e-12, err_msg=f"{name} rank {rank}")
            assert got_history.keys() == history.keys(), name
            for key in history:
                np.testing.assert_allclose(got_history[key], history[key], rtol=1e-10, err_msg=f"{name} {key}")
            assert got_steps == steps, name
        for rec in records[1:]:  # the ranks agree exactly, not only to a tolerance
            assert np.array_equal(rec[name][0], records[0][name][0]), name


def test_rank_0_parameters_and_shuffle_stream_are_broadcast(equivalence):
    records = equivalence[1]
    X, y = worker.data()
    net = worker.model(seed=0)  # rank 0's model
    history = training.fit(net, X, y, epochs=2, batch_size=9, optimizer="adam", progress=False)
    for rec in records:
        params, hist, rng_state = rec["rank0_wins"]
        np.testing.assert_allclose(params, net._params, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hist, list(history), rtol=1e-10)
        assert rng_state == net._rng.bit_generator.state  # every rank's stream continues as rank 0's


def test_host_staged_allreduce_for_gpu_buffers(equivalence):
    records = equivalence[1]
    size = len(records)
    rows = np.arange(1, size + 1, dtype=float)  # rank r: r + 1 rows whose mean gradient is r + 1
    for rec in records:
        cuda_aware, grads, loss, correct, params = rec["staged"]
        assert cuda_aware is False  # the MPICH wheel reports no CUDA support: buffers go via the host
        np.testing.assert_allclose(grads, np.full(5, (rows * rows).sum() / rows.sum()), rtol=1e-6)
        assert loss == 2.0 * rows.sum() and correct == sum(range(size))
        np.testing.assert_array_equal(params, np.zeros(3))  # rank 0's


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_bad_input_and_divergence_raise_alike_on_every_rank(tmp_path, n_ranks):
    records = run_ranks(n_ranks, "errors", tmp_path)
    expected_fragment = {
        "nan_on_rank_1": ("ValueError", "on rank 1 of"),
        "epochs_differ": ("ValueError", "fit arguments differ between ranks"),
        "batch_below_ranks": ("ValueError", "batch_size is smaller than the number of MPI ranks"),
        "labels_out_of_range_on_rank_1": ("ValueError", "class labels out of range"),
    }
    for name, (kind, fragment) in expected_fragment.items():
        first = records[0][name]
        assert first is not None and first[0] == kind and fragment in first[1], (name, first)
        for rec in records:
            assert rec[name] == first, (name, rec[name], first)  # the same type and message everywhere
            assert rec[name + "_unchanged"], f"{name}: a rejected fit changed the parameters"
    assert "NaN or Inf" in records[0]["nan_on_rank_1"][1]

    big, fit_data, kwargs = worker.diverging()
    with pytest.raises(fb.TrainingDivergedError) as single:
        training.fit(big, *fit_data, **kwargs)
    assert len(single.value.history) == 1  # one finite epoch, then the second diverges
    for rec in records:
        (kind, message), epochs_done, params, steps = rec["diverged"]
        assert kind == "TrainingDivergedError" and message == str(single.value)
        assert epochs_done == len(single.value.history)
        np.testing.assert_allclose(params, big._params, rtol=1e-10, atol=1e-12)
        assert steps == big.optimizer.state.steps

    params, history, _ = worker.fit_case(1, worker.data(), dict(epochs=1, batch_size=7, seed=5))
    for rec in records:
        np.testing.assert_allclose(rec["after"][0], params, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_that_dies_ends_the_job(tmp_path, how):
    returncode, output = launch(3, "dying", tmp_path, how, timeout=120)
    assert returncode != 0
    assert "finished" not in output
    if how == "raise":
        assert "rank 1 fails on purpose" in output


def test_comm_must_be_a_communicator():
    net = worker.model()
    before = net._params.copy()
    X, y = worker.data()
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        training.fit(net, X, y, comm="COMM_WORLD")
    assert np.array_equal(net._params, before)


def test_import_fastbp_does_not_import_mpi4py():
    code = "import fastbp, fastbp.parallel, fastbp.data, sys; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
