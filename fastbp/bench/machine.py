"""What machine a benchmark ran on: CPU, BLAS and its threads, GPU, library versions, load.

Everything here is read-only and best effort: a probe that fails records why and
never stops ``fastbp info`` or ``fastbp bench``. Nothing imports numba or cupy
unless asked to (``deep=True``), so describing a machine stays light.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                   "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "XLA_FLAGS", "FASTBP_BACKEND", "CUDA_VISIBLE_DEVICES")
# Distribution names whose versions are worth recording beside a figure.
_DISTRIBUTIONS = ("numpy", "scipy", "numba", "llvmlite", "threadpoolctl", "tqdm", "scikit-learn", "torch",
                  "jax", "jaxlib", "matplotlib", "pytest-benchmark")
_CUPY_DISTRIBUTIONS = ("cupy", "cupy-cuda11x", "cupy-cuda12x", "cupy-cuda13x")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_counts() -> dict[str, int | None]:
    """Logical CPUs in the machine and the ones this process may run on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"logical": os.cpu_count(), "usable": usable}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_busy_seconds() -> float | None:
    """CPU-seconds all processes on this machine have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
        ticks = [int(x) for x in fields[1:9]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def own_cpu_seconds() -> float:
    """CPU-seconds used by this process and its finished (waited-for) children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_cpu_seconds(pid: int) -> float | None:
    """CPU-seconds (user + system) process ``pid`` has used so far (Linux /proc/PID/stat), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OthersMeter:
    """How many cores' worth of work other processes did while the block ran (0.5 = half a core).

    Other = the machine's busy CPU time minus this process's own (and its waited-for
    children's) and minus the processes in ``exclude`` (a deliberate load, say).
    ``cores`` is None where /proc/stat cannot be read.
    """

    def __init__(self, exclude: tuple[int, ...] = ()) -> None:
        self.exclude = tuple(exclude)
        self.cores: float | None = None

    def _excluded(self) -> float:
        return sum(process_cpu_seconds(pid) or 0.0 for pid in self.exclude)

    def __enter__(self) -> "OthersMeter":
        self._t, self._busy = time.perf_counter(), cpu_busy_seconds()
        self._own, self._ex = own_cpu_seconds(), self._excluded()
        return self

    def __exit__(self, *exc) -> bool:
        wall = max(time.perf_counter() - self._t, 1e-3)
        busy = cpu_busy_seconds()
        if busy is not None and self._busy is not None:
            mine = (own_cpu_seconds() - self._own) + (self._excluded() - self._ex)
            self.cores = max(0.0, (busy - self._busy) - mine) / wall
        return False


def wait_for_quiet(threshold: float = 0.15, max_s: float = 180.0, exclude: tuple[int, ...] = (),
                   say: Callable[[str], None] | None = print) -> float:
    """Wait (at most ``max_s``) for a 1 s window in which other processes use < ``threshold`` cores.

    Returns the seconds waited; ``say`` (print by default) reports each busy window.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        with OthersMeter(exclude) as meter:
            time.sleep(1.0)
        if meter.cores is None or meter.cores < threshold:
            break
        if say is not None:
            say(f"  (machine busy: other processes use {meter.cores:.2f} cores; waiting)")
    return time.perf_counter() - t0


def busy_processes(min_pcpu: float = 5.0, limit: int = 10) -> list[str]:
    """Other processes using CPU now (``ps``), so a reader of a record can judge the load."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    me, busy = str(os.getpid()), []
    for line in out:
        parts = line.split(None, 2)
        try:
            if parts[0] != me and float(parts[1]) >= min_pcpu:
                busy.append(line.strip()[:160])
        except (IndexError, ValueError):
            continue
    return busy[:limit]


def load_snapshot(label: str) -> dict[str, Any]:
    """The load averages and the busiest other processes now, labelled ``label``."""
    return {"when": label, "load_average": load_average(), "busy_processes": busy_processes()}


def blas_info() -> list[dict[str, Any]]:
    """Each BLAS / OpenMP thread pool loaded in this process, with its thread count (threadpoolctl).

    Two pools of one kind can be loaded at once (NumPy and SciPy each ship an OpenBLAS);
    ``shipped_with`` says whose each one is.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError as exc:
        return [{"error": f"threadpoolctl not installed ({exc})"}]
    keep = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "prefix",
            "filepath")
    pools = [{k: pool.get(k) for k in keep if pool.get(k) is not None} for pool in threadpool_info()]
    for pool in pools:
        if pool.get("filepath"):  # which package shipped it: numpy.libs, scipy.libs, torch/lib, ...
            parent = os.path.dirname(pool["filepath"])
            pool["shipped_with"] = os.path.basename(parent) if not parent.endswith("lib") else \
                os.path.join(os.path.basename(os.path.dirname(parent)), os.path.basename(parent))
    return pools


