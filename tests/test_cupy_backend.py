"""The CuPy backend: selection and errors everywhere, its kernels on a GPU or, without one, emulated.

Three layers, so that as much as possible is checked on a machine without a GPU:

* CPU, always: the selection and error paths for real (cupy absent; cupy-cuda12x present but no
  driver; fakes for the other failures), that importing fastbp never imports cupy, and that the
  CUDA sources take their numbering from kernels/base.py.
* CPU with a C++ compiler: ``kernels/cuda/*.cu`` compiled as C++ against a small shim that runs
  each CUDA thread as an OS thread (``__syncthreads`` and warp shuffles are barriers), every
  kernel checked against the NumPy backend, whole epochs of ``_StepPlan`` (the sequence a CUDA
  graph captures) on each route and update rule against a plain reference epoch, and
  ``CupyBackend`` itself on a fake device (FakeCupy: host arrays, emulated kernels, recorded
  captures, a stub cuBLAS) -- threads, TF32, graph reuse across models, cuBLAS errors in info().
  With nvcc: the same sources compiled for the device, checked for register spills.
* GPU (marker ``gpu``, skipped unless cupy sees a device): every kernel, the update rules, the
  gradients of both strategies, the captured step on every route, whole training trajectories,
  two threads, the TF32 switch, against the NumPy backend. The rest of the suite also runs on
  cupy there (conftest's BACKENDS).

Tolerances: float64 to rounding (rtol 1e-10); float32 elementwise 1e-5, GEMM-based 2e-4.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import threading
import types
import weakref

import numpy as np
import pytest

import fastbp as fb
from conftest import target_rows
import fastbp.backend as registry
import fastbp.kernels.cupy as kc
from fastbp.errors import BackendUnavailableError
from fastbp.kernels import base as kbase
from fastbp.kernels.base import (
    ACT_CODE,
    ACTIVATIONS,
    ELEMENTWISE_ACTIVATIONS,
    LOSS_CODE,
    LOSSES,
    RULE_CODE,
    Backend,
    NetSpec,
    OptimizerState,
    UpdateRule,
)
from fastbp.kernels.numpy import NumpyBackend

DTYPES = ["float64", "float32"]
ELEM = {"float64": dict(rtol=1e-12, atol=1e-13), "float32": dict(rtol=1e-5, atol=1e-6)}
GEMM = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=1e-5)}
PIP = "pip install 'cupy-cuda12x[ctk]'"
REF = NumpyBackend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every rule and option the update kernel has, with hyper-parameters that make each term matter.
RULES = {
    "sgd": UpdateRule("sgd", lr=0.1),
    "momentum": UpdateRule("sgd", lr=0.05, momentum=0.9),
    "nesterov-wd": UpdateRule("sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
    "sgd-l2": UpdateRule("sgd", lr=0.1, l2=2.0),
    "adam": UpdateRule("adam", lr=0.01, weight_decay=0.01),
    "adamw": UpdateRule("adamw", lr=0.01, weight_decay=0.1, beta1=0.8, beta2=0.99),
    "adam-l2": UpdateRule("adam", lr=0.02, eps=1e-6, l2=0.5),
}


def cuda_device_count() -> int:
    """Devices cupy sees; 0 when cupy is missing or any CUDA call fails."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


HAS_GPU = cuda_device_count() > 0
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible to cupy")
needs_no_gpu = pytest.mark.skipif(HAS_GPU, reason="a CUDA device is usable here")


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "FASTBP_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=300)


# ================================================================ references (plain NumPy)


def plain_update(spec: NetSpec, rule: UpdateRule, params, grads, state: OptimizerState, rows: int) -> None:
    """UpdateRule's formulas written out in NumPy, in the model dtype (the kernels' reference)."""
    T, t = params.dtype.type, state.steps + 1
    g = grads.copy()
    if rule.kind != "adamw" and rule.weight_decay:
        g += params * T(rule.weight_decay)
    if rule.l2:
        for lo, hi in zip(spec.w_offsets, spec.b_offsets):
            g[lo:hi] += params[lo:hi] * T(rule.l2 / rows)
    if rule.kind == "sgd":
        if rule.momentum:
            m = state.buffers[0]
            m[:] = m * T(rule.momentum) + g
            g = g + m * T(rule.momentum) if rule.nesterov else m.copy()
        params -= g * T(rule.lr)
    else:
        if rule.kind == "adamw" and rule.weight_decay:
            params *= T(1.0 - rule.lr * rule.weight_decay)
        m, v = state.buffers[0], state.buffers[1]
        m[:] = m * T(rule.beta1) + g * T(1.0 - rule.beta1)
        v[:] = v * T(rule.beta2) + (g * g) * T(1.0 - rule.beta2)
        denom = np.sqrt(v) * T(1.0 / np.sqrt(1.0 - rule.beta2 ** t)) + T(rule.eps)
        params -= (m / denom) * T(rule.lr / (1.0 - rule.beta1 ** t))
    state.step[0] = t


HAS_NUMPY_UPDATE = type(REF).update is not Backend.update


def reference_update(spec, rule, params, grads, state, rows) -> None:
    """kernels/numpy.py's update when it has one (the project's reference), else plain_update."""
    (REF.update if HAS_NUMPY_UPDATE else lambda *a: plain_update(*a))(spec, rule, params, grads, state, rows)


def new_state(spec: NetSpec, rule: UpdateRule, zeros=np.zeros) -> OptimizerState:
    return OptimizerState(zeros((rule.n_buffers, spec.n_params), np.dtype(spec.dtype)))


def reference_epoch(spec: NetSpec, params, X, Y, batch, rule: UpdateRule = RULES["sgd"], state=None):
    """Mini-batch training composed of the NumPy backend's kernels and the reference update, like
    the fit loop without fast paths. Returns (loss_sum, n_done, n_correct)."""
    state = new_state(spec, rule) if state is None else state
    weights, biases = kc._layer_views(spec, params)
    total, done, correct = 0.0, 0, 0
    for start in range(0, len(X), batch):
        x, y = X[start:start + batch], Y[start:start + batch]
        m = len(x)
        zs, acts, a = [], [], x
        for l in range(spec.n_layers):
            z = np.empty((m, spec.sizes[l + 1]), spec.dtype)
            REF.matmul(a, weights[l], z, trans_b=True)
            REF.add_bias(z, biases[l])
            a = np.empty_like(z)
            REF.activation(spec.activation(l), z, a)
            zs.append(z)
            acts.append(a)
        delta = np.empty_like(a)
        cost = REF.output_delta(spec.loss, spec.output, zs[-1], a, y, delta)
        if not np.isfinite(cost):
            break
        total, done = total + cost, done + m
        correct += REF.count_correct(spec.loss, a, y)
        grads = np.zeros_like(params)
        dWs, dbs = kc._layer_views(spec, grads)
        for l in reversed(range(spec.n_layers)):
            prev = x if l == 0 else acts[l - 1]
            REF.matmul(delta, prev, dWs[l], trans_a=True, alpha=1.0 / m)
            REF.bias_grad(delta, dbs[l], alpha=1.0 / m)
            if l > 0:
                nxt = np.empty_like(zs[l - 1])
                REF.hidden_delta(spec.hidden, delta, weights[l], zs[l - 1], acts[l - 1], nxt)
                delta = nxt
        reference_update(spec, rule, params, grads, state, m)
    return total, done, correct


def _update_case(dtype, seed=0):
    spec = NetSpec((6, 5, 3), "tanh", "softmax", "cross_entropy", np.dtype(dtype))
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(spec.n_params).astype(dtype)
    grads = [rng.standard_normal(spec.n_params).astype(dtype) for _ in range(4)]
    return spec, params, grads


@pytest.mark.skipif(not HAS_NUMPY_UPDATE, reason="kernels/numpy.py has no update yet")
@pytest.mark.parametrize("name", RULES)
def test_plain_update_agrees_with_the_numpy_backend(name):
    """The two references agree, so the kernels below are checked against the project's formulas."""
    rule = RULES[name]
    spec, p0, grads = _update_case("float64")
    (p1, s1), (p2, s2) = [(p0.copy(), new_state(spec, rule)) for _ in range(2)]
    for g in grads:
        plain_update(spec, rule, p1, g, s1, 7)
        REF.update(spec, rule, p2, g, s2, 7)
    np.testing.assert_allclose(p1, p2, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(s1.buffers, s2.buffers, rtol=1e-14, atol=1e-15)
    assert s1.steps == s2.steps == len(grads)


# ================================================================ selection and errors (CPU)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that has not yet tried any backend (its caches are per process)."""
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_failures", {})
    for name in ("_active", "_default"):  # the process default, under either name
        if hasattr(registry, name):
            monkeypatch.setattr(registry, name, None)
    return registry


def _fake_cupy(get_device_count):
    class CUDARuntimeError(RuntimeError):
        pass

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count, CUDARuntimeError=CUDARuntimeError))
    return module, CUDARuntimeError


def test_importing_fastbp_and_the_cupy_kernels_module_does_not_import_cupy():
    proc = run_python("import sys, fastbp, fastbp.kernels.cupy; print('cupy' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_cupy_not_installed(fresh_registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ModuleNotFoundError
    with pytest.raises(BackendUnavailableError) as info:
        fb.set_backend("cupy")
    assert info.value.backend == "cupy"
    assert info.value.reason.startswith("cupy is not installed (")
    assert "GPU is visible" in info.value.reason or "no /dev/nvidia" in info.value.reason  # says if a GPU is here
    assert PIP in str(info.value) and "cupy-cuda13x" in str(info.value) and "'.[cuda12]'" in str(info.value)
    assert "cupy" not in fb.available_backends()


def test_cupy_that_fails_to_import(fresh_registry, monkeypatch):
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "cupy":
                raise ImportError("libcudart.so.12: cannot open shared object file")
            return None

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Refuse()] + sys.meta_path)
    with pytest.raises(BackendUnavailableError, match="cupy is installed but does not import") as info:
        fb.set_backend("cupy")
    assert "libcudart.so.12" in info.value.reason and PIP in info.value.fix


@pytest.mark.parametrize("message, reason, fix", [
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version",
     "CUDA driver too old / not present", PIP),
    ("cudaErrorCallRequiresNewerDriver: API call is not supported in the installed CUDA driver",
     "CUDA driver too old / not present", "update the NVIDIA driver"),
    ("cudaErrorSystemNotReady: system not yet initialized", "CUDA system not ready", "nvidia-fabricmanager"),
    ("cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device",
     "no kernel image for this GPU", "compute_cap"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected", "no CUDA device", PIP),
    ("cudaErrorDevicesUnavailable: CUDA-capable device(s) is/are busy or unavailable", "no CUDA device",
     "CUDA_VISIBLE_DEVICES"),
    ("cudaErrorUnknown: unknown error", "CUDA runtime error at the first device call", PIP),
])
def test_first_device_call_fails(fresh_registry, monkeypatch, message, reason, fix):
    def count():
        raise error(message)

    module, error = _fake_cupy(count)
    monkeypatch.setitem(sys.modules, "cupy", module)
    with pytest.raises(BackendUnavailableError) as info:
        fb.set_backend("cupy")
    assert info.value.reason == f"{reason} ({message})"
    assert fix in info.value.fix


