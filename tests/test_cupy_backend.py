"""The CuPy backend: selection and errors everywhere, its kernels on a GPU or, without one, emulated.

Three layers, so that as much as possible is checked on a machine without a GPU:

* CPU, always: the selection and error paths for real (cupy absent; cupy-cuda12x present but no
  driver; fakes for the other failures), and that importing fastbp never imports cupy.
* CPU with a C++ compiler: ``kernels/cuda/*.cu`` compiled as C++ against a small shim that runs
  each CUDA thread as an OS thread (``__syncthreads`` and warp shuffles are barriers), every
  kernel checked against the NumPy backend, and whole epochs of ``_StepPlan`` (the sequence a
  CUDA graph captures) on each route against a plain reference epoch. With nvcc: the same
  sources compiled for the device.
* GPU (marker ``gpu``, skipped unless cupy sees a device): every kernel, the gradients of both
  strategies, the captured step on every route, and whole training trajectories, against the
  NumPy backend. The rest of the suite also runs on cupy there (conftest's BACKENDS).

Tolerances: float64 to rounding (rtol 1e-10); float32 elementwise 1e-5, GEMM-based 2e-4.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import fastbp as fb
from conftest import target_rows
import fastbp.backend as registry
import fastbp.kernels.cupy as kc
from fastbp.errors import BackendUnavailableError
from fastbp.kernels.base import ACTIVATIONS, ELEMENTWISE_ACTIVATIONS, LOSSES, NetSpec
from fastbp.kernels.numpy import NumpyBackend

DTYPES = ["float64", "float32"]
ELEM = {"float64": dict(rtol=1e-12, atol=1e-13), "float32": dict(rtol=1e-5, atol=1e-6)}
GEMM = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-4, atol=1e-5)}
PIP = "pip install 'fastbp[cuda12]'"
REF = NumpyBackend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ================================================================ selection and errors (CPU)


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry that has not yet tried any backend (its caches are per process)."""
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_failures", {})
    monkeypatch.setattr(registry, "_active", None)
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
    assert info.value.reason == "cupy is not installed"
    assert PIP in str(info.value) and "fastbp[cuda13]" in str(info.value)
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


@pytest.mark.parametrize("message, reason", [
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version",
     "CUDA driver too old / not present"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected", "no CUDA device"),
    ("cudaErrorUnknown: unknown error", "CUDA runtime error at the first device call"),
])
def test_first_device_call_fails(fresh_registry, monkeypatch, message, reason):
    def count():
        raise error(message)

    module, error = _fake_cupy(count)
    monkeypatch.setitem(sys.modules, "cupy", module)
    with pytest.raises(BackendUnavailableError) as info:
        fb.set_backend("cupy")
    assert info.value.reason == f"{reason} ({message})"
    assert PIP in info.value.fix


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
        assert info.value.reason == "cupy is not installed"
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


def test_device_error_classification():
    assert kc._device_error(RuntimeError("cudaErrorInsufficientDriver: x")).reason.startswith("CUDA driver too old")
    assert kc._device_error(RuntimeError("cudaErrorSystemDriverMismatch: x")).reason.startswith("CUDA driver too old")
    assert kc._device_error(RuntimeError("cudaErrorNoDevice: x")).reason.startswith("no CUDA device")
    assert kc._device_error(RuntimeError("cudaErrorLaunchFailure: x")).reason.startswith("CUDA runtime error")


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


def test_every_kernel_name_is_defined_in_the_cuda_source():
    source = kc.module_source()
    for t in ("float", "double"):
        for name in kc.kernel_names(t):
            assert f"void {name.split('<')[0]}(" in source, name
    assert set(kc.ACT_CODES) == set(ACTIVATIONS) and set(kc.LOSS_CODES) == set(LOSSES)
    for name, code in kc.ACT_CODES.items():
        assert f"#define FB_{name.upper()} {code}" in source
    for name, code in kc.LOSS_CODES.items():
        assert f"#define FB_{name.upper()} {code}" in source


