# `make demo` and `make test` each create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jaxdiv-installed
export JAX_PLATFORMS ?= cpu
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg
# no network at run time: transformers/diffusers must never reach a hub
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# two pytest workers on two cores: one BLAS/OpenMP thread each, or small eigh calls thrash
TEST_ENV := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# no persistent XLA compilation cache: it saved no measurable time, and workers crashed
# (SIGSEGV) inside its executable serialisation (jax compilation_cache.put_executable_and_time)

.PHONY: demo toy-suite test lint bench docs notebooks figures clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build, never a multi-GB CUDA build pulled in by a range
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -e ".[dev,sd,parity,docs]" -c constraints.txt
	touch $(STAMP)

# every diversity method on the ring toy, same noise: a figure, a table and a JSON (results/demo)
demo: $(STAMP)
	$(VENV)/bin/jaxdiv demo

# the samplers against exact toy distributions (results/toy_suite)
toy-suite: $(STAMP)
	$(PY) -m experiments.toy_suite

# --dist loadfile: a file's tests share one worker, so its module fixtures (tiny pipelines)
# are built and the programs its tests share are compiled once, not once per worker
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile -q --durations=15 -m 'not exact_codegen' --nbmake --doctest-modules --doctest-glob='*.md' tests notebooks jaxdiv toy README.md docs/guide
	# the tests that compare compiled programs at float rounding, under FMA-contracting codegen
	# (conftest.py); only the files that mark some (collecting all of tests/ costs ~10 s)
	$(TEST_ENV) JAXDIV_TEST_CODEGEN=exact $(PY) -m pytest -n 2 -q -m exact_codegen \
		$(shell grep -l 'mark.exact_codegen' tests/test_*.py)

# re-execute the notebooks in place so their stored outputs and figures are current
notebooks: $(STAMP)
	$(TEST_ENV) $(PY) -m experiments.notebooks

# the README's figures, re-created from their experiment scripts into docs/*.png
figures: $(STAMP)
	$(TEST_ENV) $(PY) -m experiments.figures

# the API reference from the docstrings, warning-free (-W), into docs/_build/html
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxdiv toy experiments benchmarks tests notebooks

# one-thread comparisons pin the process to one core: XLA:CPU ignores its thread flags
# (sd_step, sd_generate and conv pin themselves)
ONE_CORE := OMP_NUM_THREADS=1 taskset -c 0

bench: $(STAMP)
	$(ONE_CORE) $(PY) -m benchmarks.toy_sampler
	$(ONE_CORE) $(PY) -m benchmarks.sample_overhead
	$(ONE_CORE) $(PY) -m benchmarks.metrics
	$(PY) -m benchmarks.spell
	$(PY) -m benchmarks.sd_step
	$(PY) -m benchmarks.sd_generate
	$(PY) -m benchmarks.conv
	$(PY) -m benchmarks.conv --shapes vae_decoder_256 --pass input_grad --flag-sets default \
		--rounds 3 --out results/benchmarks/conv_input_grad.json
	$(PY) -m benchmarks.vae_grad
	$(PY) -m benchmarks.group_norm
	$(PY) -m benchmarks.compile_flags
	$(PY) -m benchmarks.groups
	$(PY) -m benchmarks.summary

clean-venv:
	rm -rf $(VENV)