def test_no_device(fresh_registry, monkeypatch):
    module, _ = _fake_cupy(lambda: 0)
    monkeypatch.setitem(sys.modules, "cupy", module)
    with pytest.raises(BackendUnavailableError, match=r"no CUDA device \(cupy.cuda.runtime.getDeviceCount\(\) == 0\)"):
        fb.set_backend("cupy")
    assert fb.set_backend("auto").name != "cupy"  # auto moves on, never a silent failure of its own


@needs_no_gpu
def test_explicit_cupy_fails_clearly_here(fresh_registry):
    """The real cupy when installed (cupy-cuda12x imports, then the driver check fails), else absent."""
    with pytest.raises(BackendUnavailableError) as info:
        fb.set_backend("cupy")
    if cupy_importable():
        assert info.value.reason.startswith(("CUDA driver too old / not present (", "no CUDA device"))
    else:
        assert info.value.reason.startswith("cupy is not installed (")  # and whether a GPU is visible
    assert PIP in str(info.value)
    status = fb.backend_status()["cupy"]
    assert status is not None and PIP in status


@needs_no_gpu
def test_env_var_cupy_fails_clearly_in_a_fresh_interpreter():
    proc = run_python("import fastbp as fb; fb.get_backend()", FASTBP_BACKEND="cupy")
    assert proc.returncode != 0
    assert "BackendUnavailableError" in proc.stderr
    assert "backend 'cupy' is unavailable" in proc.stderr and PIP in proc.stderr
    expected = "CUDA driver too old / not present" if cupy_importable() else "cupy is not installed"
    assert expected in proc.stderr or "no CUDA device" in proc.stderr


@needs_no_gpu
def test_auto_does_not_pick_cupy_here(fresh_registry):
    assert fb.set_backend("auto").name != "cupy"
    assert "cupy" not in fb.available_backends()


# ================================================================ the sources and pure helpers


def test_cuda_sources_take_their_numbering_from_base():
    """base.py's ACT_CODE / LOSS_CODE / RULE_CODE / HP_* reach the CUDA code only through cuda_defines()."""
    defines = kc.cuda_defines()
    for name, code in ACT_CODE.items():
        assert f"#define FB_{name.upper()} {code}\n" in defines
    for name, code in LOSS_CODE.items():
        assert f"#define FB_{name.upper()} {code}\n" in defines
    for name, code in RULE_CODE.items():
        assert f"#define FB_RULE_{name.upper()} {code}\n" in defines
    for name in [n for n in dir(kbase) if n.startswith("HP_")]:
        assert f"#define FB_{name} {getattr(kbase, name)}\n" in defines
    assert f"#define FB_LEAKY_SLOPE {kbase.LEAKY_SLOPE!r}\n" in defines
    defined = set(re.findall(r"#define (FB_\w+)", defines))
    for path in sorted((kc._CUDA_DIR).glob("*.cu")):
        text = path.read_text()
        assert not re.search(r"#define\s+FB_", text), f"{path.name} defines its own FB_ codes"
        used = set(re.findall(r"\bFB_[A-Z0-9_]+\b", re.sub(r"//[^\n]*", "", text)))
        assert used <= defined, f"{path.name} uses undefined {sorted(used - defined)}"
    assert kc.module_source().startswith(defines) and kc.elementwise_preamble().startswith(defines)


def test_every_kernel_name_is_defined_in_the_cuda_source():
    source = kc.module_source()
    for t in ("float", "double"):
        for name in kc.kernel_names(t):
            assert f"void {name.split('<')[0]}(" in source, name
    assert set(ACT_CODE) == set(ACTIVATIONS) and set(LOSS_CODE) == set(LOSSES)


def test_device_error_classification():
    def reason(message):
        return kc._device_error(RuntimeError(message)).reason

    assert reason("cudaErrorInsufficientDriver: x").startswith("CUDA driver too old")
    assert reason("cudaErrorSystemDriverMismatch: x").startswith("CUDA driver too old")
    assert reason("cudaErrorUnsupportedPtxVersion: x").startswith("CUDA driver too old")
    assert reason("cudaErrorSystemNotReady: x").startswith("CUDA system not ready")
    assert reason("cudaErrorNoKernelImageForDevice: x").startswith("no kernel image for this GPU")
    assert reason("cudaErrorNoDevice: x").startswith("no CUDA device")
    assert reason("cudaErrorLaunchFailure: x").startswith("CUDA runtime error")


def test_pure_helpers():
    assert kc._cuda_version(12090) == "12.9" and kc._cuda_version(13000) == "13.0"
    assert kc._gemm_tile(64, 256, 132) == 32 and kc._gemm_tile(4096, 4096, 132) == 64
    assert kc._grid_rows(9) == ((3,), (128,))
    assert kc._grid_1d(10**9)[0] == (65535,)
    assert kc.colmajor_gemm_args(1, 0, 5, 6, 7, 5, 6, 6) == (0, 1, 6, 5, 7, "B", 6, "A", 5, 6)
    spec = NetSpec((3, 4, 2), "relu", "softmax", "cross_entropy", np.dtype("float64"))
    flat = np.arange(spec.n_params, dtype=float)
    (w1, w2), (b1, b2) = kc._layer_views(spec, flat)
    assert w1.shape == (4, 3) and b1[0] == 12 and w2.shape == (2, 4) and b2[-1] == spec.n_params - 1
    assert list(kc.weight_ranges(spec)) == [0, 12, 16, 24]


@pytest.mark.parametrize("m, k", [(1, 1), (63, 10), (64, 256), (4096, 4096), (65536, 256), (65536, 10)])
def test_reduction_and_epilogue_grids(m, k):
    """Every row in exactly one bias chunk, chunks of >= 64 rows, enough blocks for an H100's 132 SMs;
    fb_bias_act's block covers whole warps and its grid every column."""
    chunks, rows = kc._bias_chunks(m, k, 132)
    assert (chunks - 1) * rows < m <= chunks * rows
    assert rows >= min(m, 64)
    if m >= 64 * 4 * 132:
        assert chunks * kc._cdiv(k, 32) >= 3 * 132  # the old kernel ran ceil(k/32) blocks in all
    (gx, gy), (bx, by) = kc._grid_bias_act(m, k, 132)
    assert (bx * by) % 32 == 0 and bx * by <= 256 and gx * bx >= k and 1 <= gy <= 65535
    assert kc._bias_chunks(m, k, 1)[0] <= kc._bias_chunks(m, k, 132)[0]


