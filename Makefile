# Two commands do everything on a fresh machine: `make bench` and `make test`.
# Each creates .venv if needed and installs what it needs (editable, so kernels/ edits apply at once).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BENCH_ARGS ?=

.PHONY: test bench bench-full bench-peers info clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(VENV)/.bench: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e '.[bench]'
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.bench
	$(VENV)/bin/fastbp bench --out benchmarks/results/bench-latest.json --plot benchmarks/results/bench-latest.png $(BENCH_ARGS)

# PyTorch and scikit-learn measured side by side in the same run (torch is an optional extra).
bench-peers: $(VENV)/.bench
	$(PIP) install --quiet 'torch>=2.0'
	$(VENV)/bin/fastbp bench --peers torch,sklearn --out benchmarks/results/bench-peers-latest.json $(BENCH_ARGS)

# The pytest-benchmark suites (kernels, training steps); saved for --benchmark-compare.
bench-full: $(VENV)/.bench $(VENV)/.test
	$(PY) -m pytest benchmarks -q --benchmark-only --benchmark-autosave --benchmark-group-by=group

info: $(VENV)/.bench
	$(VENV)/bin/fastbp info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
