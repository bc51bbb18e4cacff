# One Makefile for people and CI. Every target creates the venv when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo demo-serve test lint typecheck protos protos-check deploy-check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The InfluxDB-protocol server the tests and the demo write measurements to (Debian's).
VICTORIA := /usr/bin/victoria-metrics
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(VICTORIA):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends victoria-metrics

## Embedded NATS + sidecar + handler host with the greeter; sends requests, prints replies, exits.
demo: $(STAMP) $(VICTORIA)
	$(BIN)/python -m deploy.local.demo

## Same, but keeps everything serving until Ctrl-C.
demo-serve: $(STAMP) $(VICTORIA)
	$(BIN)/python -m deploy.local.demo --serve

## Lint and type checks, then the whole test suite (unit, gRPC level, integration, end to end).
test: lint typecheck $(VICTORIA)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## mypy on the project's own code (generated protobuf code excluded: see pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy sidecar handler_host

protos: $(STAMP)
	$(BIN)/python -m protos.generate

protos-check: $(STAMP)
	$(BIN)/python -m protos.generate --check

## Offline checks of Dockerfiles, Kustomize, Compose and the probe CLI (no Docker, no cluster).
deploy-check: $(STAMP)
	$(BIN)/python -m pytest tests/deploy -q

## The benchmark: nats-server, both processes, a bare-loop baseline; one table (about 75 s).
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