def versions() -> dict[str, str | None]:
    """Installed versions (None when not installed), read from metadata without importing."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        found[dist] = _dist_version(dist)
    cupy = [f"{d} {v}" for d in _CUPY_DISTRIBUTIONS if (v := _dist_version(d))]
    found["cupy"] = ", ".join(cupy) or None
    return found


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpus(*, deep: bool = False) -> dict[str, Any]:
    """The NVIDIA GPUs visible here: name and memory per device, or why none is listed.

    With ``deep`` (``fastbp info``, or when the cupy backend is in use) cupy is
    imported and asked; otherwise only ``nvidia-smi`` is consulted, so no CUDA
    context is created just to describe the machine.
    """
    result: dict[str, Any] = {"devices": [], "source": None, "notes": []}
    if deep or "cupy" in sys.modules:
        try:
            cupy = importlib.import_module("cupy")
            runtime = cupy.cuda.runtime
            for i in range(runtime.getDeviceCount()):
                props = runtime.getDeviceProperties(i)
                name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
                result["devices"].append({"index": i, "name": name,
                                          "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                                          "compute_capability": f"{props['major']}.{props['minor']}"})
            result["source"] = "cupy"
            result["cuda_runtime"] = runtime.runtimeGetVersion()
            result["cuda_driver"] = runtime.driverGetVersion()
            return result
        except ImportError as exc:
            result["notes"].append(f"cupy not importable: {exc}")
        except Exception as exc:  # no driver, no device, broken install: say so, carry on
            result["notes"].append(f"cupy sees no usable device: {type(exc).__name__}: {exc}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        result["notes"].append("nvidia-smi not found")
        return result
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        result["notes"].append(f"nvidia-smi failed: {exc}")
        return result
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = float(parts[2]) / 1024 if parts[2].replace(".", "", 1).isdigit() else None
            result["devices"].append({"index": int(parts[0]) if parts[0].isdigit() else parts[0],
                                      "name": parts[1], "memory_gib": None if mem is None else round(mem, 1)})
    result["source"] = "nvidia-smi"
    return result


def numba_info() -> dict[str, Any]:
    """Numba's version, threading layer and thread count (imports numba; for ``fastbp info``)."""
    try:
        numba = importlib.import_module("numba")
    except ImportError as exc:
        return {"error": f"not importable: {exc}"}
    except Exception as exc:  # a numba/numpy version clash raises at import
        return {"error": f"import failed: {type(exc).__name__}: {exc}"}
    return {"version": numba.__version__, "num_threads": numba.config.NUMBA_NUM_THREADS,
            "threads_in_use": numba.get_num_threads(), "threading_layer_requested": numba.config.THREADING_LAYER}


def source_state(path: str) -> dict[str, Any] | None:
    """The git commit of the checkout holding ``path`` and whether it has local changes (None outside git)."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        commit = subprocess.run([git, "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run([git, "-C", path, "status", "--porcelain", "--untracked-files=normal"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(changed), "changed_files": [line[3:] for line in changed]}


def thread_env() -> dict[str, str]:
    """The thread-related environment variables that are set."""
    return {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ}


def describe(*, deep_gpu: bool = False) -> dict[str, Any]:
    """The machine, for a benchmark record: CPU, cores, BLAS, GPU, versions, load, environment."""
    return {
        "cpu_model": cpu_model(),
        "cpus": cpu_counts(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "blas": blas_info(),
        "thread_env": thread_env(),
        "gpu": gpus(deep=deep_gpu),
        "versions": versions(),
        "load_average": load_average(),
    }


def blas_summary(pools: list[dict[str, Any]]) -> str:
    """One line such as ``openblas 0.3.31 (pthreads, Haswell), 2 threads``."""
    parts = []
    for pool in pools:
        if pool.get("user_api") != "blas":
            continue
        extra = ", ".join(str(pool[k]) for k in ("shipped_with", "threading_layer", "architecture") if pool.get(k))
        parts.append(f"{pool.get('internal_api', '?')} {pool.get('version', '?')}"
                     + (f" ({extra})" if extra else "") + f", {_threads(pool.get('num_threads'))}")
    return "; ".join(parts) or "no BLAS found by threadpoolctl (numpy not imported yet?)"


def _threads(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def gpu_summary(gpu: dict[str, Any]) -> str:
    devices = gpu.get("devices") or []
    if not devices:
        return "none" + (f" ({'; '.join(gpu['notes'])})" if gpu.get("notes") else "")
    return "; ".join(f"[{d['index']}] {d['name']}" + (f", {d['memory_gib']} GiB" if d.get("memory_gib") else "")
                     for d in devices)
