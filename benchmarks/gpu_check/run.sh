#!/usr/bin/env bash
# make gpu-check: everything the first run on an NVIDIA GPU must confirm, in one prepared command.
#
# For a machine with CUDA, CuPy, PyTorch and JAX preinstalled and no package registry. Runs the
# checkout as it is, with the machine's python3 (PYTHON=... to choose another), no install: the
# source tree imports as the installed package would. GPU_CHECK_VENV=1 instead makes a venv
# with --system-site-packages and installs fastbp into it with
# `pip install --no-deps --no-build-isolation -e .` (nothing is downloaded).
#
# Phases, each with its own timeout, the whole within BUDGET seconds (default 400, under 7
# minutes); a phase that would start with less than 15 s left is skipped and says so:
#   nvidia-smi, env          versions (no GPU needed)
#   device                   is a CUDA device usable? If not: "no device", exit 3, nothing else runs
#   probe                    NVRTC compile, direct-cuBLAS GEMMs in all four transposition cases,
#                            every step route x update rule x fork vs the NumPy reference
#   gpu-tests                pytest -m gpu tests/test_cupy_backend.py
#   suite-on-cupy            the backend-parametrized suite with FASTBP_BACKEND=cupy
#   two-threads              the two-threads tests, alone in their own process
#   bench-fp32 / bench-tf32  benchmarks/gpu_peers.py: fastbp vs torch eager CUDA vs JAX (jit, scan)
#   memcheck                 compute-sanitizer --tool memcheck on a tiny fit (when installed)
# Results go to $OUT (default /tmp/fastbp-gpu-check): log.txt, summary.json, env.json,
# probe.json, junit-*.xml, gpu_peers_*.json. Exit status: 0 all phases passed, 1 some failed,
# 3 no usable CUDA device.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
O=${OUT:-/tmp/fastbp-gpu-check}
mkdir -p "$O"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-400}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/fastbp-numba-cache} CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/fastbp-cupy-cache}
SUMMARY="$O/summary.tsv"
: >"$SUMMARY"

phase() {  # phase NAME SECONDS CMD...: runs CMD under timeout, records NAME, rc, seconds
  local name=$1 secs=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 15 )); then
    echo "=== SKIP $name (budget of ${BUDGET}s spent)"
    printf '%s\tskipped\t0\n' "$name" >>"$SUMMARY"
    return 0
  fi
  (( secs > left )) && secs=$left
  echo "=== $(date +%T) [+$(( $(date +%s) - T0 ))s] $name (timeout ${secs}s)"
  local t=$(date +%s)
  timeout -k 5 "$secs" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "=== $name TIMED OUT after ${secs}s"
  echo "=== $name rc=$rc"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >>"$SUMMARY"
  return $rc
}

finish() {  # finish EXIT_STATUS [NOTE]
  "$PY" - "$SUMMARY" "$O/summary.json" "$1" "${2:-}" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, sys
tsv, out, status, note, seconds = sys.argv[1:6]
phases = [dict(zip(("phase", "rc", "seconds"), line.rstrip("\n").split("\t"))) for line in open(tsv) if line.strip()]
json.dump({"exit_status": int(status), "note": note, "seconds": int(seconds), "phases": phases}, open(out, "w"), indent=1)
print("=== summary")
for p in phases:
    print(f"  {p['phase']:16s} {'ok' if p['rc'] == '0' else p['rc']:>8s}  {p['seconds']}s")
if note:
    print("  " + note)
EOF
  echo "=== done in $(( $(date +%s) - T0 ))s, exit $1; results in $O"
  exit "$1"
}

PT=("$PY" -m pytest -p no:cacheprovider -q -rfEs)

main() {
  if [[ "${GPU_CHECK_VENV:-0}" == 1 ]]; then
    phase venv 120 bash -c "'$PY' -m venv --system-site-packages /tmp/fastbp-gpu-venv &&
      /tmp/fastbp-gpu-venv/bin/pip install --no-deps --no-build-isolation -e '$ROOT'" || finish 1 "venv: could not install fastbp"
    PY=/tmp/fastbp-gpu-venv/bin/python
    PT=("$PY" -m pytest -p no:cacheprovider -q -rfEs)
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && PT+=(--timeout=120)
  if command -v nvidia-smi >/dev/null; then
    phase nvidia-smi 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv
  else
    echo "=== nvidia-smi: not installed"
    printf 'nvidia-smi\tabsent\t0\n' >>"$SUMMARY"
  fi
  phase env 30 "$PY" benchmarks/gpu_check/probe.py env "$O"
  phase device 30 "$PY" benchmarks/gpu_check/probe.py device "$O"
  case $? in
    0) ;;
    3) finish 3 "no device: no usable CUDA device here (see the device phase above); nothing that needs a GPU ran" ;;
    *) finish 1 "device check failed (see above)" ;;
  esac
  phase probe 75 "$PY" benchmarks/gpu_check/probe.py gpu "$O"
  phase gpu-tests 75 "${PT[@]}" tests/test_cupy_backend.py -m gpu -k "not two_threads" --junitxml="$O/junit-gpu.xml"
  phase suite-on-cupy 70 env FASTBP_BACKEND=cupy FASTBP_TEST_BACKENDS=cupy "${PT[@]}" -x \
    tests/test_training.py tests/test_gradients.py tests/test_optim.py tests/test_errors.py tests/test_ops.py \
    tests/test_graph.py tests/test_sklearn.py tests/test_digits.py -k "not two_threads and not steady_state" \
    --junitxml="$O/junit-suite-cupy.xml"
  phase two-threads 35 env FASTBP_BACKEND=cupy FASTBP_TEST_BACKENDS=cupy "${PT[@]}" \
    tests/test_training.py tests/test_cupy_backend.py -k "two_threads and (cupy or gpu)" --junitxml="$O/junit-threads.xml"
  phase bench-fp32 95 "$PY" benchmarks/gpu_peers.py --quick --repeat 3 --out "$O/gpu_peers_fp32.json"
  phase bench-tf32 45 "$PY" benchmarks/gpu_peers.py --quick --tf32 --repeat 3 --skip per_example,peak \
    --out "$O/gpu_peers_tf32.json"
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [[ -n "$SANITIZER" ]]; then
    phase memcheck 45 "$SANITIZER" --tool memcheck --error-exitcode 9 "$PY" benchmarks/gpu_check/tiny.py
  else
    echo "=== memcheck: compute-sanitizer not installed"
    printf 'memcheck\tabsent\t0\n' >>"$SUMMARY"
  fi
  if awk -F'\t' '$2 != "0" && $2 != "absent" {bad=1} END {exit !bad}' "$SUMMARY"; then
    finish 1 "some phases failed or were skipped"
  fi
  finish 0
}

main 2>&1 | tee "$O/log.txt"
exit "${PIPESTATUS[0]}"
