# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench gpu-check gpu-wheels clean

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

# Everything GPU-only in one command (tests/gpu_check.py: the gpu-marked tests, then bench_gpu.py). Without a GPU
# (no nvidia-smi) it installs the venv and smoke-runs the same script on the CPU. With one it runs with
# GPU_PYTHON: the venv when there is one, else the machine's own python3 (a lent H100/H200 has no network:
# carry the wheels of `make gpu-wheels` and put them on PYTHONPATH, README "On a GPU").
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check: $(if $(HAS_GPU),,$(STAMP))
	$(GPU_PYTHON) tests/gpu_check.py

# The packages a lent GPU machine lacks (it has torch 2.11, transformers 5.17, triton, no deepspeed or liger), as
# wheels for its Python 3.12 in .whl/ (~6 MB): DeepSpeed is a source package, so pip builds its pure-Python
# wheel; the others are downloaded at the versions this project runs.
GPU_WHEELS := liger-kernel==0.8.5 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	du -sh .whl && ls .whl

clean:
	rm -rf $(VENV) outputs .cache .pytest_cache .ruff_cache
