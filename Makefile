# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Each creates .venv if needed and installs what it needs (editable, so kernels/ edits apply at once).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BENCH_ARGS ?=

.PHONY: test bench bench-full bench-peers bench-cpu-peers bench-contended bench-gpu gpu-check info clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e '.[test,mpi,mkl]'
	touch $@

$(VENV)/.bench: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e '.[bench,mkl]'
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.bench
	$(VENV)/bin/fastbp bench --out benchmarks/results/latest/bench.json --plot benchmarks/results/latest/bench.png $(BENCH_ARGS)

# PyTorch (CPU build, an optional extra) and scikit-learn measured side by side in the same run.
$(VENV)/.torch: $(VENV)/.bench
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install --quiet torch --index-url https://download.pytorch.org/whl/cpu
	touch $@

# JAX (CPU, the optional extra fastbp[jax]): a peer in both forms, per-step jit and the epoch as one lax.scan.
$(VENV)/.jax: $(VENV)/.bench
	$(PY) -c 'import jax' 2>/dev/null || $(PIP) install --quiet -e '.[jax]'
	touch $@

bench-peers: $(VENV)/.torch $(VENV)/.jax
	$(VENV)/bin/fastbp bench --peers torch,jax,sklearn --out benchmarks/results/latest/bench-peers.json $(BENCH_ARGS)

# The same beside one busy-loop process: each throughput as a share of the quiet run.
bench-contended: $(VENV)/.torch
	$(VENV)/bin/fastbp bench --contended --peers torch --out benchmarks/results/latest/bench-contended.json $(BENCH_ARGS)

# The Numba backend against PyTorch eager, JAX and scikit-learn on issue 10's five CPU workloads
# (PEERS_ARGS: e.g. --optimizer sgd,adam --contended, or --quick for a smoke run).
PEERS_ARGS ?=
bench-cpu-peers: $(VENV)/.torch $(VENV)/.jax
	$(PY) benchmarks/peers_cpu.py $(PEERS_ARGS)

# On an NVIDIA GPU (needs fastbp[cuda12] or fastbp[cuda13], and torch with CUDA for the peer).
bench-gpu: $(VENV)/.bench
	$(PY) benchmarks/gpu_peers.py

# Everything the first run on an NVIDIA GPU must confirm, in under 7 minutes, with the machine's own
# CUDA/CuPy/PyTorch/JAX and no package registry (no venv made; GPU_CHECK_VENV=1 makes one with
# --system-site-packages). Results in $$OUT (default /tmp/fastbp-gpu-check); exit 3 = no device.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check/run.sh

# The pytest-benchmark suites (kernels, training steps); saved for --benchmark-compare.
bench-full: $(VENV)/.bench $(VENV)/.test
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-autosave --benchmark-group-by=group

info: $(VENV)/.bench
	$(VENV)/bin/fastbp info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
