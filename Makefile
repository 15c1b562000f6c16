# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,quantize]"
	# GPTQModel without its declared dependencies: the quantize extra holds them, less two. torchao is optional
	# at run time (GPTQModel's FP4 paths only) and, once installed, is imported by every transformers model
	# load and logs failed CUDA library loads on a CPU torch; GPTQModel's numpy==2.2.6 pin would move ours.
	$(PY) -m pip install -q --no-deps gptqmodel
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@for bench in tests/benchmarks/bench_*.py; do echo "== $$bench"; $(PY) $$bench || exit 1; done

clean:
	rm -rf $(VENV) outputs .cache .pytest_cache .ruff_cache
