"""Which BLAS library runs the Numba backend's GEMMs: SciPy's OpenBLAS or Intel's MKL.

``FASTBP_BLAS`` (read once per process, when the Numba backend is first created):

* ``auto`` (the default): MKL where the ``mkl`` package is installed (``pip install
  'fastbp[mkl]'``) and the CPU is an Intel one, else SciPy's OpenBLAS. On a 2-core Xeon (Ice
  Lake) a mini-batch step's GEMMs ran 1.1-1.55x faster on MKL, tiny ones (64-64-10 at batch
  32) ~10% slower (benchmarks/results/gemm-shapes-20261202T014805Z.json); on AMD CPUs MKL takes
  a generic code path, so auto keeps OpenBLAS there.
* ``openblas`` / ``mkl``: that one (``mkl`` not installed is a BackendUnavailableError, and so
  is any other value: the Numba backend is then unavailable, saying why).

Compiled code calls the symbols ``fastbp_sgemm`` / ``fastbp_dgemm`` (Fortran ``?gemm`` calling
convention, the one both libraries export); :func:`active` binds them to the chosen
library's functions in LLVM's symbol table before any kernel is linked, so Numba's disk cache
holds one machine code for either library. The binding is per process: a cached kernel linked
against one library keeps calling it, so the choice cannot change after the first GEMM.

One library for every GEMM on purpose: NumPy ships its own OpenBLAS, and alternating GEMMs
between two thread pools ran 2-100x slower (each pool's idle workers spin while the other
computes). MKL runs on the GNU OpenMP runtime (libgomp, the one Numba and PyTorch use), which
sleeps after a short spin; where libgomp cannot be loaded it runs sequentially. libgomp's pool
does not survive ``fork()``, so a forked child runs MKL on one thread (``child_thread_cap``).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

from fastbp.errors import BackendUnavailableError

ENV_VAR = "FASTBP_BLAS"
CHOICES = ("auto", "openblas", "mkl")
SYMBOLS = {"float32": "fastbp_sgemm", "float64": "fastbp_dgemm"}
_MKL_LAYERS = {"intel": 0, "sequential": 1, "gnu": 3, "tbb": 4}  # MKL_Set_Threading_Layer codes


@dataclass(frozen=True)
class BlasLibrary:
    """The BLAS library bound to ``fastbp_?gemm``: its name, file, and why it was chosen."""

    name: str  # "openblas" or "mkl"
    path: str
    reason: str
    threading: str
    sgemm: int  # addresses of the Fortran-convention ?gemm functions
    dgemm: int
    # libgomp's GOMP_parallel, omp_get_thread_num and omp_get_num_threads where MKL's threads
    # are libgomp's pool (the kernels' update passes run on that team), else 0
    omp_parallel: int = 0
    omp_thread_num: int = 0
    omp_num_threads: int = 0

    def describe(self) -> dict:
        return {"library": self.name, "path": self.path, "reason": self.reason, "threading": self.threading}


_ACTIVE: BlasLibrary | None = None
_ERROR: BackendUnavailableError | None = None
_CHILD_CAP: int | None = None


def active() -> BlasLibrary:
    """The library this process's compiled GEMMs call, chosen and bound on the first call."""
    global _ACTIVE, _ERROR
    if _ACTIVE is None and _ERROR is None:
        try:
            _ACTIVE = _bind(choose(os.environ.get(ENV_VAR)))
        except BackendUnavailableError as exc:
            _ERROR = exc
            try:  # the backend refuses to start, but a kernel called directly must not jump to address 0
                _bind(_openblas("fallback binding while the backend is unavailable"))
            except BackendUnavailableError:
                pass
    if _ERROR is not None:
        raise _ERROR
    return _ACTIVE


def bind_if_possible() -> None:
    """:func:`active`, keeping a bad choice's error for the backend to raise (importing the
    kernels module must not fail on ``FASTBP_BLAS``; creating the backend does)."""
    try:
        active()
    except BackendUnavailableError:
        pass


def child_thread_cap() -> int | None:
    """1 in a process forked after MKL's OpenMP pool started (libgomp's pool does not survive a
    fork: a parallel GEMM there hangs), else None."""
    return _CHILD_CAP


