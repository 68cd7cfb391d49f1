# `make demo` and `make test` do all set-up themselves on a fresh machine (venv, system library, package).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check sysdeps clean

# open3d needs libusb-1.0 at import time; install it when missing and we are root, else say what to do.
# Chromium (headless) checks the HTML report; installed the same way, skipped with a note when it cannot be.
sysdeps:
	@if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    apt-get update -qq >/dev/null && apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else \
	    echo "error: open3d needs the system library libusb-1.0-0; run: sudo apt-get install libusb-1.0-0" >&2; exit 1; \
	  fi; \
	fi
	@# the report's browser test opens report.html in headless Chromium; without it that one test is skipped
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (the report's browser test)"; \
	    (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null) \
	      || echo "note: chromium could not be installed; the report's browser test is skipped"; \
	  else \
	    echo "note: the report's browser test needs chromium (sudo apt-get install chromium); it is skipped without it"; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

# The main job end to end on the embedded synthetic default: renders the capture when it is missing,
# runs every stage into synth-out/store, validates the store and reports its quality.
demo: $(STAMP)
	$(BIN)/facecanon-data build --subjects manifests/synthetic.txt
	$(BIN)/facecanon-data validate synth-out/store
	$(BIN)/facecanon-data report synth-out/store

# Every test, in TEST_JOBS worker processes (pytest-xdist, whole files per worker). Tiers: tests/conftest.py.
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

# The developer's loop: the unit tier only (pure functions, fakes, small stores; no rendering, no build).
check: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

clean:
	rm -rf $(VENV) demo-out synth-out bench-out .pytest_cache flame_assets/synthetic
