# The README's two set-up commands: `make demo` and `make test`. Each creates or refreshes .venv
# itself; with nothing changed the set-up step is a timestamp check.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rosetta-installed
# A CPU build of torch unless this machine has an NVIDIA driver (pip's local wheel here).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.9' || echo 'torch==2.13.0')
RUFF_ARGS := --line-length 100
RUFF_RULES := --select E,F,W,I,UP
DEMO_DIR := demo_out
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: setup system-deps demo demo-encdec test lint format clean

setup: $(STAMP)

# Debian packages the tests use: a throw-away Slurm cluster (slurm-wlm, munge) and an offline
# translator for back-translation (apertium with its English-Spanish pair, about 6 MB). Installed
# only where missing and where we are root; without them those tests skip with the reason.
system-deps:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
		&& command -v apertium >/dev/null && [ -d /usr/share/apertium/apertium-eng-spa ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			slurm-wlm munge apertium apertium-eng-spa; \
	else echo "note: slurm-wlm/munge/apertium missing and not root: the Slurm and apertium tests will skip"; fi

$(STAMP): setup.py Makefile
	@test -n "$(PYTHON)" || { echo "error: python3.11 or python3 not found"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "error: $(PYTHON) is older than Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[hf,dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# megatron-core, a test-time dependency (rosetta[megatron]): `make test` installs it, `make setup`
# does not; refreshed with the main set-up, else a timestamp check
MEGATRON_STAMP := $(VENV)/.rosetta-megatron-installed
$(MEGATRON_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[megatron]' --config-settings editable_mode=compat
	touch $(MEGATRON_STAMP)
test: $(MEGATRON_STAMP)

# DeepSpeed, the optional engine (rosetta[deepspeed], parallel.engine=deepspeed): `make test`
# installs it (ops not compiled at install) and builds the two C++ ops a CPU run uses (shared-
# memory collectives, host Adam) once into .venv/torch_extensions (~2 min), so no test pays it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
DEEPSPEED_STAMP := $(VENV)/.rosetta-deepspeed-installed
$(DEEPSPEED_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[deepspeed]' --config-settings editable_mode=compat
	$(PY) -m parallel.deepspeed_engine
	touch $(DEEPSPEED_STAMP)
test: $(DEEPSPEED_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(RUFF_ARGS) $(RUFF_RULES) .
	$(VENV)/bin/ruff format --check $(RUFF_ARGS) .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(RUFF_ARGS) $(RUFF_RULES) .
	$(VENV)/bin/ruff format $(RUFF_ARGS) .

test: lint system-deps
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 --durations=10 tests

demo: $(STAMP)
	$(PY) -m launch.demo --out $(DEMO_DIR)

# A tiny encoder-decoder on the same corpus (span corruption + translation), then greedy
# translations of held-out sentences.
demo-encdec: $(STAMP)
	$(PY) -m launch.demo_encdec --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) runs .cache .pytest_cache