def choose(requested: str | None) -> BlasLibrary:
    """The library ``requested`` names (``FASTBP_BLAS``'s value; None or "" means auto)."""
    want = (requested or "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise BackendUnavailableError("numba", f"unknown BLAS library. Received: {ENV_VAR}={requested!r}. "
                                      f"Expected one of {list(CHOICES)}", f"set {ENV_VAR} to one of those or unset it")
    if want == "openblas":
        return _openblas(f"{ENV_VAR}=openblas")
    mkl_path = mkl_library()
    if want == "mkl":
        if mkl_path is None:
            missing = mkl_missing_parts()
            if missing:
                raise BackendUnavailableError("numba", f"{ENV_VAR}=mkl but the mkl install is incomplete "
                                              f"(no {', '.join(missing)} beside libmkl_rt)",
                                              "pip install --force-reinstall mkl, or unset " + ENV_VAR)
            raise BackendUnavailableError("numba", f"{ENV_VAR}=mkl but the mkl package is not installed",
                                          "pip install 'fastbp[mkl]' (or pip install mkl), or unset " + ENV_VAR)
        return _mkl(mkl_path, f"{ENV_VAR}=mkl")
    vendor = cpu_vendor()
    missing = mkl_missing_parts() if mkl_path is None else []
    if missing:
        return _openblas(f"auto: the mkl install is incomplete (no {', '.join(missing)}); "
                         "pip install --force-reinstall mkl repairs it")
    if mkl_path is not None and vendor == "GenuineIntel":
        return _mkl(mkl_path, "auto: mkl is installed and this is an Intel CPU")
    if mkl_path is None:
        return _openblas("auto: mkl is not installed (pip install 'fastbp[mkl]' adds it; faster GEMMs on Intel CPUs)")
    return _openblas(f"auto: mkl is installed but this CPU is {vendor or 'not an Intel one'} "
                     f"(MKL takes a generic path there; {ENV_VAR}=mkl forces it)")


# What libmkl_rt loads at its first call; without them MKL exits the process ("Cannot load").
_MKL_PARTS = ("libmkl_core.so", "libmkl_gnu_thread.so", "libmkl_sequential.so", "libmkl_def.so")


