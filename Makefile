# Relais: `make run` serves the demo region on http://127.0.0.1:8000 (and its DICOM server on
# RELAIS_DICOM_PORT, 11112 by default, or DICOM_PORT if given: `make run DICOM_PORT=11113`),
# `make test` runs the whole suite.
# Both set everything up on a fresh Debian 12 machine (Python 3.11): system packages when run
# as root (or with passwordless sudo), the virtualenv in .venv, the database migrations.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages: the venv module, the real DICOM peers used by the tests (Orthanc, DCMTK),
# the browser the web tests drive (Chromium).
SYSTEM_PACKAGES := python3-venv orthanc orthanc-dicomweb dcmtk chromium
PYTEST_WORKERS ?= 2
HOST ?= 127.0.0.1
PORT ?= 8000
# DICOM_PORT: unset, the DICOM server listens on RELAIS_DICOM_PORT (the settings, 11112).

.PHONY: run test lint system-deps migrate demo serve bench clean ohif

run: $(VENV)/.installed migrate demo
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	@echo "Relais: http://$(HOST):$(PORT)/  (API: /api/v1/, OpenAPI: /api/schema/); the DICOM server says where it listens"
	$(BIN)/python manage.py dicomserver $(if $(DICOM_PORT),--port $(DICOM_PORT)) & dicom=$$!; \
	$(BIN)/python manage.py expire_requests --every 60 > /dev/null & sweeper=$$!; \
	trap 'kill $$dicom $$sweeper 2>/dev/null; wait $$dicom $$sweeper' EXIT INT TERM; \
	$(BIN)/gunicorn -c python:broker.gunicorn_conf broker.wsgi --bind $(HOST):$(PORT) --workers 2 --access-logfile -

test: $(VENV)/.installed ohif
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

# A real OHIF viewer's published build, for the viewer test (pinned, checked; in var/ohif).
ohif: $(VENV)/.installed
	$(BIN)/python -m tests.peers.ohif

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
		echo "Missing Debian packages: $$missing (install them as root: apt-get install $$missing)"; exit 0; fi; \
	echo "Installing Debian packages: $$missing"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

migrate: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput

demo: $(VENV)/.installed
	$(BIN)/python manage.py seed_demo

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/registry_query.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
