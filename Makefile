# One entry point for people and CI. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
S3_SERVER_VENV ?= .venv-s3server
PYTHON ?= python3

.PHONY: install test test-unit lint crd demo clean images reference

$(STAMP): pyproject.toml constraints.txt constraints-s3server.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: its CPU wheel is on local disk; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[operator,trainer,local,cli,dev]'
	# The tests' local S3 server (tests/s3_kit.py) in its own venv: see constraints-s3server.txt.
	$(PYTHON) -m venv $(S3_SERVER_VENV)
	$(S3_SERVER_VENV)/bin/python -m pip install -q -c constraints-s3server.txt 'moto[server]==5.2.6'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest

test-unit: install
	$(PY) -m pytest tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

crd: install
	$(VENV)/bin/sftjob crd --write crds
	$(VENV)/bin/sftjob reference --write README.md
	$(VENV)/bin/python -m sftjob_operator.profile_admission deploy/policy

demo: install
	$(VENV)/bin/sftjob demo

clean:
	rm -rf $(VENV) $(S3_SERVER_VENV) .sftjob-local .pytest_cache .mypy_cache .ruff_cache

# Container images (needs a Docker engine; not available on the CI machines).
OPERATOR_IMAGE ?= ghcr.io/sftjob/sftjob-operator:0.1.0
TRAINER_IMAGE ?= ghcr.io/sftjob/sftjob-trainer:0.1.0

images:
	docker build -f operator/Dockerfile -t $(OPERATOR_IMAGE) .
	docker build -f trainer_image/Dockerfile -t $(TRAINER_IMAGE) .