def _instantiations() -> str:
    names = kc.kernel_names("float") + kc.kernel_names("double")
    return "\n".join(f"void* fb_instance_{i} = (void*)&{name};" for i, name in enumerate(names))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_for_the_device(tmp_path):
    """What NVRTC compiles on the GPU, compiled here by nvcc (no GPU needed): PTX for sm_80, and
    machine code for sm_90 with ptxas's report, which must show no register spills."""
    src = tmp_path / "fastbp_all.cu"
    src.write_text(kc.module_source() + "\n" + _instantiations() + "\n")
    proc = subprocess.run(["nvcc", "-arch=sm_80", "--ptx", "-o", str(tmp_path / "sm_80.ptx"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "sm_80.ptx").read_text().count(".entry") >= 2 * len(kc.kernel_names("float"))
    proc = subprocess.run(["nvcc", "-arch=sm_90", "--cubin", "-Xptxas", "-v", "-o", str(tmp_path / "sm_90.cubin"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert spills and all(s == ("0", "0") for s in spills), proc.stderr[-3000:]


# ================================================================ CUDA kernels emulated on the CPU

_SHIM = r"""
// A CUDA-thread-per-OS-thread shim: enough of CUDA for fastbp's kernels to run as C++.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
using std::exp; using std::fabs; using std::isfinite; using std::log; using std::log1p; using std::tanh;
using std::min; using std::pow; using std::sqrt;

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 blockDim, gridDim;
static thread_local dim3 threadIdx, blockIdx;
struct fb_warp_t { std::barrier<> bar{32}; unsigned long long slot[32]; };
static thread_local std::barrier<>* fb_block_bar = nullptr;
static thread_local fb_warp_t* fb_warp = nullptr;
static thread_local int fb_lane = 0;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static  /* one block runs at a time */

static inline void __syncthreads() { fb_block_bar->arrive_and_wait(); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int mask) {
    std::memcpy(&fb_warp->slot[fb_lane], &v, sizeof(T));
    fb_warp->bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &fb_warp->slot[fb_lane ^ mask], sizeof(T));
    fb_warp->bar.arrive_and_wait();
    return r;
}
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
"""

_HARNESS = r"""
// One OS thread per CUDA thread of a block, reused for every block of the grid in turn (blocks
// run one after another, so __shared__ as a static is right). Each block gets fresh barriers: a
// thread that returns early drops out of its block's barriers only.
template <typename F> static int fb_run(dim3 grid, dim3 block, F body) {
    const unsigned nt = block.x * block.y * block.z;
    if (nt == 0 || nt % 32 != 0 || nt > 1024) return -3;
    blockDim = block; gridDim = grid;
    const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
    std::unique_ptr<std::barrier<>> bar;
    std::unique_ptr<fb_warp_t[]> warps;
    auto fresh = [&]() noexcept { bar.reset(new std::barrier<>(nt)); warps.reset(new fb_warp_t[nt / 32]); };
    fresh();
    std::barrier<decltype(fresh)> between(nt, fresh);  // all of a block done, next block's barriers made
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned t = 0; t < nt; ++t)
        threads.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            fb_lane = t % 32;
            for (unsigned long long b = 0; b < nb; ++b) {
                blockIdx = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                            (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
                fb_block_bar = bar.get(); fb_warp = &warps[t / 32];
                body();
                fb_block_bar->arrive_and_drop();  // an exited thread no longer holds up the others
                fb_warp->bar.arrive_and_drop();
                between.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
    return 0;
}

template <typename... P, std::size_t... I>
static int fb_call(void (*k)(P...), dim3 g, dim3 b, void** params, const int* sizes, int n,
                   std::index_sequence<I...>) {
    if (n != (int)sizeof...(P)) return -2;
    const int expected[] = {(int)sizeof(P)...};
    for (int i = 0; i < n; ++i)
        if (sizes[i] != expected[i]) return -100 - i;  // CuPy would pass bytes of the wrong size
    std::tuple<std::decay_t<P>...> args(*static_cast<std::decay_t<P>*>(params[I])...);
    return fb_run(g, b, [&] { std::apply(k, args); });
}

template <typename... P>
static int fb_call(void (*k)(P...), dim3 g, dim3 b, void** params, const int* sizes, int n) {
    return fb_call(k, g, b, params, sizes, n, std::index_sequence_for<P...>{});
}

extern "C" int fb_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                             unsigned by, unsigned bz, void** params, const int* sizes, int n) {
    const std::string s(name);
    const dim3 g{gx, gy, gz}, b{bx, by, bz};
@CASES@
    return -1;
}
"""


class EmuKernel:
    """A RawKernel look-alike: ``kernel(grid, block, args)`` with CuPy's argument rules."""

    _SCALARS = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
                np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64}

    def __init__(self, lib, name, lock):
        self.lib, self.name, self.lock = lib, name, lock

    def __call__(self, grid, block, args, shared_mem=0):
        values = []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{self.name}: argument {i} is not C-contiguous"
                values.append(ctypes.c_void_p(a.ctypes.data))
            elif type(a) in self._SCALARS:
                values.append(self._SCALARS[type(a)](a))
            else:  # CuPy would guess a C type for a Python scalar: the glue must say which
                raise TypeError(f"{self.name}: argument {i} is {a!r} ({type(a).__name__}); pass a NumPy scalar")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        sizes = (ctypes.c_int * len(values))(*[ctypes.sizeof(v) for v in values])
        with self.lock:
            rc = self.lib.fb_emu_launch(self.name.encode(), *grid, *block, params, sizes, len(values))
        assert rc == 0, f"{self.name}: emulator returned {rc} (-1 unknown name, -2 argument count, -10x size of argument x)"




@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """Name expression -> EmuKernel, for both dtypes."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    names = kc.kernel_names("float") + kc.kernel_names("double")
    cases = "\n".join(f'    if (s == "{n}") return fb_call(&{n}, g, b, params, sizes, n);' for n in names)
    directory = tmp_path_factory.mktemp("emu")
    src, lib = directory / "emu.cpp", directory / "libfbemu.so"
    src.write_text(_SHIM + kc.module_source() + _HARNESS.replace("@CASES@", cases))
    # -ffp-contract=off: one rounding per operation, as NumPy (the device's fb_mul_rn does the same)
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-w", "-shared", "-fPIC", "-pthread",
                           "-o", str(lib), str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("g++ without C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-4000:]
    handle = ctypes.CDLL(str(lib))
    handle.fb_emu_launch.restype = ctypes.c_int
    handle.fb_emu_launch.argtypes = ([ctypes.c_char_p] + [ctypes.c_uint] * 6
                                     + [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.c_int])
    lock = threading.Lock()  # the shim's grid state is global: one kernel at a time, like one device queue
    return {name: EmuKernel(handle, name, lock) for name in names}


def _t(dtype):
    return kc._CTYPES[np.dtype(dtype)]


def _logits(shape, dtype, seed=0, scale=3.0):
    """Random logits with exact zeros and +-40 extremes mixed in."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * scale
    flat = z.reshape(-1)
    flat[::7] = 0.0
    flat[3::11] = 40.0
    flat[5::13] = -40.0
    return z.astype(dtype)


def _act(name, z):
    out = np.empty_like(z)
    REF.activation(name, z, out)
    return out


def _close(actual, expected, tol, what=""):
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)


def _row_correct(loss, a, y):
    return np.array([REF.count_correct(loss, a[i:i + 1], y[i:i + 1]) for i in range(len(a))], dtype=np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("output", ACTIVATIONS)
def test_emulated_output_delta(emu, dtype, loss, output):
    m, k = 7, 37  # k > 32: each lane handles several columns
    z = _logits((m, k), dtype)
    a = _act(output, z)
    y = target_rows(loss, (m, k), dtype)
    d_ref = np.empty_like(z)
    total_ref = REF.output_delta(loss, output, z, a, y, d_ref)
    d, rows, right = np.full_like(z, np.nan), np.empty(m), np.full(m, -1, np.int32)
    args = lambda out, r: (z, a, y, out, rows, r, np.int32(m), np.int32(k),  # noqa: E731
                           np.int32(ACT_CODE[output]), np.int32(LOSS_CODE[loss]))
    emu[f"fb_output_delta<{_t(dtype)}>"](*kc._grid_rows(m), args(d, right))
    _close(d, d_ref, ELEM[dtype], "delta")
    _close(rows.sum(), total_ref, ELEM[dtype], "cost")
    np.testing.assert_array_equal(right, _row_correct(loss, a, y))
    rows[:] = np.nan
    emu[f"fb_output_delta<{_t(dtype)}>"](*kc._grid_rows(m), args(kc._NULL, kc._NULL))  # loss_sum alone
    _close(rows.sum(), REF.loss_sum(loss, output, z, a, y), ELEM[dtype], "loss_sum")


def test_emulated_correct_counts_break_ties_like_numpy_argmax(emu):
    """First maximum wins, a NaN counts as the maximum (numpy.argmax), across lanes and columns > 32."""
    k = 40
    a = np.zeros((5, k))
    a[0, [3, 35]] = 1.0          # a tie: argmax 3
    a[1, [36, 4]] = [1.0, 0.5]   # maximum in the second lane round
    a[2, [2, 33]] = [np.nan, np.nan]  # first NaN: 2
    a[3, :] = 0.25               # all equal: 0
    a[4, 39] = 2.0
    y = np.zeros((5, k))
    y[[0, 1, 2, 3, 4], [3, 36, 2, 1, 39]] = 1.0
    right, rows = np.full(5, -1, np.int32), np.empty(5)
    emu["fb_output_delta<double>"](*kc._grid_rows(5), (a, a, y, kc._NULL, rows, right, np.int32(5), np.int32(k),
                                                        np.int32(ACT_CODE["softmax"]), np.int32(LOSS_CODE["cross_entropy"])))
    np.testing.assert_array_equal(right, (np.argmax(a, axis=1) == np.argmax(y, axis=1)).astype(np.int32))
    assert list(right) == [1, 1, 1, 0, 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_softmax_rows(emu, dtype):
    m, k = 5, 70
    z = _logits((m, k), dtype, seed=2)
    a = np.empty_like(z)
    emu[f"fb_softmax_rows<{_t(dtype)}>"](*kc._grid_rows(m), (z, a, np.int32(m), np.int32(k)))
    _close(a, _act("softmax", z), ELEM[dtype])
    g = _logits((m, k), dtype, seed=3)
    g_ref = g.copy()
    REF.activation_backward("softmax", z, a, g_ref)
    emu[f"fb_softmax_backward_rows<{_t(dtype)}>"](*kc._grid_rows(m), (a, g, np.int32(m), np.int32(k)))
    _close(g, g_ref, ELEM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ELEMENTWISE_ACTIVATIONS)
@pytest.mark.parametrize("m, k, sm_count", [(6, 9, 1), (37, 70, 1), (9, 300, 2)])
def test_emulated_bias_act_and_dact(emu, dtype, name, m, k, sm_count):
    z0 = _logits((m, k), dtype, seed=4)
    bias = _logits((k,), dtype, seed=5)
    z, a = z0.copy(), np.empty_like(z0)
    t, code = _t(dtype), np.int32(ACT_CODE[name])
    emu[f"fb_bias_act<{t}>"](*kc._grid_bias_act(m, k, sm_count), (z, bias, a, np.int32(m), np.int32(k), code))
    z_ref = z0 + bias
    _close(z, z_ref, ELEM[dtype])
    _close(a, _act(name, z_ref), ELEM[dtype])
    d = _logits((m, k), dtype, seed=6)
    d_ref = d.copy()
    REF.activation_backward(name, z, a, d_ref)
    emu[f"fb_dact_inplace<{t}>"](*kc._grid_1d(d.size), (d, z, a, np.int64(d.size), code))
    _close(d, d_ref, ELEM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m, k, sm_count", [(37, 45, 1), (300, 45, 3), (200, 7, 4)])
def test_emulated_bias_grad(emu, dtype, accumulate, m, k, sm_count):
    """One pass (one chunk) and two passes (row chunks, then fb_bias_grad_finish)."""
    d = _logits((m, k), dtype, seed=7)
    out = _logits((k,), dtype, seed=8)
    ref = out.copy()
    REF.bias_grad(d, ref, alpha=0.25, accumulate=accumulate)
    chunks, rows = kc._bias_chunks(m, k, sm_count)
    assert (chunks > 1) == (m >= 128 and sm_count > 1)
    partial = np.full(chunks * k, np.nan, dtype) if chunks > 1 else kc._NULL
    T, i32, t = np.dtype(dtype).type, np.int32, _t(dtype)
    emu[f"fb_bias_grad<{t}>"](*kc._grid_bias(k, chunks), (d, out, partial, i32(m), i32(k), i32(rows), T(0.25),
                                                        i32(accumulate)))
    if chunks > 1:
        emu[f"fb_bias_grad_finish<{t}>"](*kc._grid_1d(k), (partial, out, i32(chunks), i32(k), T(0.25), i32(accumulate)))
    _close(out, ref, GEMM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", kc._GEMM_TILES)
@pytest.mark.parametrize("trans", kc._GEMM_SHAPES)
def test_emulated_gemm(emu, dtype, tile, trans):
    ta, tb = trans
    M, N, K = 70, 45, 37  # ragged in every direction, several K steps
    rng = np.random.default_rng(9)
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    product = (A.T if ta else A).astype(np.float64) @ (B.T if tb else B).astype(np.float64)
    T, i32, name = np.dtype(dtype).type, np.int32, kc._gemm_name(_t(dtype), ta, tb, tile)
    grid_block = kc._grid_gemm(M, N, tile)
    bias, ez = rng.standard_normal(N).astype(dtype), rng.standard_normal((M, N)).astype(dtype)
    ea = np.tanh(ez)

    def run(C, alpha, beta, epi, act, b=kc._NULL, z=kc._NULL, a=kc._NULL, aout=kc._NULL):
        emu[name](*grid_block, (i32(M), i32(N), i32(K), A, i32(A.shape[1]), B, i32(B.shape[1]), C, i32(N),
                                T(alpha), T(beta), i32(epi), i32(act), b, z, a, aout))

    C = np.full((M, N), np.nan, dtype)
    run(C, 0.5, 0.0, kc._EPI_NONE, 0)  # beta == 0: C is not read (NaN stays out)
    _close(C, 0.5 * product, GEMM[dtype])
    C0 = rng.standard_normal((M, N)).astype(dtype)
    C = C0.copy()
    run(C, 2.0, 0.25, kc._EPI_NONE, 0)
    _close(C, 2.0 * product + 0.25 * C0, GEMM[dtype])
    Z, A_out = np.empty((M, N), dtype), np.empty((M, N), dtype)
    run(Z, 1.0, 0.0, kc._EPI_BIAS_ACT, ACT_CODE["sigmoid"], b=bias, aout=A_out)
    _close(Z, product + bias, GEMM[dtype])
    _close(A_out, _act("sigmoid", (product + bias).astype(dtype)), GEMM[dtype])
    D = np.empty((M, N), dtype)
    run(D, 1.0, 0.0, kc._EPI_DACT, ACT_CODE["tanh"], z=ez, a=ea)
    _close(D, product * (1 - ea.astype(np.float64) ** 2), GEMM[dtype])


def _slot(name):
    return {**kc.COUNTER_SLOT, **kc.STATUS_SLOT, **kc.TABLE_SLOT}[name]


def _host_state(X, Y, n, batch=0, step=0):
    """_EpochState's arrays on the host, as the emulated kernels read them."""
    st = kc._EpochState(HOST)
    st.table[[_slot("tab_x"), _slot("tab_y")]] = [X.ctypes.data, Y.ctypes.data]
    st.ctr[[_slot("ctr_batch"), _slot("ctr_step"), _slot("ctr_rows")]] = [batch, step, n]
    return st


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_gather_and_accumulate(emu, dtype):
    t, i32 = _t(dtype), np.int32
    X, Y = _logits((10, 3), dtype, seed=10), _logits((10, 2), dtype, seed=11)
    st = _host_state(X, Y, 10, batch=1, step=5)
    xs, ys = np.empty((4, 3), dtype), np.empty((4, 2), dtype)
    gather = emu[f"fb_gather_batch<{t}>"]
    gather(*kc._grid_1d(4 * 5), (st.table, st.ctr, st.status, xs, ys, i32(4), i32(4), i32(3), i32(2)))
    np.testing.assert_array_equal(xs, X[4:8])
    np.testing.assert_array_equal(ys, Y[4:8])

    rows = np.arange(300, dtype=np.float64) / 7  # more rows than threads
    right = (np.arange(300) % 3 == 0).astype(np.int32)
    emu[f"fb_accumulate_loss<{t}>"]((1,), (256,), (rows, right, i32(300), st.status, st.ctr))
    _close(st.status[[_slot("st_cost"), _slot("st_done"), _slot("st_stop"), _slot("st_correct")]],
           [rows.sum(), 300, 0, right.sum()], GEMM["float64"])
    assert st.ctr[_slot("ctr_batch")] == 2 and st.ctr[_slot("ctr_step")] == 6  # the step advances with the batch

    rows[5] = np.inf  # a non-finite batch: recorded as the stop, its cost, size, count and step left out
    emu[f"fb_accumulate_loss<{t}>"]((1,), (256,), (rows, right, i32(300), st.status, st.ctr))
    assert st.status[_slot("st_stop")] == kc.STOP_CODE["stop_nonfinite"] and st.status[_slot("st_done")] == 300
    assert st.ctr[_slot("ctr_batch")] == 3 and st.ctr[_slot("ctr_step")] == 6


@pytest.mark.parametrize("batch, m", [(2, 4), (3, 2), (-1, 4)])
def test_emulated_gather_refuses_rows_past_the_data_set(emu, batch, m):
    """Batch 2 of 4 rows in a 10-row set would read rows 8..11: nothing is copied, the epoch stops."""
    X, Y = np.arange(30.0).reshape(10, 3), np.arange(20.0).reshape(10, 2)
    st = _host_state(X, Y, 10, batch=batch)
    xs, ys = np.full((m, 3), -7.0), np.full((m, 2), -7.0)
    emu["fb_gather_batch<double>"](*kc._grid_1d(m * 5), (st.table, st.ctr, st.status, xs, ys, np.int32(4),
                                                         np.int32(m), np.int32(3), np.int32(2)))
    ok = 0 <= batch * 4 and batch * 4 + m <= 10
    assert st.status[_slot("st_stop")] == (0 if ok else kc.STOP_CODE["stop_range"])
    if ok:
        np.testing.assert_array_equal(xs, X[batch * 4:batch * 4 + m])
    else:
        assert (xs == -7).all() and (ys == -7).all()


def _emu_update(emu, spec, rule, params, grads, state, rows, *, captured=False):
    """fb_update as update() launches it (host step count, state pointers) or as the captured step
    does (step from ctr, already advanced by fb_accumulate_loss; state from the table)."""
    i32, i64 = np.int32, np.int64
    bufs = state.buffers
    s0 = bufs[0] if rule.n_buffers >= 1 else kc._NULL
    s1 = bufs[1] if rule.n_buffers >= 2 else kc._NULL
    hp, ranges, n = rule.hyper(), kc.weight_ranges(spec), params.size
    name = f"fb_update<{_t(params.dtype)}>"
    if captured:
        st = kc._EpochState(HOST)
        st.table[[_slot("tab_s0"), _slot("tab_s1")]] = [kc._data_ptr(s0) if rule.n_buffers else 0,
                                                        kc._data_ptr(s1) if rule.n_buffers > 1 else 0]
        st.ctr[_slot("ctr_step")] = state.steps + 1
        emu[name](*kc._grid_1d(n), (params, grads, kc._NULL, kc._NULL, i64(n), hp, st.ctr, i64(0), i32(rows), ranges,
                                    i32(spec.n_layers), st.table, st.status))
    else:
        emu[name](*kc._grid_1d(n), (params, grads, s0, s1, i64(n), hp, kc._NULL, i64(state.steps + 1), i32(rows),
                                    ranges, i32(spec.n_layers), kc._NULL, kc._NULL))
    state.step[0] += 1


@pytest.mark.parametrize("captured", [False, True], ids=["host-step", "device-step"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RULES)
def test_emulated_update_rules(emu, name, dtype, captured):
    """Four steps of every rule against the reference, bit for bit: the kernel rounds each operation
    as NumPy does (plain SGD included, the case the old fb_sgd kernel was exact for)."""
    rule = RULES[name]
    spec, p0, grads = _update_case(dtype)
    ours, ref = p0.copy(), p0.copy()
    s_ours, s_ref = new_state(spec, rule), new_state(spec, rule)
    for g in grads:
        _emu_update(emu, spec, rule, ours, g, s_ours, 7, captured=captured)
        reference_update(spec, rule, ref, g, s_ref, 7)
    tol = dict(rtol=0, atol=0) if dtype == "float64" or rule.kind == "sgd" else dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, ref, **tol)
    np.testing.assert_allclose(s_ours.buffers, s_ref.buffers, **tol)
    assert not np.array_equal(ours, p0)


def test_emulated_update_is_skipped_after_a_stop(emu):
    spec, p0, grads = _update_case("float64")
    rule = RULES["adam"]
    params, state = p0.copy(), new_state(spec, rule)
    st = kc._EpochState(HOST)
    st.table[[_slot("tab_s0"), _slot("tab_s1")]] = [state.buffers[0].ctypes.data, state.buffers[1].ctypes.data]
    st.ctr[_slot("ctr_step")] = 1
    st.status[_slot("st_stop")] = kc.STOP_CODE["stop_nonfinite"]
    emu["fb_update<double>"](*kc._grid_1d(params.size), (
        params, grads[0], kc._NULL, kc._NULL, np.int64(params.size), rule.hyper(), st.ctr, np.int64(0), np.int32(3),
        kc.weight_ranges(spec), np.int32(spec.n_layers), st.table, st.status))
    np.testing.assert_array_equal(params, p0)
    assert not state.buffers.any()


# ---------------------------------------------------------------- whole epochs of _StepPlan


class FakeDeviceArray(np.ndarray):
    """A NumPy array with the cupy.ndarray methods the backend uses."""

    def set(self, arr, stream=None):
        np.copyto(self, arr)

    def get(self, stream=None):
        return np.array(self)


class _HostArrays:
    """The allocation half of an array module, giving FakeDeviceArrays (for _EpochState on the host)."""

    ndarray = FakeDeviceArray

    @staticmethod
    def zeros(shape, dtype=float):
        return np.zeros(shape, dtype).view(FakeDeviceArray)

    @staticmethod
    def empty(shape, dtype=float):
        return np.empty(shape, dtype).view(FakeDeviceArray)

    @staticmethod
    def asarray(x, dtype=None):
        return np.array(x, dtype=dtype).view(FakeDeviceArray)


HOST = _HostArrays()

_STUB_CUBLAS = r"""
/* The cuBLAS entry points fastbp calls, on host memory: cublasGemmEx is the column-major
   reference GEMM, so _CublasDirect's ctypes marshalling and operand swap are checked for real.
   COMPUTE_32F_FAST_TF32 (77) rounds float32 operands to TF32 (10-bit mantissa) as tensor cores do. */
#include <stddef.h>
#include <string.h>
static int calls, last_compute = -1, destroyed;
int fb_stub_calls(void) { return calls; }
int fb_stub_last_compute(void) { return last_compute; }
int fb_stub_destroyed(void) { return destroyed; }
int cublasCreate_v2(void** handle) { *handle = (void*)0x1; return 0; }
int cublasDestroy_v2(void* handle) { destroyed++; return handle == (void*)0x1 ? 0 : 1; }
int cublasSetStream_v2(void* handle, void* stream) { return handle == (void*)0x1 ? 0 : 1; }
int cublasSetWorkspace_v2(void* handle, void* ws, size_t bytes) { return handle == (void*)0x1 ? 0 : 1; }
static float tf32(float x) { unsigned u; memcpy(&u, &x, 4); u += 0xFFFu + ((u >> 13) & 1u); u &= ~0x1FFFu;
                              memcpy(&x, &u, 4); return x; }
#define GEMM(T, R) { const T *a = A, *b = B; T* c = C; const T al = *(const T*)alpha, be = *(const T*)beta; \
    for (int j = 0; j < n; ++j) for (int i = 0; i < m; ++i) { double s = 0; \
        for (int l = 0; l < k; ++l) \
            s += (double)R(ta ? a[l + (long)i * lda] : a[i + (long)l * lda]) \
               * (double)R(tb ? b[j + (long)l * ldb] : b[l + (long)j * ldb]); \
        c[i + (long)j * ldc] = (T)(al * s + (be != 0 ? be * c[i + (long)j * ldc] : 0)); } }
#define SAME(x) (x)
int cublasGemmEx(void* handle, int ta, int tb, int m, int n, int k, const void* alpha,
                 const void* A, int atype, int lda, const void* B, int btype, int ldb,
                 const void* beta, void* C, int ctype, int ldc, int compute, int algo) {
    if (handle != (void*)0x1 || atype != ctype || btype != ctype || algo != -1) return 7;
    if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) return 7;
    calls++;
    last_compute = compute;
    if (ctype == 0 && compute == 68) GEMM(float, SAME)
    else if (ctype == 0 && compute == 77) GEMM(float, tf32)
    else if (ctype == 1 && compute == 70) GEMM(double, SAME)
    else return 7;
    return 0;
}
"""
STUB_ENUMS = {"R_32F": 0, "R_64F": 1, "COMPUTE_32F": 68, "COMPUTE_32F_FAST_TF32": 77, "COMPUTE_64F": 70}


@pytest.fixture(scope="module")
def stub_lib(tmp_path_factory):
    """The stub libcublas (CUDA_R_32F = 0, CUDA_R_64F = 1, COMPUTE_32F = 68, _FAST_TF32 = 77, COMPUTE_64F = 70)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    directory = tmp_path_factory.mktemp("stub")
    src, lib = directory / "stub.c", directory / "libstubcublas.so"
    src.write_text(_STUB_CUBLAS)
    proc = subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(lib))


def stub_handle(lib, tf32=False):
    blas = kc._CublasDirect(lib, 0, 0, 1 << 20, STUB_ENUMS, -1, tf32=tf32)
    blas.calls = lib.fb_stub_calls
    return blas


@pytest.fixture(scope="module")
def stub_blas(stub_lib):
    return stub_handle(stub_lib)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_direct_cublas_gemm_in_every_transposition(stub_blas, dtype, ta, tb):
    """_CublasDirect's row-major to column-major mapping, through the ctypes prototype."""
    M, N, K = 7, 5, 3
    rng = np.random.default_rng(3)
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    C0 = rng.standard_normal((M, N)).astype(dtype)
    C = C0.copy()
    stub_blas.gemm(ta, tb, M, N, K, 0.5, A, A.shape[1], B, B.shape[1], 2.0, C, N)
    _close(C, 0.5 * (A.T if ta else A) @ (B.T if tb else B) + 2.0 * C0, GEMM[dtype])


def test_direct_cublas_handle_is_destroyed(stub_lib):
    before = stub_lib.fb_stub_destroyed()
    handle = stub_handle(stub_lib)
    del handle
    assert stub_lib.fb_stub_destroyed() == before + 1


SPECS = [
    ((5, 7, 3), "sigmoid", "identity", "mse"),
    ((6, 9, 8, 4), "relu", "softmax", "cross_entropy"),
    ((4, 40, 1), "tanh", "sigmoid", "log_loss"),
    ((3, 6, 2), "leaky_relu", "tanh", "log_loss"),  # clipped activation path
    ((5, 4, 3), "identity", "softmax", "mse"),  # softmax vector-Jacobian product
]
DIVERGING = ((5, 7, 3), "leaky_relu", "identity", "mse")  # 1e300 inputs overflow its cost


def _epoch_case(spec_args, dtype, n=11, seed=0):
    sizes, hidden, output, loss = spec_args
    spec = NetSpec(sizes, hidden, output, loss, np.dtype(dtype))
    rng = np.random.default_rng(seed)
    params = (rng.standard_normal(spec.n_params) * 0.5).astype(dtype)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    Y = target_rows(loss, (n, sizes[-1]), dtype, seed=seed + 1)
    return spec, params, X, Y


def run_plans(spec, params, X, Y, batch, route, *, kernels, sm_count, blas=None, rule=RULES["sgd"], state=None):
    """What CupyBackend.train_epoch does around its graphs, with the plans issued directly on the host."""
    state = new_state(spec, rule) if state is None else state
    st = kc._EpochState(HOST)
    st.load(None, X, Y, len(X), rule, state)
    slot = kc._ParamSlot(np, spec)
    slot.params[:] = params
    full, tail = divmod(len(X), batch)
    make = lambda m: kc._StepPlan(spec, slot, m, batch, xp=np, kernels=kernels, state=st,  # noqa: E731
                                  sm_count=sm_count, blas=(blas, blas))
    plans = ([(make(batch), full)] if full else []) + ([(make(tail), 1)] if tail else [])
    for plan, count in plans:
        for _ in range(count):
            plan.issue(route)
    params[:] = slot.params
    status = st.status
    state.step[0] += kc._cdiv(int(status[_slot("st_done")]), batch)
    return float(status[_slot("st_cost")]), int(status[_slot("st_done")]), int(status[_slot("st_correct")])


ROUTE_CASES = [("graph-raw", 1), ("graph-raw", 10**6), ("eager", 1), ("graph-cublas", 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route, sm_count", ROUTE_CASES)
@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: "-".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-{s[3]}")
def test_emulated_epoch_matches_reference(emu, stub_blas, spec_args, route, sm_count, dtype):
    spec, params, X, Y = _epoch_case(spec_args, dtype)
    kernels = {name: k for name, k in emu.items() if f"<{_t(dtype)}" in name}
    expected = params.copy()
    ref = reference_epoch(spec, expected, X, Y, 4)
    calls = stub_blas.calls()
    ours = run_plans(spec, params, X, Y, 4, route, kernels=kernels, sm_count=sm_count, blas=stub_blas)
    if route == "graph-cublas":  # three GEMMs per layer and batch, less the first layer's delta
        assert stub_blas.calls() - calls == 3 * (3 * spec.n_layers - 1)
    assert ours[1] == ref[1] == len(X) and ours[2] == ref[2]
    _close(ours[0], ref[0], GEMM[dtype], "epoch cost")
    _close(params, expected, GEMM[dtype], "parameters after the epoch")


# every rule on one route, and Adam (two moments, bias corrections) on every route and dtype
RULE_CASES = ([(name, "graph-raw", 1, "float64") for name in RULES if name != "sgd"]
              + [("adam", route, sm, "float32") for route, sm in ROUTE_CASES])


@pytest.mark.parametrize("name, route, sm_count, dtype", RULE_CASES)
def test_emulated_epoch_every_rule(emu, stub_blas, name, route, sm_count, dtype):
    """Each rule fused into the step: three epochs (the step count and bias corrections carried in the
    state), parameters, moments and step count against the reference epoch."""
    rule = RULES[name]
    spec, params, X, Y = _epoch_case(SPECS[1], dtype, n=10)
    kernels = {k: v for k, v in emu.items() if f"<{_t(dtype)}" in k}
    expected, s_ours, s_ref = params.copy(), new_state(spec, rule), new_state(spec, rule)
    for _ in range(3):
        ref = reference_epoch(spec, expected, X, Y, 4, rule, s_ref)
        ours = run_plans(spec, params, X, Y, 4, route, kernels=kernels, sm_count=sm_count, blas=stub_blas,
                         rule=rule, state=s_ours)
        assert ours[1:] == ref[1:]
        _close(ours[0], ref[0], GEMM[dtype])
    assert s_ours.steps == s_ref.steps == 9
    _close(params, expected, GEMM[dtype], "parameters")
    _close(s_ours.buffers, s_ref.buffers, GEMM[dtype], "optimizer state")


@pytest.mark.parametrize("route", ["graph-raw", "eager"])
def test_emulated_epoch_stops_at_the_first_nonfinite_batch(emu, route):
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300  # batch 2 of 4: its cost overflows
    kernels = {name: k for name, k in emu.items() if "<double" in name}
    expected = params.copy()
    rule = RULES["adam"]
    s_ours, s_ref = new_state(spec, rule), new_state(spec, rule)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = reference_epoch(spec, expected, X, Y, 4, rule, s_ref)
        assert ref[1] == 8
        ours = run_plans(spec, params, X, Y, 4, route, kernels=kernels, sm_count=1, rule=rule, state=s_ours)
    assert ours[1] == 8 and s_ours.steps == s_ref.steps == 2
    _close(ours[0], ref[0], GEMM["float64"])
    _close(params, expected, GEMM["float64"])  # the last finite parameters, later batches skipped
    _close(s_ours.buffers, s_ref.buffers, GEMM["float64"])


# ---------------------------------------------------------------- CupyBackend on an emulated device


class FakeCupy(types.ModuleType):
    """Just enough of cupy for CupyBackend's training path: arrays on the host, RawModule kernels
    run by the emulator, and stream capture that records launches and replays them on
    ``graph.launch`` (arguments baked at capture, as in a CUDA graph). Capture is per thread (each
    thread captures on its own stream). Like CuPy, it refuses cuBLAS (matmul) while capturing.
    ``compute_types`` records CuPy's float32 GEMM setting (``_core._routines_linalg``)."""

    def __init__(self, emu):
        super().__init__("fakecupy")
        fake = self
        self._tls = threading.local()
        self.ndarray = FakeDeviceArray
        self.launches = self.captures = self.side_waits = 0
        self.compute_types = []

        class Kernel:
            def __init__(self, name):
                self.name = name

            def __call__(self, grid, block, args, shared_mem=0):
                fake.run(lambda: emu[self.name](grid, block, args))

        class Module:
            def __init__(self, code=None, name_expressions=(), **kwargs):
                assert code == kc.module_source()
                self.names = set(name_expressions)

            def get_function(self, name):
                assert name in self.names
                return Kernel(name)

        class Graph:
            def __init__(self, ops):
                self.ops = ops

            def launch(self, stream=None):
                assert fake.recording is None
                fake.launches += 1
                for op in self.ops:
                    op()

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False):
                self.recorded = False

            def record(self, stream=None):
                self.recorded = True

        class Stream:
            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
                self.ptr = 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def record(self, event=None):
                event = event or Event()
                event.record(self)
                return event

            def wait_event(self, event):
                if fake.recording is not None:
                    fake.side_waits += 1

            def synchronize(self):
                pass

            def begin_capture(self, mode=None):
                assert fake.recording is None
                fake.recording = []

            def end_capture(self):
                graph, fake.recording = Graph(fake.recording), None
                fake.captures += 1
                return graph

        class Device:
            id, compute_capability = 0, "90"

            def synchronize(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class CUDARuntimeError(RuntimeError):
            pass

        self.RawModule = Module
        self.ElementwiseKernel = lambda *args, **kwargs: None  # not on the training path
        self.cuda = types.SimpleNamespace(
            Stream=Stream, Event=Event, Device=Device, get_current_stream=lambda: Stream(),
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError,
                getDeviceProperties=lambda i: {"name": b"emulated", "multiProcessorCount": 2},
                memGetInfo=lambda: (1 << 30, 1 << 31), runtimeGetVersion=lambda: 12090,
                driverGetVersion=lambda: 12090))
        self.linalg = types.SimpleNamespace(norm=lambda x: float(np.linalg.norm(np.asarray(x))))
        self.isfinite = np.isfinite
        self.__version__ = "fake"
        self.routines_linalg = types.SimpleNamespace(
            COMPUTE_TYPE_DEFAULT="default", COMPUTE_TYPE_TF32="tf32",
            set_compute_type=lambda dtype, value: fake.compute_types.append((np.dtype(dtype), value)))

    @property
    def recording(self):
        return getattr(self._tls, "recording", None)

    @recording.setter
    def recording(self, value):
        self._tls.recording = value

    def run(self, op):
        if self.recording is not None:
            self.recording.append(op)
        else:
            op()

    @staticmethod
    def _wrap(a):
        return a.view(FakeDeviceArray)

    def empty(self, shape, dtype=float):
        return self._wrap(np.empty(shape, dtype))

    def zeros(self, shape, dtype=float):
        return self._wrap(np.zeros(shape, dtype))

    def zeros_like(self, a):
        return self._wrap(np.zeros_like(a))

    def asarray(self, x, dtype=None):
        return self._wrap(np.array(x, dtype=dtype))

    def ascontiguousarray(self, x, dtype=None):
        return self._wrap(np.ascontiguousarray(x, dtype=dtype))

    def matmul(self, a, b, out=None):
        if self.recording is not None:
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
        return np.matmul(a, b, out=out)

    def multiply(self, a, b, out=None):
        self.run(lambda: np.multiply(a, b, out=out))

    def copyto(self, dst, src):
        self.run(lambda: np.copyto(dst, src))

    def take(self, src, index, axis=0, out=None):
        self.run(lambda: np.take(src, index, axis=axis, out=out))

    @staticmethod
    def asnumpy(a):
        return np.array(a)


class RecordingBlas:
    """A stub cuBLAS handle, captured like the real one (its calls become graph nodes); ``scale`` spoils it."""

    def __init__(self, fake, blas, scale=1.0):
        self.fake, self.blas, self.scale, self.library = fake, blas, scale, "stub"
        self.tf32 = blas.tf32

    def gemm(self, trans_a, trans_b, m, n, k, alpha, *rest):
        self.fake.run(lambda: self.blas.gemm(trans_a, trans_b, m, n, k, alpha * self.scale, *rest))


def _fake_backend(emu, stub_lib, monkeypatch, **kwargs):
    fake = FakeCupy(emu)
    monkeypatch.setitem(sys.modules, "fakecupy._core._routines_linalg", fake.routines_linalg)
    be = kc.CupyBackend(fake, **{"tf32": False, "step_route": "auto", "verify": True, **kwargs})
    be._blas_factory = lambda stream, tf32: RecordingBlas(fake, stub_handle(stub_lib, tf32))
    return be, fake


@pytest.fixture
def fake_backend(emu, stub_lib, monkeypatch):
    return _fake_backend(emu, stub_lib, monkeypatch)


def _dev_state(be, spec, rule):
    return new_state(spec, rule, zeros=be.zeros)


def _epochs(be, spec, params, X, Y, batch, rules, state=None):
    """train_epoch once per rule (rules may change between epochs), on device copies; returns the results."""
    p, g = be.asarray(params), be.zeros(params.shape, spec.dtype)
    state = _dev_state(be, spec, rules[0]) if state is None else state
    results = [be.train_epoch(spec, p, g, be.asarray(X), be.asarray(Y), batch, rule, state, "vectorized")
               for rule in rules]
    return results, be.to_numpy(p), state


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_device_row_kernels(fake_backend, dtype):
    """The basic kernels CupyBackend runs through its RawModule (the rest are one-line ElementwiseKernels)."""
    be, _ = fake_backend
    z = _logits((9, 37), dtype)
    a, a_ref = be.empty(z.shape, dtype), _act("softmax", z)
    be.activation("softmax", be.asarray(z), a)
    _close(np.asarray(a), a_ref, ELEM[dtype])
    g = _logits((9, 37), dtype, seed=5)
    g_ref, gd = g.copy(), be.asarray(g)
    REF.activation_backward("softmax", z, a_ref, g_ref)
    be.activation_backward("softmax", be.asarray(z), a, gd)
    _close(np.asarray(gd), g_ref, ELEM[dtype])
    big = _logits((300, 37), dtype, seed=9)  # several row chunks: the two-pass reduction
    assert kc._bias_chunks(300, 37, be.sm_count)[0] > 1
    for d in (z, big):
        for accumulate in (False, True):
            ref, out = d[0].copy(), be.asarray(d[0])
            REF.bias_grad(d, ref, alpha=0.5, accumulate=accumulate)
            be.bias_grad(be.asarray(d), out, alpha=0.5, accumulate=accumulate)
            _close(np.asarray(out), ref, GEMM[dtype])
    for output in ACTIVATIONS:
        a_ref = _act(output, z)
        for loss in LOSSES:
            y = target_rows(loss, z.shape, dtype)
            d_ref = np.empty_like(z)
            total_ref = REF.output_delta(loss, output, z, a_ref, y, d_ref)
            d = be.empty(z.shape, dtype)
            total = be.output_delta(loss, output, be.asarray(z), be.asarray(a_ref), be.asarray(y), d)
            assert np.asarray(total).dtype == np.float64  # summed in float64 whatever the model dtype
            _close(np.asarray(d), d_ref, ELEM[dtype], f"{output} {loss}")
            _close(float(total), total_ref, ELEM[dtype], f"{output} {loss}")
            _close(float(be.loss_sum(loss, output, be.asarray(z), be.asarray(a_ref), be.asarray(y))),
                   REF.loss_sum(loss, output, z, a_ref, y), ELEM[dtype])
    with pytest.raises(ValueError, match="unknown loss"):
        be.loss_sum("hinge", "identity", be.asarray(z), be.asarray(z), be.asarray(z))


def test_fake_device_float32_cost_sum_does_not_overflow(fake_backend):
    """Costs whose float32 sum would overflow: the sum is float64, as the NumPy backend's."""
    be, _ = fake_backend
    a = np.full((64, 4), 3e18, np.float32)
    y = np.zeros((64, 4), np.float32)
    total = float(be.loss_sum("mse", "identity", be.asarray(a), be.asarray(a), be.asarray(y)))
    assert np.isfinite(total) and total == pytest.approx(REF.loss_sum("mse", "identity", a, a, y), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RULES)
def test_fake_device_update(fake_backend, name, dtype):
    """Backend.update: the rule, several steps, the state's buffers and step count."""
    be, _ = fake_backend
    rule = RULES[name]
    spec, p0, grads = _update_case(dtype)
    p, state = be.asarray(p0), _dev_state(be, spec, rule)
    ref, s_ref = p0.copy(), new_state(spec, rule)
    for rows, g in zip([7, 7, 3, 7], grads):
        be.update(spec, rule, p, be.asarray(g), state, rows)
        reference_update(spec, rule, ref, g, s_ref, rows)
    assert state.steps == s_ref.steps == 4
    tol = dict(rtol=0, atol=0) if dtype == "float64" or rule.kind == "sgd" else dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(p), ref, **tol)
    np.testing.assert_allclose(np.asarray(state.buffers), s_ref.buffers, **tol)


def test_fake_device_update_rejects_bad_input_and_changes_nothing(fake_backend):
    be, _ = fake_backend
    spec, p0, grads = _update_case("float64")
    p, g = be.asarray(p0), be.asarray(grads[0])
    short = OptimizerState(be.zeros((1, spec.n_params), "float64"))  # Adam needs two buffers
    cases = [
        (UpdateRule("rmsprop"), short, 4, ValueError, "rule.kind"),
        (UpdateRule("adam"), short, 4, ValueError, r"state.buffers .* \(2 or more, "),
        (UpdateRule("sgd", momentum=0.9), OptimizerState(np.zeros((1, spec.n_params))), 4, TypeError, "GPU"),
        (UpdateRule("sgd"), short, 0, ValueError, "rows=0"),
        ("sgd", short, 4, TypeError, "UpdateRule"),
    ]
    for rule, state, rows, error, match in cases:
        with pytest.raises(error, match=match):
            be.update(spec, rule, p, g, state, rows)
        np.testing.assert_array_equal(np.asarray(p), p0)
        assert state.steps == 0 and not np.asarray(state.buffers).any()
    with pytest.raises(ValueError, match="rule.kind"):
        be.train_epoch(spec, p, g, be.zeros((4, 6), "float64"), be.zeros((4, 3), "float64"), 2,
                       UpdateRule("rmsprop"), short, "vectorized")
    np.testing.assert_array_equal(np.asarray(p), p0)


def test_supports_epoch_takes_every_rule(fake_backend):
    be, _ = fake_backend
    spec = NetSpec((3, 4, 2), "relu", "softmax", "cross_entropy", np.dtype("float32"))
    assert all(be.supports_epoch(spec, 8, "vectorized", rule) for rule in RULES.values())
    assert not be.supports_epoch(spec, 8, "loop", RULES["adam"])


@pytest.mark.parametrize("route, dtype, fork", [
    ("graph-cublas", "float64", True), ("graph-cublas", "float32", False), ("graph-raw", "float32", True),
    ("graph-raw", "float64", False), ("eager", "float64", True)])
def test_fake_device_train_epoch(emu, stub_lib, monkeypatch, route, dtype, fork):
    be, fake = _fake_backend(emu, stub_lib, monkeypatch, fork=fork)
    be.step_route = route
    spec, params, X, Y = _epoch_case(SPECS[1], dtype, n=23)
    expected = params.copy()
    p, g = be.asarray(params), be.zeros(params.shape, dtype)
    rules = [RULES["sgd"], UpdateRule("sgd", lr=0.05), UpdateRule("sgd", lr=0.05)]  # an lr schedule
    state = _dev_state(be, spec, rules[0])
    for epoch, rule in enumerate(rules):
        Xe, Ye = (X[::-1].copy(), Y[::-1].copy()) if epoch == 2 else (X, Y)  # a new data buffer
        ref = reference_epoch(spec, expected, Xe, Ye, 5, rule)
        ours = be.train_epoch(spec, p, g, be.asarray(Xe), be.asarray(Ye), 5, rule, state, "vectorized")
        assert isinstance(ours[0], float) and ours[1:] == ref[1:] and ours[1] == 23
        _close(ours[0], ref[0], GEMM[dtype], f"epoch {epoch} cost")
        _close(np.asarray(p), expected, GEMM[dtype], f"epoch {epoch} parameters")
    assert state.steps == 15
    assert be.last_route[(spec.sizes, 5)] == route and be.last_route[(spec.sizes, 3)] == route
    ctx = be._ctx()
    assert len(ctx.steps) == 2  # one prepared step per batch size, reused by every epoch and lr
    # 3 epochs of 5 batches (4 of 5 rows, 1 of 3), plus one verification launch per graph
    assert fake.launches == (3 * 5 + 2 if route != "eager" else 0)
    assert fake.captures == (2 if route != "eager" else 0)
    # the fork: one wait per layer and a join, captured, in each of the two graphs
    assert fake.side_waits == (2 * (spec.n_layers + 1) if fork and route != "eager" else 0)


@pytest.mark.parametrize("route", ["graph-cublas", "graph-raw"])
def test_fake_device_graphs_serve_every_model_and_hold_none(fake_backend, route):
    """The step key has no model's arrays: a second model of the same shape replays the same graphs,
    and a model dropped by its owner is freed (no plan keeps its parameters alive)."""
    be, fake = fake_backend
    be.step_route = route
    spec, params, X, Y = _epoch_case(SPECS[0], "float64", n=12)
    rule = RULES["momentum"]
    for seed in range(3):
        p0 = params * (seed + 1)
        expected, s_ref = p0.copy(), new_state(spec, rule)
        ref = reference_epoch(spec, expected, X, Y, 4, rule, s_ref)
        p, g, state = be.asarray(p0), be.zeros(p0.shape, "float64"), _dev_state(be, spec, rule)
        ours = be.train_epoch(spec, p, g, be.asarray(X), be.asarray(Y), 4, rule, state, "vectorized")
        _close(ours[0], ref[0], GEMM["float64"])
        _close(np.asarray(p), expected, GEMM["float64"])
        _close(np.asarray(state.buffers), s_ref.buffers, GEMM["float64"])
        refs = [weakref.ref(p), weakref.ref(g), weakref.ref(state.buffers)]
        del p, g, state
        assert all(r() is None for r in refs), "a prepared step keeps a model's arrays alive"
    assert fake.captures == 1 and len(be._ctx().steps) == 1


def test_fake_device_old_shapes_are_dropped_with_their_parameter_copies(fake_backend, monkeypatch):
    be, _ = fake_backend
    monkeypatch.setattr(kc.CupyBackend, "_MAX_STEPS", 2)
    rule = RULES["sgd"]
    for spec_args in SPECS[:3]:
        spec, params, X, Y = _epoch_case(spec_args, "float64", n=8)
        _epochs(be, spec, params, X, Y, 4, [rule])
    ctx = be._ctx()
    assert len(ctx.steps) == 2 and set(ctx.slots) == {k[0] for k in ctx.steps}


def test_fake_device_verification_drops_a_wrong_graph(fake_backend, stub_lib):
    be, fake = fake_backend
    be._blas_factory = lambda stream, tf32: RecordingBlas(fake, stub_handle(stub_lib, tf32), scale=1.01)
    spec, params, X, Y = _epoch_case(SPECS[0], "float64", n=12)
    rule = RULES["adam"]
    expected, s_ref = params.copy(), new_state(spec, rule)
    ref = reference_epoch(spec, expected, X, Y, 4, rule, s_ref)
    with pytest.warns(RuntimeWarning, match="step route 'graph-cublas' not used .* differs from the eager step"):
        (ours,), p, state = _epochs(be, spec, params, X, Y, 4, [rule])
    assert be.last_route[(spec.sizes, 4)] == "graph-raw"
    _close(ours[0], ref[0], GEMM["float64"])
    _close(p, expected, GEMM["float64"])  # the verification runs left no trace in parameters ...
    _close(np.asarray(state.buffers), s_ref.buffers, GEMM["float64"])  # ... moments ...
    assert state.steps == 3  # ... or the step count
    be.step_route = "graph-cublas"  # forced: an error, not a fallback
    with pytest.raises(RuntimeError, match="differs from the eager step"):
        _epochs(be, spec, params, X, Y, 4, [rule])


def test_fake_device_stops_at_the_first_nonfinite_batch(fake_backend):
    be, _ = fake_backend
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300
    expected = params.copy()
    rule = RULES["nesterov-wd"]
    s_ref = new_state(spec, rule)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = reference_epoch(spec, expected, X, Y, 4, rule, s_ref)
        (ours,), p, state = _epochs(be, spec, params, X, Y, 4, [rule])
    assert ours[1] == ref[1] == 8 and state.steps == 2
    _close(ours[0], ref[0], GEMM["float64"])
    _close(p, expected, GEMM["float64"])
    _close(np.asarray(state.buffers), s_ref.buffers, GEMM["float64"])


def test_fake_device_auto_reports_why_cublas_is_not_used(fake_backend):
    """auto falls back to graph-raw, says so once (RuntimeWarning) and keeps the reason in info()."""
    be, _ = fake_backend

    def broken(stream, tf32):
        raise OSError("libcublas.so.12: cannot open shared object file")

    be._blas_factory = broken
    spec, params, X, Y = _epoch_case(SPECS[0], "float64", n=8)
    with pytest.warns(RuntimeWarning, match=r"cannot call cuBLAS \(OSError: libcublas.so.12.*graph-raw"):
        _epochs(be, spec, params, X, Y, 4, [RULES["sgd"]])
    assert be.last_route[(spec.sizes, 4)] == "graph-raw"
    info = be.info()
    assert info["cublas_direct"] is None and "libcublas.so.12" in info["cublas_direct_error"]
    be.step_route = "graph-cublas"
    with pytest.raises(RuntimeError, match="no cuBLAS handle .*libcublas.so.12"):
        _epochs(be, spec, params, X, Y, 4, [RULES["sgd"]])


def test_fake_device_info_with_a_working_cublas(fake_backend):
    info = fake_backend[0].info()
    assert info["cublas_direct"] == "stub" and info["cublas_direct_error"] is None
    assert info["step_fork"] is True and info["tf32"] is False


def test_fake_device_tf32_switch_reaches_cupy_the_handles_and_the_graphs(emu, stub_lib, monkeypatch):
    """One switch: CuPy's compute type, the captured GEMMs' compute type (the stub rounds operands to
    TF32 under COMPUTE_32F_FAST_TF32) and the graphs made before it. Fails if any part stays FP32."""
    be, fake = _fake_backend(emu, stub_lib, monkeypatch)
    be.step_route = "graph-cublas"
    spec, params, X, Y = _epoch_case(SPECS[2], "float32", n=16)
    X = X * 3.7  # operands with bits beyond TF32's mantissa
    (fp32,), p_fp32, _ = _epochs(be, spec, params, X, Y, 8, [RULES["sgd"]])
    assert stub_lib.fb_stub_last_compute() == STUB_ENUMS["COMPUTE_32F"]
    assert fake.compute_types[-1] == (np.dtype(np.float32), "default")
    be.tf32 = True
    assert be.tf32 and fake.compute_types[-1] == (np.dtype(np.float32), "tf32") and be.info()["tf32"]
    (tf32,), p_tf32, _ = _epochs(be, spec, params, X, Y, 8, [RULES["sgd"]])
    assert stub_lib.fb_stub_last_compute() == STUB_ENUMS["COMPUTE_32F_FAST_TF32"]
    assert fake.captures == 2  # the FP32 graph was not replayed
    diff = np.abs(p_tf32 - p_fp32).max()
    assert 1e-6 < diff < 1e-2, diff  # TF32 rounding shows, and stays small
    be.tf32 = False
    (again,), p_again, _ = _epochs(be, spec, params, X, Y, 8, [RULES["sgd"]])
    np.testing.assert_array_equal(p_again, p_fp32)


def test_fake_device_tf32_needs_compute_capability_8(emu, stub_lib, monkeypatch):
    be, fake = _fake_backend(emu, stub_lib, monkeypatch)
    monkeypatch.setattr(type(be.device), "compute_capability", "75")
    with pytest.warns(RuntimeWarning, match="TF32 needs compute capability 8.0"):
        be.tf32 = True
    assert be.tf32 is False and fake.compute_types[-1] == (np.dtype(np.float32), "default")


@pytest.mark.parametrize("route", ["graph-cublas", "eager"])
def test_fake_device_two_threads_keep_their_own_streams_and_state(fake_backend, route):
    """Two models trained at once in two threads: each thread's epochs match the same epochs run
    alone. The emulated kernels release the GIL, so the threads interleave kernel by kernel; with
    one shared epoch state or parameter copy, one would train on the other's batches."""
    be, _ = fake_backend
    be.step_route = route
    cases = [_epoch_case(SPECS[1], "float64", n=20, seed=s) for s in (0, 1)]
    rule = RULES["adam"]
    alone = [_epochs(be, spec, params, X, Y, 5, [rule, rule])[:2] for spec, params, X, Y in cases]
    together, errors = [None, None], []

    def train(i):
        try:
            spec, params, X, Y = cases[i]
            together[i] = _epochs(be, spec, params, X, Y, 5, [rule, rule])[:2]
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (ref_results, ref_p), (results, p) in zip(alone, together):
        assert [r[1:] for r in results] == [r[1:] for r in ref_results]
        _close([r[0] for r in results], [r[0] for r in ref_results], GEMM["float64"])
        _close(p, ref_p, GEMM["float64"])
    contexts = {id(be._ctx())}
    other = []
    t = threading.Thread(target=lambda: other.append(be._ctx()))
    t.start()
    t.join()
    assert id(other[0]) not in contexts and other[0].stream is not be._ctx().stream


def _load_script(relative: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(relative.replace("/", "_")[:-3], os.path.join(ROOT, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_probe_runs_on_the_fake_device(fake_backend, monkeypatch, tmp_path):
    """make gpu-check's probe (NVRTC, direct cuBLAS in four transpositions, routes x rules against the
    reference) runs through on the emulated device, so its first real run is spent on the GPU's answers."""
    import json

    be, _ = fake_backend
    probe = _load_script("benchmarks/gpu_check/probe.py")
    monkeypatch.setattr(fb, "set_backend", lambda name: be)
    monkeypatch.setattr(probe, "ROUTE_SPECS", lambda t: (SPECS[0],))
    monkeypatch.setattr(probe, "ROUTE_RULES", ("adam",))
    monkeypatch.setattr(probe, "_peers_versions", lambda: {})
    rc = probe.gpu(str(tmp_path))
    record = json.loads((tmp_path / "probe.json").read_text())
    assert rc == 0, {k: record[k] for k in record["failed"]}
    assert len([k for k in record["cublas_direct"] if "ta=" in k]) == 8
    routes = {k: v for k, v in record["routes"].items() if k != "failed"}
    assert len(routes) == 2 * 5 and all(v["ok"] for v in routes.values())


@needs_no_gpu
def test_gpu_check_reports_no_device_here(tmp_path):
    """The script parses, runs its phases that need no GPU, says "no device" and exits 3."""
    import json

    script = os.path.join(ROOT, "benchmarks", "gpu_check", "run.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "BUDGET": "60"}
    env.pop("FASTBP_BACKEND", None)
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no device:" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_status"] == 3 and [p["phase"] for p in summary["phases"]][-2:] == ["env", "device"]
    assert (tmp_path / "log.txt").read_text().count("=== ") >= 4 and (tmp_path / "env.json").exists()


def test_gpu_peers_tf32_switch_for_torch():
    """torch >= 2.9: fp32_precision, never the deprecated allow_tf32 flags (mixing them raises there)."""
    torch = pytest.importorskip("torch")
    peers = _load_script("benchmarks/gpu_peers.py")
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    try:
        api = peers.set_torch_tf32(torch, True)
        assert api == ("fp32_precision" if before is not None else "allow_tf32")
        if before is not None:
            assert matmul.fp32_precision == "tf32"
            peers.set_torch_tf32(torch, False)
            assert matmul.fp32_precision == "ieee"
    finally:
        if before is not None:
            matmul.fp32_precision = before


def _training_loop_available() -> bool:
    try:
        import fastbp.training  # noqa: F401 -- the fit loop that calls update/train_epoch with rules
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _training_loop_available(), reason="fastbp.training (the rule-based fit loop) not present")
@pytest.mark.parametrize("batch_size, optimizer", [(1, "adam"), (7, "sgd"), (7, "adam"), (None, "sgd")])
def test_fake_device_fit_matches_the_numpy_backend(fake_backend, monkeypatch, batch_size, optimizer):
    """MLP.fit through CupyBackend.train_epoch (graphs replayed per batch) against the NumPy backend."""
    be, fake = fake_backend
    monkeypatch.setitem(registry._instances, "cupy", be)
    X, labels = np.random.default_rng(0).standard_normal((30, 5)), np.arange(30) % 3
    results = {}
    for name in ("numpy", "cupy"):
        with fb.use_backend(name):
            net = fb.MLP([5, 8, 3], activation="tanh", loss="cross_entropy", dtype="float64", seed=4)
            history = net.fit(X, labels, epochs=2, batch_size=batch_size, lr=0.05, optimizer=optimizer, seed=3,
                              progress=False)
            results[name] = (list(history), history.history.get("accuracy"),
                             np.concatenate([w.ravel() for w in net.get_params()[0]]))
    assert fake.launches > 0
    _close(results["cupy"][0], results["numpy"][0], GEMM["float64"])
    assert results["cupy"][1] == results["numpy"][1]
    _close(results["cupy"][2], results["numpy"][2], GEMM["float64"])


# ================================================================ on a GPU


@pytest.fixture
def cupy_be():
    with fb.use_backend("cupy") as be:
        yield be


def _dev(be, a):
    return be.asarray(a)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_basic_kernels(cupy_be, dtype):
    import cupy

    be = cupy_be
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((33, 17)).astype(dtype), rng.standard_normal((17, 21)).astype(dtype)
    C0 = rng.standard_normal((33, 21)).astype(dtype)
    for ta, tb in [(False, False), (True, False), (False, True), (True, True)]:
        a, b = (A.T.copy() if ta else A), (B.T.copy() if tb else B)
        for alpha, beta in [(1.0, 0.0), (0.5, 0.0), (2.0, 1.0), (1.0, 0.25)]:
            ref, out = C0.copy(), _dev(be, C0)
            REF.matmul(a, b, ref, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
            be.matmul(_dev(be, a), _dev(be, b), out, trans_a=ta, trans_b=tb, alpha=alpha, beta=beta)
            _close(be.to_numpy(out), ref, GEMM[dtype], f"matmul {ta} {tb} {alpha} {beta}")
    x, y = rng.standard_normal(8).astype(dtype), rng.standard_normal(5).astype(dtype)
    for accumulate in (False, True):
        ref, out = C0[:8, :5].copy(), _dev(be, C0[:8, :5])
        REF.outer(x, y, ref, alpha=0.5, accumulate=accumulate)
        be.outer(_dev(be, x), _dev(be, y), out, alpha=0.5, accumulate=accumulate)
        _close(be.to_numpy(out), ref, ELEM[dtype])
    ref, out = A.copy(), _dev(be, A)
    REF.add_bias(ref, A[0])
    be.add_bias(out, _dev(be, A[0]))
    _close(be.to_numpy(out), ref, ELEM[dtype])
    out = be.empty(A.shape, dtype)
    be.hadamard(_dev(be, A), _dev(be, A), out)
    _close(be.to_numpy(out), A * A, ELEM[dtype])
    big = rng.standard_normal((70000, 40)).astype(dtype)  # many row chunks: the two-pass bias reduction
    for d in (A, big):
        for accumulate in (False, True):
            ref, out = d[0].copy(), _dev(be, d[0])
            REF.bias_grad(d, ref, alpha=0.5, accumulate=accumulate)
            be.bias_grad(_dev(be, d), out, alpha=0.5, accumulate=accumulate)
            _close(be.to_numpy(out), ref, dict(rtol=1e-9, atol=1e-9) if dtype == "float64" else dict(rtol=1e-3, atol=1e-3))
    z = _logits((9, 37), dtype)
    for name in ACTIVATIONS:
        a_ref, a = _act(name, z), be.empty(z.shape, dtype)
        be.activation(name, _dev(be, z), a)
        _close(be.to_numpy(a), a_ref, ELEM[dtype], name)
        g = _logits((9, 37), dtype, seed=5)
        g_ref, gd = g.copy(), _dev(be, g)
        REF.activation_backward(name, z, a_ref, g_ref)
        be.activation_backward(name, _dev(be, z), a, gd)
        _close(be.to_numpy(gd), g_ref, ELEM[dtype], name)
        for loss in LOSSES:
            y = target_rows(loss, z.shape, dtype)
            d_ref = np.empty_like(z)
            total_ref = REF.output_delta(loss, name, z, a_ref, y, d_ref)
            d = be.empty(z.shape, dtype)
            total = be.output_delta(loss, name, _dev(be, z), a, _dev(be, y), d)
            assert isinstance(total, cupy.ndarray) and total.ndim == 0 and total.dtype == np.float64  # no host sync
            _close(be.to_numpy(d), d_ref, ELEM[dtype], f"{name} {loss}")
            _close(float(total), total_ref, ELEM[dtype], f"{name} {loss}")
            _close(float(be.loss_sum(loss, name, _dev(be, z), a, _dev(be, y))),
                   REF.loss_sum(loss, name, z, a_ref, y), ELEM[dtype])
            assert be.count_correct(loss, a, _dev(be, y)) == REF.count_correct(loss, a_ref, y)
    perm = rng.permutation(33)
    out = be.empty(A.shape, dtype)
    be.take_rows(_dev(be, A), be.index_array(perm), out)
    np.testing.assert_array_equal(be.to_numpy(out), A[perm])


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", RULES)
def test_gpu_update_rules(cupy_be, name, dtype):
    be, rule = cupy_be, RULES[name]
    spec, p0, grads = _update_case(dtype)
    p, state = _dev(be, p0), _dev_state(be, spec, rule)
    ref, s_ref = p0.copy(), new_state(spec, rule)
    for g in grads:
        be.update(spec, rule, p, _dev(be, g), state, 7)
        reference_update(spec, rule, ref, g, s_ref, 7)
    tol = dict(rtol=1e-13, atol=1e-14) if dtype == "float64" else dict(rtol=2e-6, atol=1e-7)
    _close(be.to_numpy(p), ref, tol)
    _close(be.to_numpy(state.buffers), s_ref.buffers, tol)
    assert state.steps == 4


@gpu
@needs_gpu
def test_gpu_info_and_flags(cupy_be):
    info = cupy_be.info()
    for key in ("device", "memory_total_bytes", "cuda_runtime", "cuda_driver", "cupy", "tf32", "step_route",
                "step_fork", "cublas_direct", "cublas_direct_error"):
        assert key in info
    assert info["cublas_direct_error"] is None, info["cublas_direct_error"]  # else auto runs graph-raw
    assert cupy_be.is_gpu and cupy_be.has_compiled_epoch and cupy_be.name == "cupy"
    with fb.use_backend("auto") as chosen:
        assert chosen.name == "cupy"


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gpu_direct_cublas_gemm(cupy_be, dtype, ta, tb):
    be = cupy_be
    ctx = be._ctx()
    blas = be._blas_handles(ctx)
    assert blas is not None, be._blas_error
    M, N, K = 70, 45, 37
    rng = np.random.default_rng(1)
    A = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    B = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    C0 = rng.standard_normal((M, N)).astype(dtype)
    a, b, c = _dev(be, A), _dev(be, B), _dev(be, C0)
    be.synchronize()
    with ctx.stream:
        blas.gemm(ta, tb, M, N, K, 0.5, a, A.shape[1], b, B.shape[1], 0.25, c, N)
    ctx.stream.synchronize()
    _close(be.to_numpy(c), 0.5 * (A.T if ta else A) @ (B.T if tb else B) + 0.25 * C0, GEMM[dtype])


@gpu
@needs_gpu
@pytest.mark.parametrize("fork", [True, False], ids=["fork", "serial"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", kc.STEP_ROUTES)
@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: "-".join(map(str, s[0])))
def test_gpu_captured_step_matches_reference(cupy_be, spec_args, route, dtype, fork):
    be = cupy_be
    spec, params, X, Y = _epoch_case(spec_args, dtype, n=37)
    old = be.step_route, be.fork
    be.step_route, be.fork = route, fork
    try:
        for rule in (RULES["sgd"], RULES["adam"]):
            expected, s_ref = params.copy(), new_state(spec, rule)
            p, g, state = _dev(be, params), be.zeros(params.shape, dtype), _dev_state(be, spec, rule)
            for epoch in range(2):  # the second epoch replays the graphs made in the first
                ref = reference_epoch(spec, expected, X, Y, 8, rule, s_ref)
                ours = be.train_epoch(spec, p, g, _dev(be, X), _dev(be, Y), 8, rule, state, "vectorized")
                assert ours[1:] == ref[1:] and ours[1] == len(X)
                _close(ours[0], ref[0], GEMM[dtype])
                _close(be.to_numpy(p), expected, GEMM[dtype])
                _close(be.to_numpy(state.buffers), s_ref.buffers, GEMM[dtype])
            assert be.last_route[(spec.sizes, 8)] == route and state.steps == 10
    finally:
        be.step_route, be.fork = old


@gpu
@needs_gpu
@pytest.mark.parametrize("route", kc.STEP_ROUTES)
def test_gpu_captured_step_stops_at_the_first_nonfinite_batch(cupy_be, route):
    be = cupy_be
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300
    expected = params.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        ref = reference_epoch(spec, expected, X, Y, 4)
    old = be.step_route
    be.step_route = route
    try:
        (ours,), p, state = _epochs(be, spec, params, X, Y, 4, [RULES["sgd"]])
    finally:
        be.step_route = old
    assert ours[1] == ref[1] == 8 and state.steps == 2
    _close(ours[0], ref[0], GEMM["float64"])
    _close(be.to_numpy(p), expected, GEMM["float64"])


@gpu
@needs_gpu
def test_gpu_graphs_serve_every_model(cupy_be):
    be = cupy_be
    spec, params, X, Y = _epoch_case(SPECS[1], "float32", n=32)
    before = len(be._ctx().steps)
    for seed in range(3):
        _epochs(be, spec, params * (seed + 1), X, Y, 8, [RULES["momentum"]])
    assert len(be._ctx().steps) - before <= 1


@gpu
@needs_gpu
def test_gpu_two_threads(cupy_be):
    """Two models at once in two threads on the captured step: each as it would be alone."""
    be = cupy_be
    cases = [_epoch_case(SPECS[1], "float64", n=4000, seed=s) for s in (0, 1)]
    rule = RULES["adam"]
    alone = [_epochs(be, *case, 50, [rule] * 3)[:2] for case in cases]
    together, errors = [None, None], []

    def train(i):
        try:
            together[i] = _epochs(be, *cases[i], 50, [rule] * 3)[:2]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (ref_results, ref_p), (results, p) in zip(alone, together):
        assert [r[1:] for r in results] == [r[1:] for r in ref_results]
        _close(be.to_numpy(p), be.to_numpy(ref_p), GEMM["float64"])


@gpu
@needs_gpu
@pytest.mark.parametrize("strategy", ["vectorized", "loop"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_gradients_match_numpy(dtype, strategy):
    X, Y = np.random.default_rng(0).standard_normal((13, 6)), np.eye(4)[np.arange(13) % 4]
    grads = {}
    for name in ("numpy", "cupy"):
        with fb.use_backend(name):
            net = fb.MLP([6, 10, 4], activation="tanh", loss="cross_entropy", dtype=dtype, seed=1)
            dWs, dbs = net.gradients(X, Y, strategy=strategy)
            grads[name] = [fb.to_numpy(g) for g in dWs + dbs]
    for ours, ref in zip(grads["cupy"], grads["numpy"]):
        _close(ours, ref, GEMM[dtype])


@gpu
@needs_gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch_size", [1, 16, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_training_trajectory_matches_numpy(dtype, batch_size, optimizer):
    rng = np.random.default_rng(0)
    X, labels = rng.standard_normal((50, 8)), rng.integers(0, 3, 50)
    results = {}
    for name in ("numpy", "cupy"):
        with fb.use_backend(name):
            net = fb.MLP([8, 16, 3], activation="relu", loss="cross_entropy", dtype=dtype, seed=2)
            history = net.fit(X, labels, epochs=3, batch_size=batch_size, lr=0.05 if optimizer == "sgd" else 0.01,
                              optimizer=optimizer, seed=7, progress=False)
            results[name] = (list(history), np.concatenate([w.ravel() for w in net.get_params()[0]]))
    _close(results["cupy"][0], results["numpy"][0], GEMM[dtype])
    _close(results["cupy"][1], results["numpy"][1], GEMM[dtype])


@gpu
@needs_gpu
def test_gpu_fit_diverges_cleanly():
    X = np.random.default_rng(0).standard_normal((64, 4)) * 1e3
    with fb.use_backend("cupy"):
        net = fb.MLP([4, 8, 1], activation="relu", loss="mse", dtype="float32", seed=0)
        start = [w.copy() for w in net.get_params()[0]]
        with pytest.raises(fb.TrainingDivergedError):
            net.fit(X, X[:, :1] * 1e30, epochs=1, batch_size=8, lr=1e10, progress=False)
        for before, after in zip(start, net.get_params()[0]):
            np.testing.assert_array_equal(before, after)


@gpu
@needs_gpu
def test_gpu_tf32_switch(cupy_be):
    """The switch must change both CuPy's matmul and the captured cuBLAS step (a lower bound on the
    TF32 error, not only an upper one), and switching back must give FP32 again."""
    be = cupy_be
    if int(be.device.compute_capability) < 80:
        pytest.skip("TF32 needs compute capability 8.0")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)).astype(np.float32), rng.standard_normal((512, 512)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    spec, params, X, Y = _epoch_case(((256, 256, 10), "relu", "softmax", "cross_entropy"), "float32", n=512)
    original, route = be.tf32, be.step_route
    errors, steps = {}, {}
    try:
        be.step_route = "graph-cublas"
        for tf32 in (False, True, False):
            be.tf32 = tf32
            out = be.empty((512, 512), np.float32)
            be.matmul(be.asarray(a), be.asarray(b), out)
            errors.setdefault(tf32, []).append(np.abs(be.to_numpy(out) - exact).max() / np.abs(exact).max())
            _, p, _ = _epochs(be, spec, params, X, Y, 128, [RULES["sgd"]])
            steps.setdefault(tf32, []).append(be.to_numpy(p))
            assert be.info()["tf32"] == tf32
    finally:
        be.tf32, be.step_route = original, route
    assert max(errors[False]) < 1e-5 and 1e-5 < errors[True][0] < 1e-2
    back = np.abs(steps[False][1] - steps[False][0]).max()  # FP32 again after the round trip
    diff = np.abs(steps[True][0] - steps[False][0]).max()  # the captured GEMMs followed the switch
    assert back <= 1e-7 and 10 * max(back, 1e-7) < diff < 1e-2, (back, diff)
