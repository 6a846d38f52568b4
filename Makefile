# Two entry points, both self-contained on a machine with Python 3.11+ and pip:
#   make demo   set up .venv and run `gateway demo`: two orgs, narrated, end to end
#   make test   set up .venv and run the whole suite: pytest, ruff, mypy
#   make docker-test  build the container image offline and test it for real
#               (Linux, root; installs and starts its own dockerd if none runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The test IdP (tests/idp: npm oidc-provider, pinned by its package-lock.json);
# the stamp holds a copy of the lock it was installed from (tests/oidc_idp.py).
IDP_DIR   := tests/idp
IDP_STAMP := $(IDP_DIR)/node_modules/.gateway-installed

.PHONY: demo test docker-test lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gateway demo

$(IDP_STAMP): $(IDP_DIR)/package-lock.json
	cd $(IDP_DIR) && npm ci --no-audit --no-fund --loglevel=error
	cp $(IDP_DIR)/package-lock.json $(IDP_STAMP)

test: $(STAMP) $(IDP_STAMP)
	$(BIN)/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docker-test: $(STAMP)
	$(BIN)/python deploy/docker/test.py

clean:
	rm -rf wheels $(VENV) $(IDP_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