def _mkl_files() -> tuple[str | None, list[str]]:
    """(libmkl_rt's path or None, the companion libraries the installed ``mkl`` wheel lacks)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None, []
    present = {}
    for f in dist.files or ():
        base = os.path.basename(str(f))
        path = os.path.realpath(dist.locate_file(f))
        if ".so" in base and os.path.exists(path):
            present.setdefault(base.split(".so")[0] + ".so", path)
    rt = present.get("libmkl_rt.so")
    missing = [part for part in _MKL_PARTS if part not in present]
    return (rt if rt and not missing else None), (missing if rt else [])


def mkl_library() -> str | None:
    """Path of ``libmkl_rt`` from a complete install of the ``mkl`` wheel, or None."""
    return _mkl_files()[0]


def mkl_missing_parts() -> list[str]:
    """The libraries an installed but incomplete ``mkl`` wheel lacks (empty: complete or absent)."""
    return _mkl_files()[1]


def cpu_vendor() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _openblas(reason: str) -> BlasLibrary:
    try:
        import scipy
        from scipy.linalg import cython_blas
    except ImportError:
        raise BackendUnavailableError("numba", "scipy is not installed (the OpenBLAS GEMMs come from SciPy)",
                                      "pip install scipy") from None
    addresses = {k: _capsule_address(cython_blas.__pyx_capi__[k]) for k in ("sgemm", "dgemm")}
    path = _blas_behind(_library_file(addresses["sgemm"])) or f"SciPy {scipy.__version__}'s BLAS"
    return BlasLibrary("openblas", path, reason, "OpenBLAS's own pthreads", addresses["sgemm"], addresses["dgemm"])


def _mkl(path: str, reason: str) -> BlasLibrary:
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise BackendUnavailableError("numba", f"MKL could not be loaded from {path}: {exc}",
                                      f"reinstall it (pip install --force-reinstall mkl) or set {ENV_VAR}=openblas") from None
    lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
    lib.MKL_Set_Interface_Layer(0)  # LP64: the 32-bit integers numba_kernels.gemm passes, whatever MKL_INTERFACE_LAYER says
    lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    user_layer = os.environ.get("MKL_THREADING_LAYER", "").strip()
    if user_layer:  # the user's choice, read by MKL itself
        threading = f"MKL_THREADING_LAYER={user_layer}" + (" (GNU OpenMP)" if user_layer.upper() == "GNU" else "")
    else:
        want = "gnu" if _loadable("libgomp.so.1") else "sequential"
        got = lib.MKL_Set_Threading_Layer(_MKL_LAYERS[want])
        threading = {0: "Intel OpenMP", 1: "sequential", 3: "GNU OpenMP (libgomp)", 4: "TBB"}.get(got, f"layer {got}")
        if want == "sequential":
            threading += " (libgomp not loadable)"
    omp = (0, 0, 0)
    if "GNU OpenMP" in threading:
        os.register_at_fork(after_in_child=_fork_child_single_thread(lib))
        omp = _libgomp_team()
    sgemm, dgemm = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value, ctypes.cast(lib.dgemm_, ctypes.c_void_p).value
    return BlasLibrary("mkl", _library_file(sgemm) or path, reason, threading, sgemm, dgemm, *omp)


@functools.lru_cache(maxsize=1)
def _libgomp_team() -> tuple[int, int, int]:
    """Addresses of libgomp's GOMP_parallel, omp_get_thread_num and omp_get_num_threads
    ((0, 0, 0) where it lacks them)."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1")
        return tuple(ctypes.cast(getattr(gomp, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except (OSError, AttributeError):
        return 0, 0, 0


_OWN_POOL_PID: int | None = None


def own_libgomp() -> tuple[int, int, int]:
    """``_libgomp_team``'s addresses for a team of fastbp's own, where the BLAS's threads are not
    libgomp's (OpenBLAS's pthreads, or MKL on another threading layer): the per-example rows run
    on libgomp's pool while the BLAS's threads sleep (a per-example epoch makes no BLAS call).
    (0, 0, 0) where libgomp is not loadable, or in a process forked after this process asked for
    them (conservatively: asking, as ``fastbp info`` does, counts): libgomp's pool does not survive
    fork(), and a region in the child would wait for threads that are not there. It cannot know of
    a libgomp pool another library started before a fork."""
    global _OWN_POOL_PID
    if _OWN_POOL_PID is None:
        _OWN_POOL_PID = os.getpid()
    elif _OWN_POOL_PID != os.getpid():
        return 0, 0, 0
    return _libgomp_team()


def _fork_child_single_thread(lib):
    def after_fork_in_child() -> None:
        global _CHILD_CAP
        _CHILD_CAP = 1
        lib.MKL_Set_Num_Threads(1)

    return after_fork_in_child


def _library_file(address: int) -> str | None:
    """The real path of the shared library holding ``address`` (dladdr), or None."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    info = DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _blas_behind(wrapper: str | None) -> str | None:
    """The BLAS file behind SciPy's ``cython_blas`` (whose capsules point at its own thin
    wrappers, not into OpenBLAS): where the Fortran ``sgemm`` that module links to lives
    (dlsym on a library's handle searches its dependencies too). ``wrapper`` itself where it
    exports no such symbol."""
    if wrapper is None:
        return None
    try:
        lib = ctypes.CDLL(wrapper)
    except OSError:  # pragma: no cover - it is loaded already, so it loads
        return wrapper
    for name in ("scipy_sgemm_", "sgemm_", "scipy_sgemm64_", "sgemm64_"):
        try:
            return _library_file(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value) or wrapper
        except AttributeError:
            continue
    return wrapper


def _bind(lib: BlasLibrary) -> BlasLibrary:
    import llvmlite.binding as llvm

    llvm.add_symbol(SYMBOLS["float32"], lib.sgemm)
    llvm.add_symbol(SYMBOLS["float64"], lib.dgemm)
    return lib


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def _capsule_address(capsule) -> int:
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
