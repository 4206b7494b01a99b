# dancecore: the two commands a newcomer needs are `make quickstart` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
# torch/torchvision are pinned together: PyPI's torchvision does not import beside other torch builds.
TORCH := torch==2.14.1 torchvision==0.29.1
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))

.PHONY: quickstart smoke test install install-dev bench bench-algorithms ablations gpu-check lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(wildcard plugins/*/pyproject.toml)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e . $(addprefix -e ,$(PLUGINS))
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	DS_BUILD_OPS=0 $(PIP) install -q 'deepspeed>=0.19.8'
	$(PIP) install -q -e 'plugins/dancecore-hunyuanvideo[mp4]'  # PyAV: MP4 video samples (WebP/GIF otherwise)
	# hpsv2 is only the reference for the HPS equivalence test; its pins (pytest==7.2, protobuf==3.20)
	# would downgrade the environment; open_clip already provides the rest of what it imports, clint aside.
	$(PIP) install -q clint
	$(PIP) install -q --no-deps hpsv2==1.2.0
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# GRPO on the pretrained shapes world: held-out score before and after, and their grids (docs/shapes.md).
quickstart: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/dancecore train configs/quickstart.yaml --resume

# The fast smoke recipe: a tiny random-init FLUX learns to make bright images (~30 s).
smoke: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/dancecore train configs/smoke.yaml --resume

# The test matrix in two streams, one per core: the core session beside all the others (lint and one
# session per plugin), each line prefixed with its stream. `make test TEST_JOBS=1` runs them one by one.
TEST_JOBS ?= 2
NOX := $(BIN)/nox --no-error-on-missing-interpreters
test: $(VENV)/.installed-dev
ifeq ($(TEST_JOBS),1)
	$(NOX)
else
	@set -o pipefail; status=0; \
	rest=$$($(NOX) -l --json 2>/dev/null | $(BIN)/python -c "import json, sys; print(' '.join(s['session'] for s in json.load(sys.stdin) if s['session'] != 'core'))"); \
	( $(NOX) -s core 2>&1 | sed -u 's/^/[core] /' ) & core=$$!; \
	( $(NOX) -s $$rest 2>&1 | sed -u 's/^/[plugins] /' ) || status=1; \
	wait $$core || status=1; \
	if [ $$status = 0 ]; then echo "make test: every session passed"; else echo "make test: a session FAILED (see the [core] / [plugins] lines above)"; fi; \
	exit $$status
endif

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.run

# Every algorithm recipe on the shapes world, interleaved, 3 seeds: time to a held-out target (~95 min, 2 workers on 2 cores).
bench-algorithms: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.algorithms --workers 2

# The paper's ablations in miniature on the shapes world (noise sharing, timestep fraction, reward, best-of-N, G; 60 min).
ablations: $(VENV)/.installed-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.ablations

# Real-size FLUX.1 / SD1.4 / HunyuanVideo networks on one GPU, no downloads (docs/performance.md).
gpu-check: $(VENV)/.installed-dev
	$(BIN)/nox -s gpu

lint: $(VENV)/.installed-dev
	$(BIN)/nox -s lint

docs: $(VENV)/.installed
	$(BIN)/python -m dancecore.config.docgen > docs/config-reference.md

clean:
	rm -rf $(VENV) outputs .nox
