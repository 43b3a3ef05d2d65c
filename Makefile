# Quick start: `make run` serves on 127.0.0.1:8000 and gRPC on 8001 (HOST=... PORT=... to change),
# `make test` runs every check.
PYTHON ?= python3
HOST ?= 127.0.0.1
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
# torch comes first and pinned, from a CPU wheel index when one is given: a bare `torch` pulls a
# multi-GB CUDA build. TORCH_INDEX_URL="" uses pip's configured indexes (this machine: local wheels).
TORCH_VERSION := 2.13.0
TORCH_INDEX_URL ?=
TORCH_INDEX_ARG := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
STAMP := $(VENV)/.installed

.PHONY: run test test-container lint bench clean

# The C kernel is built by the install: a change to its source reinstalls.
$(STAMP): pyproject.toml setup.py attention/small_kernel.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX_ARG) torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# HTTP on HOST:PORT, the inference protocol's gRPC on HOST:8001 (ATTENTION_GRPC_PORT).
run: $(STAMP)
	ATTENTION_GRPC_HOST=$${ATTENTION_GRPC_HOST:-$(HOST)} \
		$(BIN)/uvicorn service.main:app --host $(HOST) --port $(PORT) --no-access-log

test: $(STAMP) lint
	$(BIN)/python -m pytest

# The image built and run on a Docker daemon of the test's own (root; docs/container.md).
test-container: $(STAMP)
	bash tests/container/run.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
