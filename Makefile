# xlat — every target sets itself up (idempotent), so on a fresh Debian machine
# `make demo` and `make test` are the only two commands a user needs.
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test unit demo bench lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -ra -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider tests/unit

demo: setup
	$(VENV)/bin/xlat lab demo

bench: setup
	$(PY) -m bench $(if $(QUICK),--quick,) $(if $(PYSPY),--pyspy $(PYSPY),)

lint: setup
	$(VENV)/bin/ruff check xlat tests bench
	$(VENV)/bin/mypy

clean:
	-$(VENV)/bin/xlat lab down 2>/dev/null
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
