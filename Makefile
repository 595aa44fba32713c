# skybus: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SRC    := shared services simulator bench

.PHONY: demo test lint unit bench skies tools clean help

help:
	@echo "make demo   create .venv, run simulated MIPS + TAUVEX data through the whole pipeline"
	@echo "make test   create .venv, lint (ruff + mypy) and run the test suite"
	@echo "make bench  benchmarks against SWarp, SExtractor, sep, reproject"
	@echo "make skies  astrometry against truth over 11 simulated skies (~6 min)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# Debian tools: fitsverify for products; SWarp and SExtractor for benchmarks only.
tools:
	@command -v fitsverify >/dev/null 2>&1 || { \
	  echo "installing fitsverify (Debian package)"; \
	  (apt-get update -qq && apt-get install -y -qq fitsverify) >/dev/null 2>&1 || \
	  echo "warning: could not install fitsverify; FITS validation tests will be skipped"; }

bench-tools: tools
	@command -v SWarp >/dev/null 2>&1 && command -v source-extractor >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq swarp source-extractor) >/dev/null 2>&1 || \
	  echo "warning: could not install swarp/source-extractor"; }

lint: $(STAMP)
	$(BIN)/ruff check $(SRC) tests
	$(BIN)/mypy $(SRC)

unit: $(STAMP) tools
	$(BIN)/python -m pytest -q

test: lint unit

demo: $(STAMP) tools
	$(BIN)/skybus demo --out products

bench: $(STAMP) bench-tools
	$(BIN)/python -m bench

skies: $(STAMP)
	$(BIN)/python -m tests.integration.skies --default-sky --skies 10

clean:
	rm -rf $(VENV) .skybus products .pytest_cache .mypy_cache .ruff_cache
