# xlat — every target sets itself up (idempotent), so on a fresh Debian machine
# `make demo` and `make test` are the only two commands a user needs.
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test unit demo bench lint fuzz deb clean

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

# Each fuzz target for FUZZ_SECONDS (new inputs under build/fuzz/; crashes too, to be
# copied into tests/fuzz/crashers/TARGET/). `make test` runs a short smoke of it.
FUZZ_SECONDS ?= 60
fuzz: setup
	$(PY) tests/fuzz/fuzz.py all -max_total_time=$(FUZZ_SECONDS) \
	  '-artifact_prefix=build/fuzz/{target}-'

lint: setup
	$(VENV)/bin/ruff check xlat tests bench
	$(VENV)/bin/mypy

# The Debian package, built in a copy under build/ so the tree stays clean; the .deb
# lands in dist/. It installs the build tools (debhelper, dh-python, lintian) only here:
# neither `make setup` nor the router needs them.
deb:
	@bash scripts/build-deb.sh

clean:
	-$(VENV)/bin/xlat lab down 2>/dev/null
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache build dist
