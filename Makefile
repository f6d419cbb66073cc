VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo soak bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not soak" -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check hotswap publisher tests bench examples
	$(VENV)/bin/ruff format --check hotswap publisher
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(VENV)/bin/hotswap demo

soak: $(STAMP)
	$(PY) -m pytest -q -m soak -p no:cacheprovider -s

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
