# tokenrelay: `make run` starts the gateway with its chat page; `make test` runs every test.
# Both set up what they need first (a virtualenv in .venv; for tests also Debian's
# chromium and nginx, and the local PostgreSQL and Redis if they are not running).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint services system-deps bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: setup
	$(BIN)/tokenrelay serve

system-deps:
	@bash scripts/system-deps.sh

services:
	@bash scripts/services.sh

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: setup system-deps services lint
	$(BIN)/pytest -n 2 --dist loadgroup

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts
