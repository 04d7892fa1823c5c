"""The command line: `fastbp bench`, `fastbp info`, `python -m fastbp`, and their argument errors.

Everything runs in a subprocess with this interpreter, as a user would run it;
the benchmark runs use a tiny model so the file takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastbp as fb
from fastbp import bench
from fastbp.bench import report as bench_report

TINY = ["bench", "--quick", "--backends", "numpy", "--sizes", "8,4,2", "--batch-sizes", "1,8",
        "--repeat", "2", "--min-time", "0.01", "--no-progress"]


def fastbp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTBP_BACKEND"}
    return subprocess.run([sys.executable, "-m", "fastbp", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_version_and_python_m():
    proc = fastbp("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastbp {fb.__version__}"


def test_no_command_says_what_to_do():
    proc = fastbp()
    assert proc.returncode == 2
    assert "choose a command" in proc.stderr and "bench" in proc.stderr


def test_bench_help_lists_the_options():
    proc = fastbp("bench", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--backends", "--sizes", "--batch-sizes", "--dtype", "--repeat", "--quick", "--out",
                   "--plot", "--peers"):
        assert option in proc.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("fastbp")
    if not script.exists():
        pytest.skip("no fastbp console script beside this interpreter (fastbp not pip-installed here)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and fb.__version__ in proc.stdout


@pytest.mark.parametrize(
    "args, names",
    [
        (["--sizes", "784,x,10"], ["--sizes", "'x'"]),
        (["--sizes", "784"], ["--sizes", "at least 2"]),
        (["--sizes", "784,0,10"], ["--sizes", "'0'"]),
        (["--backends", "tpu"], ["--backends", "'tpu'", "numpy"]),
        (["--batch-sizes", "0,8"], ["--batch-sizes", "'0'"]),
        (["--batch-sizes", "1,many"], ["--batch-sizes", "'many'"]),
        (["--samples", "8", "--batch-sizes", "1,16"], ["--batch-sizes", "16", "--samples 8"]),
        (["--dtype", "float16"], ["--dtype", "float16", "float32"]),
        (["--repeat", "0"], ["--repeat", "'0'"]),
        (["--peers", "tensorflow"], ["--peers", "'tensorflow'", "torch"]),
    ],
    ids=["sizes-not-int", "sizes-too-short", "sizes-zero", "unknown-backend", "batch-zero", "batch-not-int",
         "batch-over-samples", "bad-dtype", "repeat-zero", "unknown-peer"],
)
def test_argument_errors_are_clear(args, names):
    proc = fastbp("bench", *args)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr
    assert "fastbp bench: error:" in proc.stderr
    for name in names:
        assert name in proc.stderr


def test_unavailable_backend_is_refused_with_the_reason():
    unavailable = {n: why for n, why in bench.backend_status().items() if why is not None}
    if not unavailable:
        pytest.skip("every backend is usable on this machine")
    name, why = next(iter(unavailable.items()))
    proc = fastbp("bench", "--backends", name, "--quick")
    assert proc.returncode == 2
    assert f"{name!r} is unavailable here" in proc.stderr and why in proc.stderr


def test_quick_bench_writes_valid_json_and_plot(tmp_path):
    out, png = tmp_path / "res" / "bench.json", tmp_path / "bench.png"
    plot = ["--plot", str(png)] if bench_report.matplotlib_missing() is None else []
    proc = fastbp(*TINY, "--out", str(out), *plot)
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and "JIT compile" in proc.stdout and f"wrote {out}" in proc.stdout

    record = json.loads(out.read_text())
    assert record["schema"] == bench.SCHEMA and record["fastbp_version"] == fb.__version__
    assert record["config"]["isolate"] is True and isinstance(record["backends"]["numpy"]["pid"], int)
    for key in ("config", "machine", "matmul_peak", "backends", "flops", "summary", "elapsed_s"):
        assert key in record
    for key in ("cpu_model", "cpus", "blas", "gpu", "versions", "load_average"):
        assert key in record["machine"]
    assert record["config"]["sizes"] == [8, 4, 2] and record["config"]["batch_sizes_resolved"] == [1, 8]
    assert record["flops"]["per_example"] == bench.flops_per_example([8, 4, 2])
    assert record["matmul_peak"]["cpu"]["gflops_best"] > 0

    numpy_rec = record["backends"]["numpy"]
    assert numpy_rec["status"] == "ok"
    assert numpy_rec["jit"]["seconds"] >= 0
    grad = numpy_rec["gradient"]
    for strategy in ("loop", "vectorized"):
        assert len(grad[strategy]["times_s"]) == 2
        s = grad[strategy]["seconds"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert grad["speedup"] == pytest.approx(grad["loop"]["seconds"]["median"] / grad["vectorized"]["seconds"]["median"])
    rows = numpy_rec["training"]
    assert [r["batch_size"] for r in rows] == [1, 8]
    for row in rows:
        assert len(row["samples_per_s_all"]) == 2 and row["samples_per_s"]["median"] > 0
        assert row["n"] % row["batch_size"] == 0
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # backends not run here are listed with the reason
    for name, why in record["backend_status"].items():
        if why is not None:
            assert record["backends"][name]["status"] == "unavailable"

    # a saved record prints again, as tables or as the README's Markdown table
    again = fastbp("report", str(out))
    assert again.returncode == 0, again.stderr
    assert "speedup" in again.stdout and "Training throughput, numpy" in again.stdout
    markdown = fastbp("report", str(out), "--markdown")
    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout.startswith("| |") and "speedup, vectorized vs loop" in markdown.stdout


def test_in_process_run_gives_the_same_record_shape(tmp_path):
    out = tmp_path / "in-process.json"
    proc = fastbp(*TINY, "--batch-sizes", "4", "--in-process", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["config"]["isolate"] is False
    assert [r["batch_size"] for r in record["backends"]["numpy"]["training"]] == [4]
    assert "pid" not in record["backends"]["numpy"]  # no worker process was used


def test_report_refuses_a_file_that_is_not_a_record(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"schema": "something-else"}')
    proc = fastbp("report", str(path))
    assert proc.returncode == 2
    assert "not a fastbp bench record" in proc.stderr and "something-else" in proc.stderr
    missing = fastbp("report", str(tmp_path / "absent.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_missing_peers_never_fail_the_run(tmp_path):
    out = tmp_path / "peers.json"
    proc = fastbp(*TINY, "--batch-sizes", "8", "--peers", "torch,sklearn", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    peers = json.loads(out.read_text())["peers"]
    assert set(peers) == {"torch", "sklearn"}
    for rec in peers.values():
        assert rec["status"] in ("ok", "unavailable", "error")
        if rec["status"] != "ok":
            assert rec.get("reason") or rec.get("error")


def test_info_lists_every_backend():
    proc = fastbp("info")
    assert proc.returncode == 0, proc.stderr
    assert f"fastbp {fb.__version__}" in proc.stdout
    for name in fb.BACKEND_NAMES:
        assert f"  {name}" in proc.stdout
    for line in ("BLAS:", "GPU:", "numpy"):
        assert line in proc.stdout


def test_info_json():
    proc = fastbp("info", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert set(record["backends"]) == set(fb.BACKEND_NAMES)
    assert record["backends"]["numpy"]["usable"] is True
    for entry in record["backends"].values():
        assert entry["usable"] or entry["why_not"]


def test_flop_count():
    # forward 2*in*out and weight gradient 2*in*out per layer; input gradient all but the first layer
    assert bench.flops_per_example([784, 128, 10]) == 2 * 784 * 128 * 2 + 2 * 128 * 10 * 3
    assert bench.flops_per_example([3, 1]) == 12


class _CountingDevice:
    """Stands in for a GPU backend: records the order of launches and synchronisations."""

    name, is_gpu = "fake-gpu", True

    def __init__(self):
        self.events = []

    def synchronize(self):
        self.events.append("sync")

    def asarray(self, x, dtype):
        return x.astype(dtype)

    def empty(self, shape, dtype):
        import numpy as np
        return np.empty(shape, dtype)

    def matmul(self, a, b, out):
        self.events.append("gemm")


def test_every_timed_region_is_synchronised():
    dev = _CountingDevice()
    timing = bench.time_calls(lambda: dev.events.append("call"), dev.synchronize, repeat=3, min_time=0.0)
    assert timing["inner"] == 1 and len(timing["times_s"]) == 3
    # calibration + 3 repeats, each region: sync, call, sync
    assert dev.events == ["sync", "call", "sync"] * 4

    dev.events.clear()
    peak = bench.measure_matmul_peak("float32", 8, backend=dev, repeat=2)
    assert dev.events == ["sync", "gemm", "sync"] * 3  # warm-up + 2 timed, the device's own GEMM
    assert peak["how"].startswith("fake-gpu backend matmul") and len(peak["gflops"]) == 2
