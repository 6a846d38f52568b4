# Two entry points, both self-contained on a machine with Python 3.11+ and pip:
#   make demo   set up .venv and run `gateway demo`: two orgs, narrated, end to end
#   make test   set up .venv and run the whole suite: pytest, ruff, mypy
#   make docker-test  build the container image offline and test it for real
#               (Linux, root; installs and starts its own dockerd if none runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test docker-test lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo

test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docker-test: $(STAMP)
	$(BIN)/python deploy/docker/test.py

clean:
	rm -rf wheels $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
