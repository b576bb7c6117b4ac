# xlat — every target sets itself up (idempotent), so on a fresh Debian machine
# `make demo` and `make test` are the only two commands a user needs.
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test unit unit-pure demo bench lint fuzz deb clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -ra -p no:cacheprovider tests
	@$(MAKE) --no-print-directory unit-pure

unit: setup
	$(PY) -m pytest -ra -p no:cacheprovider tests/unit
	@$(MAKE) --no-print-directory unit-pure

# The runs above use the compiled cores when setup built them (xlat --version says);
# this one the pure Python modules they fall back to (xlat/compiled.py), through the
# unit tests of those cores and of the proxy and NG server that drive them (≈ 7 s).
CORE_TESTS := $(addprefix tests/unit/,test_sip_message.py test_sip_uri.py \
  test_sip_transaction.py test_sdp.py test_session.py test_ng.py test_sip_proxy.py \
  test_compiled.py)
unit-pure: setup
	XLAT_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider $(CORE_TESTS)

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
