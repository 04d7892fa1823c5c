"""The command line: `fastbp bench`, `fastbp info`, `python -m fastbp`, and their argument errors.

Everything runs in a subprocess with this interpreter, as a user would run it;
the benchmark runs use a tiny model so the file takes seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastbp as fb
from fastbp import bench
from fastbp.bench import contention, peers
from fastbp.bench import report as bench_report
from fastbp.bench.optimizer import OptimizerSpec, fit_kwargs

ROOT = Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

TINY = ["bench", "--quick", "--backends", "numpy", "--sizes", "8,4,2", "--batch-sizes", "1,8",
        "--repeat", "2", "--min-time", "0.01", "--no-progress"]


def fastbp(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    # the caller's FASTBP_BACKEND never leaks in; a test that passes env= sets it on purpose
    env = {k: v for k, v in os.environ.items() if k != "FASTBP_BACKEND"} if env is None else env
    return subprocess.run([sys.executable, "-m", "fastbp", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_json(tmp_path, *args: str, name: str = "run.json", **kwargs) -> dict:
    """``fastbp bench`` with ``args`` (exit status 0 asserted) and its --out record."""
    out = tmp_path / name
    proc = fastbp(*args, "--out", str(out), **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()) | {"_stdout": proc.stdout}


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
                   "--plot", "--peers", "--optimizer", "--threads", "--contended"):
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
        (["--peers", "tensorflow"], ["--peers", "'tensorflow'", "torch", "jax"]),
        (["--optimizer", "rmsprop"], ["--optimizer", "rmsprop", "sgd", "momentum", "adam"]),
        (["--threads", "0"], ["--threads", "'0'"]),
        (["--lr", "-1"], ["--lr", "'-1'"]),
    ],
    ids=["sizes-not-int", "sizes-too-short", "sizes-zero", "unknown-backend", "batch-zero", "batch-not-int",
         "batch-over-samples", "bad-dtype", "repeat-zero", "unknown-peer", "unknown-optimizer", "threads-zero",
         "lr-negative"],
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
    grad = numpy_rec["gradient"]
    # the numpy backend compiles nothing: its warm-up figure is the first call's excess over a steady one
    jit = numpy_rec["jit"]
    assert jit["method"] == "first vectorized gradient call minus a steady one"
    assert jit["first_call_s"] == grad["vectorized"]["first_call_s"] > 0
    assert jit["seconds"] == pytest.approx(max(0.0, jit["first_call_s"] - grad["vectorized"]["seconds"]["median"]))
    assert record["optimizer"] == {"name": "sgd", "lr": 0.05, "weight_decay": 0.0}
    for strategy in ("loop", "vectorized"):
        assert len(grad[strategy]["times_s"]) == 2
        s = grad[strategy]["seconds"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert grad["speedup"] == pytest.approx(grad["loop"]["seconds"]["median"] / grad["vectorized"]["seconds"]["median"])
    # the computation graph (fastbp.graph) is timed beside them, and computes the same gradient
    assert len(grad["graph"]["times_s"]) == 2 and grad["graph_max_abs_diff_vs_vectorized"] < 1e-5
    assert grad["graph_vs_vectorized"] == pytest.approx(grad["graph"]["seconds"]["median"]
                                                        / grad["vectorized"]["seconds"]["median"])
    assert "graph" in proc.stdout
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
    binary = tmp_path / "model.npz"
    binary.write_bytes(bytes(range(256)) * 4)
    garbled = fastbp("report", str(binary))
    assert garbled.returncode == 2 and "is not JSON text" in garbled.stderr and "Traceback" not in garbled.stderr


def test_bench_help_states_each_default_once_and_truly():
    text = " ".join(fastbp("bench", "--help").stdout.split())
    assert "(default: True)" not in text and "(default: None)" not in text
    assert text.count("(default sigmoid)") == 1 and "(default: sigmoid)" not in text


def test_missing_peers_never_fail_the_run(tmp_path):
    # torch and jax made unimportable for the run (a module of that name that raises ImportError first on
    # the path); scikit-learn, a test dependency, stays importable and must run
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("torch", "jax"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} blocked for this test')\n")
    env = dict({k: v for k, v in os.environ.items() if k != "FASTBP_BACKEND"}, PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
    record = run_json(tmp_path, *TINY, "--batch-sizes", "8", "--peers", "torch,jax,sklearn", env=env)
    got = record["peers"]
    assert set(got) == {"torch", "jax", "sklearn"}
    for name, pip in (("torch", "pip install torch"), ("jax", "pip install jax")):
        assert got[name]["status"] == "unavailable", got[name]
        assert "blocked for this test" in got[name]["reason"] and pip in got[name]["reason"]
        assert f"peer {name}: unavailable" in record["_stdout"]
    assert got["sklearn"]["status"] == "ok", got["sklearn"]
    row = got["sklearn"]["training"][0]
    assert row["batch_size"] == 8 and len(row["samples_per_s_all"]) == 2 and row["samples_per_s"]["median"] > 0


def test_optimizer_option_trains_fastbp_and_peers_with_it(tmp_path):
    record = run_json(tmp_path, *TINY, "--batch-sizes", "8", "--optimizer", "adam", "--peers", "sklearn")
    # Adam's default learning rate is torch's and scikit-learn's, not SGD's
    assert record["config"]["optimizer"] == "adam" and record["config"]["lr"] == 0.001
    assert record["optimizer"] == {"name": "adam", "lr": 0.001, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                   "eps": 1e-8}
    assert "adam betas (0.9, 0.999), lr 0.001" in record["_stdout"]
    assert record["backends"]["numpy"]["training"][0]["samples_per_s"]["median"] > 0
    peer = record["peers"]["sklearn"]
    assert peer["optimizer"]["name"] == "adam" and peer["training"][0]["raw"][0]["optimizer"]["name"] == "adam"
    momentum = run_json(tmp_path, *TINY, "--batch-sizes", "8", "--optimizer", "momentum", "--lr", "0.02",
                        name="momentum.json")
    assert momentum["optimizer"] == {"name": "momentum", "lr": 0.02, "weight_decay": 0.0, "momentum": 0.9,
                                     "dampening": 0.0, "nesterov": False}


def test_fit_kwargs_set_the_optimizer_once_then_continue_it():
    net = fb.MLP([3, 2], seed=0)
    first = fit_kwargs(net, OptimizerSpec.make("adam", 0.01), first=True, threads=1)
    assert isinstance(first["optimizer"], fb.optim.Adam) and first["optimizer"].lr == 0.01
    assert first["threads"] == 1 and "lr" not in first  # an instance carries its own lr
    assert fit_kwargs(net, OptimizerSpec.make("adam", 0.01), first=False) == {"optimizer": None}
    sgd = fit_kwargs(net, OptimizerSpec.make("momentum", 0.1), first=True)["optimizer"]
    assert isinstance(sgd, fb.optim.SGD) and sgd.momentum == 0.9
    with pytest.raises(ValueError, match="optimizer=.*'rmsprop'"):
        OptimizerSpec.make("rmsprop", 0.1)
    with pytest.raises(ValueError, match="lr=-1"):
        OptimizerSpec.make("sgd", -1)


def test_threads_option_caps_the_workers_blas(tmp_path):
    record = run_json(tmp_path, *TINY, "--batch-sizes", "8", "--threads", "1")
    assert record["config"]["threads"] == 1 and "threads: capped at 1" in record["_stdout"]
    pools = [p for p in record["backends"]["numpy"]["blas"] if p.get("user_api") == "blas"]
    assert pools and all(p["num_threads"] == 1 for p in pools), pools


def test_contended_reports_each_figure_as_a_share_of_quiet(tmp_path):
    record = run_json(tmp_path, *TINY, "--batch-sizes", "1,8", "--contended")
    cont = record["contended"]
    load = cont["load"]
    assert len(load["pids"]) == 1 and load["cpu_seconds"][0] > 0 and load["wall_s"] > 0
    assert cont["backends"]["numpy"]["status"] == "ok"
    fractions = cont["fractions"]["numpy"]
    for quiet, busy in zip(record["backends"]["numpy"]["training"], cont["backends"]["numpy"]["training"]):
        assert quiet["batch_size"] == busy["batch_size"]
        expected = busy["samples_per_s"]["median"] / quiet["samples_per_s"]["median"]
        assert fractions["training"][str(quiet["batch_size"])] == pytest.approx(expected)
    assert fractions["min_training"] == min(fractions["training"].values())
    grad_q, grad_b = record["backends"]["numpy"]["gradient"], cont["backends"]["numpy"]["gradient"]
    assert fractions["gradient_vectorized"] == pytest.approx(grad_q["vectorized"]["seconds"]["median"]
                                                             / grad_b["vectorized"]["seconds"]["median"])
    assert record["summary"]["numpy"]["contended_min_fraction"] == fractions["min_training"]
    assert "Under load" in record["_stdout"]


def test_busy_load_holds_a_core_and_stops():
    with contention.BusyLoad(1) as load:
        pid = load.pids[0]
        time.sleep(0.5)  # leaves the loop a core
    assert load.record["cpu_seconds"][0] > 0.05 and load.record["cores_held"][0] > 0.1
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(pid, 0)
    with pytest.raises(ValueError, match="count=0"):
        contention.BusyLoad(0)


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed (pip install jax)")
def test_jax_peer_times_both_forms_and_names_the_faster(tmp_path):
    record = run_json(tmp_path, *TINY, "--batch-sizes", "8", "--peers", "jax")
    rec = record["peers"]["jax"]
    assert rec["status"] == "ok", rec
    assert rec["variants"] == ["jit", "scan"]
    row = rec["training"][0]
    assert set(row["variants"]) == {"jit", "scan"}
    medians = {form: v["samples_per_s"]["median"] for form, v in row["variants"].items()}
    assert row["form"] == max(medians, key=medians.get)
    assert row["samples_per_s"] == row["variants"][row["form"]]["samples_per_s"]
    for form, v in row["variants"].items():
        assert v["compile_s"] > 0 and len(v["samples_per_s_all"]) == 2
        assert all(r["form"] == form and r["seconds"] > 0 for r in v["raw"])
    assert f"the faster, {row['form']}, is the peer's figure" in record["_stdout"]


@pytest.mark.skipif(not (HAS_JAX and HAS_TORCH), reason="needs both jax and torch")
@pytest.mark.parametrize("loss, sizes, optimizer", [("cross_entropy", [5, 7, 3], "adam"),
                                                     ("log_loss", [2, 8, 1], "momentum"), ("mse", [4, 6, 2], "sgd")])
def test_peers_train_the_same_model_as_fastbp(loss, sizes, optimizer):
    # same initial parameters, no shuffling, 23 rows in batches of 5 (a smaller last batch), float64:
    # torch.optim, the hand-written JAX updates (both forms) and fastbp must follow one trajectory
    rng = np.random.default_rng(0)
    X = rng.random((23, sizes[0]))
    Y = rng.integers(0, sizes[-1], 23) if loss == "cross_entropy" else (rng.random((23, sizes[-1])) > 0.5) * 1.0
    p0 = peers.init_params(sizes, 1, "float64")
    kw = dict(sizes=sizes, activation="tanh", loss=loss, X=X, Y=Y, batch_size=5, lr=0.05, epochs=3,
              dtype="float64", shuffle=False, optimizer=optimizer, params=p0, return_params=True)
    results = {"torch": peers.torch_throughput(**kw, warmup_batches=3)}
    for form in peers.JAX_FORMS:
        results[f"jax {form}"] = peers.jax_throughput(**kw, form=form)
    with fb.use_backend("numpy"):
        net = fb.MLP(sizes, activation="tanh", loss=loss, dtype="float64", seed=0)
        net.set_params([w for w, _ in p0], [b for _, b in p0])
        history = net.fit(X, Y, epochs=3, batch_size=5, shuffle=False, progress=False,
                          **fit_kwargs(net, OptimizerSpec.make(optimizer, 0.05), first=True))
        weights, biases = net.get_params()
    mine = [(fb.to_numpy(w), fb.to_numpy(b)) for w, b in zip(weights, biases)]
    moved = max(np.abs(w - w0).max() for (w, _), (w0, _) in zip(mine, p0))
    assert moved > 1e-3  # training changed the parameters, so agreeing below means something
    for name, res in results.items():
        for (w, b), (pw, pb) in zip(mine, res["params"]):
            np.testing.assert_allclose(pw, w, rtol=0, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(pb, b, rtol=0, atol=1e-12, err_msg=name)
        assert res["final_loss"] == pytest.approx(history[-1], rel=1e-12), name


def test_peer_functions_reject_bad_arguments():
    X, Y = np.zeros((4, 3)), np.zeros((4, 2))
    args = dict(sizes=[3, 2], activation="relu", loss="mse", X=X, Y=Y, batch_size=2, lr=0.1, epochs=1)
    with pytest.raises(ValueError, match="form='loop'"):
        peers.jax_throughput(**args, form="loop")
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        peers.sklearn_mlp_fit(**args, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"params: .* W \(2, 3\)"):
        peers.torch_throughput(**args, params=[(np.zeros((3, 2)), np.zeros(2))])
    with pytest.raises(ValueError, match="X must have shape"):
        peers.torch_throughput(**(args | {"X": np.zeros((4, 5))}))


def test_peers_cpu_script_records_every_repeat_and_the_machine(tmp_path):
    out = tmp_path / "cpu-peers.json"
    peer_names = ["sklearn"] + (["torch"] if HAS_TORCH else []) + (["jax"] if HAS_JAX else [])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers_cpu.py"), "--backend", "numpy", "--quick",
           "--workloads", "tiny_2_8_1_batch1", "--peers", ",".join(peer_names), "--optimizer", "sgd,adam",
           "--contended", "--repeat", "2", "--min-time", "0.01", "--skip-jit", "--skip-digits", "--skip-profiles",
           "--sgemm-n", "256", "--samples", "200", "--pause", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    mach = record["machine"]
    assert mach["cpu_model"] and mach["cpus"]["usable"] >= 1 and mach["versions"]["numpy"]
    assert any(p.get("user_api") == "blas" and p["num_threads"] >= 1 for p in mach["blas"])
    assert record["sgemm_start"]["gflops_best"] > 0 and record["sgemm_end"]["gflops_best"] > 0
    if HAS_JAX:
        assert record["xla_sgemm"]["gflops_best"] == max(record["xla_sgemm"]["gflops"]) > 0
    assert [s["when"] for s in record["load"]][0] == "start" and record["load"][-1]["when"] == "end"
    rec = record["workloads"]["tiny_2_8_1_batch1"]
    assert rec["load_before"]["load_average"] is not None and rec["load_after"]["load_average"] is not None
    # the step's GEMMs at its own shapes: 2 products in the first layer, 3 in the second
    gemm = rec["gemm_at_shapes"]
    assert [(p["layer"], p["product"]) for p in gemm["products"]] == [
        (1, "forward"), (1, "weight_gradient"), (2, "forward"), (2, "weight_gradient"), (2, "input_gradient")]
    assert gemm["step_gemm_us"] == pytest.approx(sum(p["us"] for p in gemm["products"]))
    expected = {f"fastbp/{o}" for o in ("sgd", "adam")} | {f"sklearn/{o}" for o in ("sgd", "adam")}
    if HAS_TORCH:
        expected |= {f"torch_{t}/{o}" for t in ("default_threads", "1_thread") for o in ("sgd", "adam")}
    if HAS_JAX:
        expected |= {f"jax_{f}/{o}" for f in ("jit", "scan") for o in ("sgd", "adam")}
    assert set(rec["samples_per_s"]) == expected, rec["unavailable"] | rec["failed"]
    for key, s in rec["samples_per_s"].items():  # every repeat kept, raw results beside the figures
        assert s["n"] == 2 and len(s["all"]) == 2 and len(rec["raw"][key]) == 2
        assert [r["samples_per_s"] for r in rec["raw"][key]] == s["all"]
    for o in ("sgd", "adam"):
        entry = rec["comparison"][o]
        sk = entry["peers"]["sklearn"]
        assert sk["ratio_median"] == pytest.approx(rec["samples_per_s"][f"fastbp/{o}"]["median"]
                                                   / rec["samples_per_s"][f"sklearn/{o}"]["median"])
        if HAS_JAX:
            jax = entry["peers"]["jax"]
            forms = {k: rec["samples_per_s"][k]["median"] for k in (f"jax_jit/{o}", f"jax_scan/{o}")}
            assert jax["fastest_variant"] == max(forms, key=forms.get) and jax["bar"] == 1.2
            assert all(v > 0 for v in jax["compile_s"].values()) and len(jax["compile_s"]) == 2
    adam = rec["comparison"]["adam_over_sgd"]
    assert adam["fastbp"] == pytest.approx(rec["samples_per_s"]["fastbp/adam"]["median"]
                                           / rec["samples_per_s"]["fastbp/sgd"]["median"])
    cont = rec["contended"]
    assert cont["load"]["cpu_seconds"][0] > 0
    for key, frac in cont["fraction_of_quiet"].items():
        assert frac == pytest.approx(cont["samples_per_s"][key]["median"] / rec["samples_per_s"][key]["median"])
    assert set(cont["fraction_of_quiet"]) == expected
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the record names the code it measured
        assert record["source"]["commit"] == head.stdout.strip() and isinstance(record["source"]["dirty"], bool)

    # the README's table, rendered from this record: one row, the sklearn-only columns as "-"
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers_table.py"), str(out)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("| 2-8-1 sigmoid log_loss, batch 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    rates = [rec["comparison"][o]["fastbp_samples_per_s"] for o in ("sgd", "adam")]
    assert cells[1] == " / ".join(f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" for r in rates)
    assert cells[2].count("/") == 1 and cells[5] == "-"
    assert "digits" not in table.stdout and "usable CPUs" in table.stdout

    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers_cpu.py"), "--workloads", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--workloads 'nope'" in bad.stderr and "tiny_2_8_1_batch1" in bad.stderr


def test_peers_table_marks_what_a_record_lacks():
    """A failed optimizer, digits without scikit-learn, a failed JIT case: "-" in place, columns kept."""
    spec = importlib.util.spec_from_file_location("peers_table", ROOT / "benchmarks" / "peers_table.py")
    peers_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers_table)
    record = json.loads((ROOT / "benchmarks" / "results" / "cpu-peers-20261203T054145Z.json").read_text())
    rec = record["workloads"]["minibatch64_784_256_10"]
    del rec["comparison"]["momentum"], rec["fastbp_step_vs_gemm"]["momentum"]
    record["digits_vs_sklearn"] = {"sgd": {"unavailable": "scikit-learn is not installed"}}
    record["jit"]["first_fit_batch_32/cold_cache"] = {"error": "boom"}
    row = next(r for r in peers_table.table(record).splitlines() if r.startswith("| 784-256-10 relu, batch 64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "122.7k / - / 76.7k" and cells[2] == "1.21x / - / **0.93x**" and cells[5] == "0.98 / - / 1.57"
    extras = peers_table.extras(record)
    assert "sgd - (scikit-learn is not installed)" in extras and "first_fit_batch_32" not in extras
    assert "first_fit_per_example 11.8 s" in extras and "commit c49626b" in extras


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


def test_bench_follows_fastbp_backend_and_refuses_an_unusable_one(tmp_path):
    env = dict(os.environ, FASTBP_BACKEND="numpy")
    no_backends = [a for i, a in enumerate(TINY) if "--backends" not in TINY[max(i - 1, 0):i + 1]]
    record = run_json(tmp_path, *no_backends, env=env)
    assert [n for n, r in record["backends"].items() if r["status"] == "ok"] == ["numpy"]  # numba not run
    if "cupy" not in fb.available_backends():
        proc = fastbp("bench", "--quick", env=dict(os.environ, FASTBP_BACKEND="cupy"))
        assert proc.returncode == 2 and "FASTBP_BACKEND=cupy: backend 'cupy' is unavailable" in proc.stderr
