"""Which BLAS library runs the Numba backend's GEMMs: SciPy's OpenBLAS or Intel's MKL.

``FASTBP_BLAS`` (read once per process, when the Numba backend is first created):

* ``auto`` (the default): MKL where the ``mkl`` package is installed (``pip install
  'fastbp[mkl]'``) and the CPU is an Intel one, else SciPy's OpenBLAS. MKL's GEMMs at a
  training step's shapes measured 1.3-1.6x OpenBLAS's on a 2-core Xeon (Ice Lake), see
  benchmarks/results/gemm-shapes-*.json; on AMD CPUs MKL takes a generic code path, so auto
  keeps OpenBLAS there.
* ``openblas`` / ``mkl``: that one (``mkl`` not installed is a BackendUnavailableError).

Compiled code calls the symbols ``fastbp_sgemm`` / ``fastbp_dgemm`` (Fortran ``?gemm`` calling
convention, the one both libraries export); :func:`active` binds them to the chosen
library's functions in LLVM's symbol table before any kernel is linked, so Numba's disk cache
holds one machine code for either library. The binding is per process: a cached kernel linked
against one library keeps calling it, so the choice cannot change after the first GEMM.

One library for every GEMM on purpose: NumPy ships its own OpenBLAS, and alternating GEMMs
between two thread pools ran 2-100x slower (each pool's idle workers spin while the other
computes). MKL runs on the GNU OpenMP runtime (libgomp, the one Numba and PyTorch use), which
sleeps after a short spin; where libgomp cannot be loaded it runs sequentially.
"""

from __future__ import annotations

import ctypes
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

    def describe(self) -> dict:
        return {"library": self.name, "path": self.path, "reason": self.reason, "threading": self.threading}


_ACTIVE: BlasLibrary | None = None
_ERROR: Exception | None = None


def active() -> BlasLibrary:
    """The library this process's compiled GEMMs call, chosen and bound on the first call."""
    global _ACTIVE, _ERROR
    if _ACTIVE is None and _ERROR is None:
        try:
            _ACTIVE = _bind(choose(os.environ.get(ENV_VAR)))
        except (ValueError, BackendUnavailableError) as exc:
            _ERROR = exc
    if _ERROR is not None:
        raise _ERROR
    return _ACTIVE


def bind_if_possible() -> None:
    """:func:`active`, keeping a bad choice's error for the backend to raise (importing the
    kernels module must not fail on ``FASTBP_BLAS``; creating the backend does)."""
    try:
        active()
    except (ValueError, BackendUnavailableError):
        pass


def choose(requested: str | None) -> BlasLibrary:
    """The library ``requested`` names (``FASTBP_BLAS``'s value; None or "" means auto)."""
    want = (requested or "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise ValueError(f"unknown BLAS library. Received: {ENV_VAR}={requested!r}. Expected one of {list(CHOICES)}")
    if want == "openblas":
        return _openblas(f"{ENV_VAR}=openblas")
    mkl_path = mkl_library()
    if want == "mkl":
        if mkl_path is None:
            raise BackendUnavailableError("numba", f"{ENV_VAR}=mkl but the mkl package is not installed",
                                          "pip install 'fastbp[mkl]' (or pip install mkl), or unset " + ENV_VAR)
        return _mkl(mkl_path, f"{ENV_VAR}=mkl")
    vendor = cpu_vendor()
    if mkl_path is not None and vendor == "GenuineIntel":
        return _mkl(mkl_path, "auto: mkl is installed and this is an Intel CPU")
    if mkl_path is None:
        return _openblas("auto: mkl is not installed (pip install 'fastbp[mkl]' adds it; faster GEMMs on Intel CPUs)")
    return _openblas(f"auto: mkl is installed but this CPU is {vendor or 'not an Intel one'} "
                     f"(MKL takes a generic path there; {ENV_VAR}=mkl forces it)")


def mkl_library() -> str | None:
    """Path of ``libmkl_rt`` from the installed ``mkl`` wheel, or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        return None
    names = sorted((str(f) for f in dist.files or () if os.path.basename(str(f)).startswith("libmkl_rt.so")), key=len)
    for name in names:
        path = os.path.realpath(dist.locate_file(name))
        if os.path.exists(path):
            return path
    return None


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

    path = os.path.join(os.path.dirname(scipy.__file__) + ".libs")
    libs = [f for f in os.listdir(path) if "openblas" in f] if os.path.isdir(path) else []
    return BlasLibrary("openblas", os.path.join(path, libs[0]) if libs else "SciPy's BLAS", reason,
                       "OpenBLAS's own pthreads", addresses["sgemm"], addresses["dgemm"])


def _mkl(path: str, reason: str) -> BlasLibrary:
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise BackendUnavailableError("numba", f"MKL could not be loaded from {path}: {exc}",
                                      f"reinstall it (pip install --force-reinstall mkl) or set {ENV_VAR}=openblas") from None
    if os.environ.get("MKL_THREADING_LAYER"):  # the user's choice, read by MKL itself
        threading = f"MKL_THREADING_LAYER={os.environ['MKL_THREADING_LAYER']}"
    else:
        layer = "gnu" if _loadable("libgomp.so.1") else "sequential"
        lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        lib.MKL_Set_Threading_Layer(_MKL_LAYERS[layer])
        threading = "GNU OpenMP (libgomp)" if layer == "gnu" else "sequential (libgomp not loadable)"
    return BlasLibrary("mkl", path, reason, threading,
                       ctypes.cast(lib.sgemm_, ctypes.c_void_p).value, ctypes.cast(lib.dgemm_, ctypes.c_void_p).value)


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