def _instantiations() -> str:
    names = kc.kernel_names("float") + kc.kernel_names("double")
    return "\n".join(f"void* fb_instance_{i} = (void*)&{name};" for i, name in enumerate(names))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_for_the_device(tmp_path):
    """What NVRTC compiles on the GPU, compiled here by nvcc for sm_80 and sm_90 (no GPU needed)."""
    src = tmp_path / "fastbp_all.cu"
    src.write_text(kc.module_source() + "\n" + _instantiations() + "\n")
    for arch in ("sm_80", "sm_90"):
        proc = subprocess.run(["nvcc", f"-arch={arch}", "--ptx", "-o", str(tmp_path / f"{arch}.ptx"), str(src)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        ptx = (tmp_path / f"{arch}.ptx").read_text()
        assert ptx.count(".entry") >= 2 * len(kc.kernel_names("float"))


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
template <typename F> static int fb_run(dim3 grid, dim3 block, F body) {
    const unsigned nt = block.x * block.y * block.z;
    if (nt == 0 || nt % 32 != 0 || nt > 1024) return -3;
    blockDim = block; gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(nt);
                std::unique_ptr<fb_warp_t[]> warps(new fb_warp_t[nt / 32]);
                std::vector<std::thread> threads;
                threads.reserve(nt);
                for (unsigned t = 0; t < nt; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        fb_block_bar = &bar; fb_warp = &warps[t / 32]; fb_lane = t % 32;
                        body();
                        bar.arrive_and_drop();  // an exited thread no longer holds up the others
                        fb_warp->bar.arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
            }
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

    def __init__(self, lib, name):
        self.lib, self.name = lib, name

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
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-w", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(src)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("g++ without C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-4000:]
    handle = ctypes.CDLL(str(lib))
    handle.fb_emu_launch.restype = ctypes.c_int
    handle.fb_emu_launch.argtypes = ([ctypes.c_char_p] + [ctypes.c_uint] * 6
                                     + [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.c_int])
    return {name: EmuKernel(handle, name) for name in names}


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
    d, rows = np.full_like(z, np.nan), np.empty(m, dtype)
    args = lambda out: (z, a, y, out, rows, np.int32(m), np.int32(k),  # noqa: E731
                        np.int32(kc.ACT_CODES[output]), np.int32(kc.LOSS_CODES[loss]))
    emu[f"fb_output_delta<{_t(dtype)}>"](*kc._grid_rows(m), args(d))
    _close(d, d_ref, ELEM[dtype], "delta")
    _close(rows.sum(dtype=np.float64), total_ref, ELEM[dtype], "cost")
    rows[:] = np.nan
    emu[f"fb_output_delta<{_t(dtype)}>"](*kc._grid_rows(m), args(kc._NULL))  # loss_sum: no delta
    _close(rows.sum(dtype=np.float64), REF.loss_sum(loss, output, z, a, y), ELEM[dtype], "loss_sum")


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
def test_emulated_bias_act_and_dact(emu, dtype, name):
    m, k = 6, 9
    z0 = _logits((m, k), dtype, seed=4)
    bias = _logits((k,), dtype, seed=5)
    z, a = z0.copy(), np.empty_like(z0)
    t, code = _t(dtype), np.int32(kc.ACT_CODES[name])
    emu[f"fb_bias_act<{t}>"](*kc._grid_1d(z.size), (z, bias, a, np.int64(z.size), np.int32(k), code))
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
def test_emulated_bias_grad(emu, dtype, accumulate):
    m, k = 37, 45  # two column blocks, rows not a multiple of the 8 row groups
    d = _logits((m, k), dtype, seed=7)
    out = _logits((k,), dtype, seed=8)
    ref = out.copy()
    REF.bias_grad(d, ref, alpha=0.25, accumulate=accumulate)
    emu[f"fb_bias_grad<{_t(dtype)}>"](*kc._grid_bias(k), (d, out, np.int32(m), np.int32(k),
                                                         np.dtype(dtype).type(0.25), np.int32(accumulate)))
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
    run(Z, 1.0, 0.0, kc._EPI_BIAS_ACT, kc.ACT_CODES["sigmoid"], b=bias, aout=A_out)
    _close(Z, product + bias, GEMM[dtype])
    _close(A_out, _act("sigmoid", (product + bias).astype(dtype)), GEMM[dtype])
    D = np.empty((M, N), dtype)
    run(D, 1.0, 0.0, kc._EPI_DACT, kc.ACT_CODES["tanh"], z=ez, a=ea)
    _close(D, product * (1 - ea.astype(np.float64) ** 2), GEMM[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_gather_accumulate_and_sgd(emu, dtype):
    t, i32, T = _t(dtype), np.int32, np.dtype(dtype).type
    X, Y = _logits((10, 3), dtype, seed=10), _logits((10, 2), dtype, seed=11)
    st = kc._EpochState(np, dtype)
    st.table[:] = [X.ctypes.data, Y.ctypes.data]
    st.counter[0] = 1
    xs, ys = np.empty((4, 3), dtype), np.empty((4, 2), dtype)
    emu[f"fb_gather_batch<{t}>"](*kc._grid_1d(4 * 5), (st.table, st.counter, xs, ys, i32(4), i32(4), i32(3), i32(2)))
    np.testing.assert_array_equal(xs, X[4:8])
    np.testing.assert_array_equal(ys, Y[4:8])

    rows = np.arange(300, dtype=dtype) / 7  # more rows than threads
    emu[f"fb_accumulate_loss<{t}>"]((1,), (256,), (rows, i32(300), st.status, st.counter))
    _close(st.status[:3], [rows.sum(dtype=np.float64), 300, 0], GEMM[dtype])
    assert st.counter[0] == 2
    params, grads = _logits((1000,), dtype, seed=12), _logits((1000,), dtype, seed=13)
    st.lr[0] = 0.125
    expected = params.copy()
    REF.sgd_update(expected, grads, T(0.125))
    emu[f"fb_sgd<{t}>"](*kc._grid_1d(1000), (params, grads, np.int64(1000), st.lr, st.status))
    np.testing.assert_array_equal(params, expected)  # one rounding per step, as NumPy

    rows[5] = np.inf  # a non-finite batch: recorded as the stop, its cost and size left out
    emu[f"fb_accumulate_loss<{t}>"]((1,), (256,), (rows, i32(300), st.status, st.counter))
    assert st.status[2] == 1 and st.status[1] == 300 and st.counter[0] == 3
    before = params.copy()
    emu[f"fb_sgd<{t}>"](*kc._grid_1d(1000), (params, grads, np.int64(1000), st.lr, st.status))
    np.testing.assert_array_equal(params, before)  # updates skipped after the stop


# ---------------------------------------------------------------- whole epochs of _StepPlan


def reference_epoch(spec: NetSpec, params, X, Y, batch, lr):
    """Plain mini-batch SGD composed of the NumPy backend's kernels, like MLP.fit without the fast path."""
    weights, biases = kc._layer_views(spec, params)
    total, done = 0.0, 0
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
        REF.sgd_update(params, grads, lr)
    return total, done


_STUB_CUBLAS = r"""
/* The four cuBLAS entry points fastbp calls, on host memory: cublasGemmEx is the column-major
   reference GEMM, so _CublasDirect's ctypes marshalling and operand swap are checked for real. */
#include <stddef.h>
static int calls;
int fb_stub_calls(void) { return calls; }
int cublasCreate_v2(void** handle) { *handle = (void*)0x1; return 0; }
int cublasSetStream_v2(void* handle, void* stream) { return handle == (void*)0x1 ? 0 : 1; }
int cublasSetWorkspace_v2(void* handle, void* ws, size_t bytes) { return handle == (void*)0x1 ? 0 : 1; }
#define GEMM(T) { const T *a = A, *b = B; T* c = C; const T al = *(const T*)alpha, be = *(const T*)beta; \
    for (int j = 0; j < n; ++j) for (int i = 0; i < m; ++i) { double s = 0; \
        for (int l = 0; l < k; ++l) \
            s += (double)(ta ? a[l + (long)i * lda] : a[i + (long)l * lda]) \
               * (double)(tb ? b[j + (long)l * ldb] : b[l + (long)j * ldb]); \
        c[i + (long)j * ldc] = (T)(al * s + (be != 0 ? be * c[i + (long)j * ldc] : 0)); } }
int cublasGemmEx(void* handle, int ta, int tb, int m, int n, int k, const void* alpha,
                 const void* A, int atype, int lda, const void* B, int btype, int ldb,
                 const void* beta, void* C, int ctype, int ldc, int compute, int algo) {
    if (handle != (void*)0x1 || atype != ctype || btype != ctype || algo != -1) return 7;
    if (lda < (ta ? k : m) || ldb < (tb ? n : k) || ldc < m) return 7;
    calls++;
    if (ctype == 0 && compute == 68) GEMM(float)
    else if (ctype == 1 && compute == 70) GEMM(double)
    else return 7;
    return 0;
}
"""


@pytest.fixture(scope="module")
def stub_blas(tmp_path_factory):
    """A _CublasDirect on the stub library (CUDA_R_32F = 0, CUDA_R_64F = 1, COMPUTE_32F = 68, COMPUTE_64F = 70)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    directory = tmp_path_factory.mktemp("stub")
    src, lib = directory / "stub.c", directory / "libstubcublas.so"
    src.write_text(_STUB_CUBLAS)
    proc = subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    handle = ctypes.CDLL(str(lib))
    types = {np.dtype(np.float32): (0, 68, ctypes.c_float), np.dtype(np.float64): (1, 70, ctypes.c_double)}
    blas = kc._CublasDirect(handle, 0, 0, 1 << 20, types, -1)
    blas.calls = handle.fb_stub_calls
    return blas


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


def run_plans(spec, params, X, Y, batch, lr, route, *, xp, kernels, sm_count, blas=None):
    """What CupyBackend.train_epoch does around its graphs, with the plans issued directly."""
    st = kc._EpochState(xp, spec.dtype)
    st.table[:] = [kc._data_ptr(X), kc._data_ptr(Y)]
    st.lr[0] = lr
    st.reset()
    grads = xp.zeros_like(params)
    full, tail = divmod(len(X), batch)
    plans = [(kc._StepPlan(spec, params, grads, batch, batch, xp=xp, kernels=kernels, state=st,
                           sm_count=sm_count, blas=blas), full)] if full else []
    if tail:
        plans.append((kc._StepPlan(spec, params, grads, tail, batch, xp=xp, kernels=kernels, state=st,
                                   sm_count=sm_count, blas=blas), 1))
    for plan, count in plans:
        for _ in range(count):
            plan.issue(route)
    status = st.status.get() if hasattr(st.status, "get") else st.status
    return float(status[0]), int(status[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route, sm_count", [("graph-raw", 1), ("graph-raw", 10**6), ("eager", 1), ("graph-cublas", 1)])
@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: "-".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-{s[3]}")
def test_emulated_epoch_matches_reference(emu, stub_blas, spec_args, route, sm_count, dtype):
    spec, params, X, Y = _epoch_case(spec_args, dtype)
    kernels = {name: k for name, k in emu.items() if f"<{_t(dtype)}" in name}
    expected = params.copy()
    ref_loss, ref_done = reference_epoch(spec, expected, X, Y, 4, 0.1)
    calls = stub_blas.calls()
    loss, done = run_plans(spec, params, X, Y, 4, 0.1, route, xp=np, kernels=kernels, sm_count=sm_count,
                           blas=stub_blas)
    if route == "graph-cublas":  # three GEMMs per layer and batch, less the first layer's delta
        assert stub_blas.calls() - calls == 3 * (3 * spec.n_layers - 1)
    assert done == ref_done == len(X)
    _close(loss, ref_loss, GEMM[dtype], "epoch cost")
    _close(params, expected, GEMM[dtype], "parameters after the epoch")


@pytest.mark.parametrize("route", ["graph-raw", "eager"])
def test_emulated_epoch_stops_at_the_first_nonfinite_batch(emu, route):
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300  # batch 2 of 4: its cost overflows
    kernels = {name: k for name, k in emu.items() if "<double" in name}
    expected = params.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        ref_loss, ref_done = reference_epoch(spec, expected, X, Y, 4, 0.1)
        assert ref_done == 8
        loss, done = run_plans(spec, params, X, Y, 4, 0.1, route, xp=np, kernels=kernels, sm_count=1)
    assert done == 8
    _close(loss, ref_loss, GEMM["float64"])
    _close(params, expected, GEMM["float64"])  # the last finite parameters, later batches skipped


# ---------------------------------------------------------------- CupyBackend on an emulated device


class FakeDeviceArray(np.ndarray):
    """A NumPy array with the cupy.ndarray methods the backend uses."""

    def set(self, arr, stream=None):
        np.copyto(self, arr)

    def get(self, stream=None):
        return np.array(self)


class FakeCupy(types.ModuleType):
    """Just enough of cupy for CupyBackend's training path: arrays on the host, RawModule kernels
    run by the emulator, and stream capture that records launches and replays them on
    ``graph.launch`` (arguments baked at capture, as in a CUDA graph). Like CuPy, it refuses
    cuBLAS (matmul) while capturing."""

    def __init__(self, emu):
        super().__init__("fakecupy")
        fake = self
        self.recording = None
        self.ndarray = FakeDeviceArray
        self.launches = 0

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

        class Stream:
            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
                self.ptr = 0

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def record(self, event=None):
                return object()

            def wait_event(self, event):
                pass

            def synchronize(self):
                pass

            def begin_capture(self, mode=None):
                assert fake.recording is None
                fake.recording = []

            def end_capture(self):
                graph, fake.recording = Graph(fake.recording), None
                return graph

        class Device:
            id, compute_capability = 0, "90"

            def synchronize(self):
                pass

        class CUDARuntimeError(RuntimeError):
            pass

        self.RawModule = Module
        self.ElementwiseKernel = lambda *args, **kwargs: None  # not on the training path
        self.cuda = types.SimpleNamespace(
            Stream=Stream, Device=Device, get_current_stream=lambda: Stream(),
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError,
                getDeviceProperties=lambda i: {"name": b"emulated", "multiProcessorCount": 2},
                memGetInfo=lambda: (1 << 30, 1 << 31), runtimeGetVersion=lambda: 12090,
                driverGetVersion=lambda: 12090))
        self.linalg = types.SimpleNamespace(norm=lambda x: float(np.linalg.norm(np.asarray(x))))
        self.isfinite = np.isfinite

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


class RecordingBlas:
    """The stub cuBLAS, captured like the real one (its calls become graph nodes); ``scale`` spoils it."""

    def __init__(self, fake, blas, scale=1.0):
        self.fake, self.blas, self.scale, self.library = fake, blas, scale, "stub"

    def gemm(self, trans_a, trans_b, m, n, k, alpha, *rest):
        self.fake.run(lambda: self.blas.gemm(trans_a, trans_b, m, n, k, alpha * self.scale, *rest))


@pytest.fixture
def fake_backend(emu, stub_blas, monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "0")  # the backend's fallback TF32 switch writes it
    fake = FakeCupy(emu)
    be = kc.CupyBackend(fake, tf32=False, step_route="auto", verify=True)
    be._blas = RecordingBlas(fake, stub_blas)
    return be, fake


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
    for accumulate in (False, True):
        ref, out = z[0].copy(), be.asarray(z[0])
        REF.bias_grad(z, ref, alpha=0.5, accumulate=accumulate)
        be.bias_grad(be.asarray(z), out, alpha=0.5, accumulate=accumulate)
        _close(np.asarray(out), ref, GEMM[dtype])
    for output in ACTIVATIONS:
        a_ref = _act(output, z)
        for loss in LOSSES:
            y = target_rows(loss, z.shape, dtype)
            d_ref = np.empty_like(z)
            total_ref = REF.output_delta(loss, output, z, a_ref, y, d_ref)
            d = be.empty(z.shape, dtype)
            total = be.output_delta(loss, output, be.asarray(z), be.asarray(a_ref), be.asarray(y), d)
            _close(np.asarray(d), d_ref, ELEM[dtype], f"{output} {loss}")
            _close(float(total), total_ref, ELEM[dtype], f"{output} {loss}")
            _close(float(be.loss_sum(loss, output, be.asarray(z), be.asarray(a_ref), be.asarray(y))),
                   REF.loss_sum(loss, output, z, a_ref, y), ELEM[dtype])
    with pytest.raises(ValueError, match="unknown loss"):
        be.loss_sum("hinge", "identity", be.asarray(z), be.asarray(z), be.asarray(z))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", kc.STEP_ROUTES)
def test_fake_device_train_epoch(fake_backend, route, dtype):
    be, fake = fake_backend
    be.step_route = route
    spec, params, X, Y = _epoch_case(SPECS[1], dtype, n=23)
    expected = params.copy()
    p, g = be.asarray(params), be.zeros(params.shape, dtype)
    for epoch, lr in enumerate([0.1, 0.05, 0.05]):
        Xe, Ye = X[::-1].copy() if epoch == 2 else X, Y[::-1].copy() if epoch == 2 else Y  # a new data buffer
        ref_loss, ref_done = reference_epoch(spec, expected, Xe, Ye, 5, lr)
        loss, done = be.train_epoch(spec, p, g, be.asarray(Xe), be.asarray(Ye), 5, lr, "vectorized")
        assert isinstance(loss, float) and done == ref_done == 23
        _close(loss, ref_loss, GEMM[dtype], f"epoch {epoch} cost")
        _close(np.asarray(p), expected, GEMM[dtype], f"epoch {epoch} parameters")
    assert be.last_route[(spec.sizes, 5)] == route and be.last_route[(spec.sizes, 3)] == route
    assert len(be._steps) == 2  # one prepared step per batch size, reused by every epoch
    # 3 epochs of 5 batches (4 of 5 rows, 1 of 3), plus one verification launch per graph
    assert fake.launches == (3 * 5 + 2 if route != "eager" else 0)


def test_fake_device_verification_drops_a_wrong_graph(fake_backend, stub_blas):
    be, fake = fake_backend
    be._blas = RecordingBlas(fake, stub_blas, scale=1.01)  # a GEMM route that gets the numbers wrong
    spec, params, X, Y = _epoch_case(SPECS[0], "float64", n=12)
    expected = params.copy()
    ref_loss, _ = reference_epoch(spec, expected, X, Y, 4, 0.1)
    p, g = be.asarray(params), be.zeros(params.shape, "float64")
    with pytest.warns(RuntimeWarning, match="step route 'graph-cublas' not used .* differs from the eager step"):
        loss, done = be.train_epoch(spec, p, g, be.asarray(X), be.asarray(Y), 4, 0.1, "vectorized")
    assert be.last_route[(spec.sizes, 4)] == "graph-raw"
    _close(loss, ref_loss, GEMM["float64"])
    _close(np.asarray(p), expected, GEMM["float64"])
    be.step_route = "graph-cublas"  # forced: an error, not a fallback
    with pytest.raises(RuntimeError, match="differs from the eager step"):
        be.train_epoch(spec, p, g, be.asarray(X), be.asarray(Y), 4, 0.1, "vectorized")


def test_fake_device_stops_at_the_first_nonfinite_batch(fake_backend):
    be, _ = fake_backend
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300
    expected = params.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        ref_loss, ref_done = reference_epoch(spec, expected, X, Y, 4, 0.1)
        p, g = be.asarray(params), be.zeros(params.shape, "float64")
        loss, done = be.train_epoch(spec, p, g, be.asarray(X), be.asarray(Y), 4, 0.1, "vectorized")
    assert done == ref_done == 8
    _close(loss, ref_loss, GEMM["float64"])
    _close(np.asarray(p), expected, GEMM["float64"])


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_fake_device_fit_matches_the_numpy_backend(fake_backend, monkeypatch, batch_size):
    """MLP.fit through CupyBackend.train_epoch (graphs replayed per batch) against the NumPy backend."""
    be, fake = fake_backend
    monkeypatch.setitem(registry._instances, "cupy", be)
    X, labels = np.random.default_rng(0).standard_normal((30, 5)), np.arange(30) % 3
    results = {}
    for name in ("numpy", "cupy"):
        with fb.use_backend(name):
            net = fb.MLP([5, 8, 3], activation="tanh", loss="cross_entropy", dtype="float64", seed=4)
            history = net.fit(X, labels, epochs=2, batch_size=batch_size, lr=0.1, seed=3, progress=False)
            results[name] = (list(history), np.concatenate([w.ravel() for w in net.get_params()[0]]))
    assert fake.launches > 0
    _close(results["cupy"][0], results["numpy"][0], GEMM["float64"])
    _close(results["cupy"][1], results["numpy"][1], GEMM["float64"])


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
    for accumulate in (False, True):
        ref, out = A[0].copy(), _dev(be, A[0])
        REF.bias_grad(A, ref, alpha=0.5, accumulate=accumulate)
        be.bias_grad(_dev(be, A), out, alpha=0.5, accumulate=accumulate)
        _close(be.to_numpy(out), ref, GEMM[dtype])
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
            assert isinstance(total, cupy.ndarray) and total.ndim == 0  # no host sync
            _close(be.to_numpy(d), d_ref, ELEM[dtype], f"{name} {loss}")
            _close(float(total), total_ref, ELEM[dtype], f"{name} {loss}")
            _close(float(be.loss_sum(loss, name, _dev(be, z), a, _dev(be, y))),
                   REF.loss_sum(loss, name, z, a_ref, y), ELEM[dtype])
    p, g = rng.standard_normal(50).astype(dtype), rng.standard_normal(50).astype(dtype)
    ref, out = p.copy(), _dev(be, p)
    REF.sgd_update(ref, g, 0.1)
    be.sgd_update(out, _dev(be, g), 0.1)
    _close(be.to_numpy(out), ref, ELEM[dtype])
    perm = rng.permutation(33)
    out = be.empty(A.shape, dtype)
    be.take_rows(_dev(be, A), be.index_array(perm), out)
    np.testing.assert_array_equal(be.to_numpy(out), A[perm])


@gpu
@needs_gpu
def test_gpu_info_and_flags(cupy_be):
    info = cupy_be.info()
    for key in ("device", "memory_total_bytes", "cuda_runtime", "cuda_driver", "cupy", "tf32", "step_route"):
        assert key in info
    assert cupy_be.is_gpu and cupy_be.has_compiled_epoch and cupy_be.name == "cupy"
    with fb.use_backend("auto") as chosen:
        assert chosen.name == "cupy"


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", kc.STEP_ROUTES)
@pytest.mark.parametrize("spec_args", SPECS, ids=lambda s: "-".join(map(str, s[0])))
def test_gpu_captured_step_matches_reference(cupy_be, spec_args, route, dtype):
    be = cupy_be
    spec, params, X, Y = _epoch_case(spec_args, dtype, n=37)
    expected = params.copy()
    ref_loss, ref_done = reference_epoch(spec, expected, X, Y, 8, 0.1)
    old = be.step_route
    be.step_route = route
    try:
        p, g = _dev(be, params), be.zeros(params.shape, dtype)
        for epoch in range(2):  # the second epoch replays the graphs made in the first
            loss, done = be.train_epoch(spec, p, g, _dev(be, X), _dev(be, Y), 8, 0.1, "vectorized")
            if epoch == 0:
                assert done == ref_done == len(X)
                _close(loss, ref_loss, GEMM[dtype])
                _close(be.to_numpy(p), expected, GEMM[dtype])
                ref_loss, _ = reference_epoch(spec, expected, X, Y, 8, 0.1)
        _close(loss, ref_loss, GEMM[dtype])
        _close(be.to_numpy(p), expected, GEMM[dtype])
        assert be.last_route[(spec.sizes, 8)] == route
    finally:
        be.step_route = old


@gpu
@needs_gpu
@pytest.mark.parametrize("route", kc.STEP_ROUTES)
def test_gpu_captured_step_stops_at_the_first_nonfinite_batch(cupy_be, route):
    be = cupy_be
    spec, params, X, Y = _epoch_case(DIVERGING, "float64", n=16)
    X[9, :] = 1e300
    expected = params.copy()
    ref_loss, ref_done = reference_epoch(spec, expected, X, Y, 4, 0.1)
    old = be.step_route
    be.step_route = route
    try:
        p, g = _dev(be, params), be.zeros(params.shape, "float64")
        loss, done = be.train_epoch(spec, p, g, _dev(be, X), _dev(be, Y), 4, 0.1, "vectorized")
    finally:
        be.step_route = old
    assert done == ref_done == 8
    _close(loss, ref_loss, GEMM["float64"])
    _close(be.to_numpy(p), expected, GEMM["float64"])


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
@pytest.mark.parametrize("batch_size", [1, 16, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_training_trajectory_matches_numpy(dtype, batch_size):
    rng = np.random.default_rng(0)
    X, labels = rng.standard_normal((50, 8)), rng.integers(0, 3, 50)
    results = {}
    for name in ("numpy", "cupy"):
        with fb.use_backend(name):
            net = fb.MLP([8, 16, 3], activation="relu", loss="cross_entropy", dtype=dtype, seed=2)
            history = net.fit(X, labels, epochs=3, batch_size=batch_size, lr=0.05, seed=7, progress=False)
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
    import cupy

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)).astype(np.float32), rng.standard_normal((512, 512)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for tf32 in (False, True):
        be = kc.CupyBackend(cupy, tf32=tf32)
        out = be.empty((512, 512), np.float32)
        be.matmul(be.asarray(a), be.asarray(b), out)
        errors[tf32] = np.abs(be.to_numpy(out) - exact).max() / np.abs(exact).max()
        assert be.info()["tf32"] == (tf32 and int(be.device.compute_capability) >= 80)
    cupy_be._set_tf32(cupy_be.tf32)  # CuPy's compute type is process-wide: put the suite's back
    assert errors[False] < 1e-5
    assert errors[True] < 1e-2
