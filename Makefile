# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test install sync-docs clean flwr-run

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedunlearn run $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

sync-docs: $(STAMP)
	$(VENV)/bin/python -m fedunlearn.config --write

clean:
	rm -rf .cache runs

flwr-run: $(STAMP)
	$(VENV)/bin/python -m simulations.flwr_local $(ARGS)
