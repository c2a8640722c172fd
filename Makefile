# `make run` sets everything up and starts the server; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench bench-storage bench-serve bench-previews bench-iiif bench-backfill bench-institution bench-preservation soak mutation packages test-packages venv

run: packages venv
	$(PY) server.py

test: packages test-packages venv lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m 'not serial' tests
	$(PY) -m pytest -q -m serial tests

lint: venv
	$(PY) -m ruff check .

bench: packages test-packages venv
	$(PY) -m bench.thumbnails

bench-storage: packages test-packages venv
	$(PY) -m bench.storage

bench-preservation: packages test-packages venv
	$(PY) -m bench.preservation

bench-iiif: packages test-packages venv
	sh deploy/install-packages.sh bench/packages.txt
	$(PY) -m bench.iiif

bench-backfill: packages test-packages venv
	$(PY) -m bench.backfill

bench-serve: packages test-packages venv
	sh deploy/install-packages.sh bench/packages.txt
	$(PY) -m bench.serve

bench-previews: packages test-packages venv
	sh deploy/install-packages.sh bench/packages.txt
	$(PY) -m bench.previews

soak: packages test-packages venv
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q -s tests/test_reliability.py
	$(PY) -m bench.soak --seconds 300

# Mutation testing (slow, not in CI) of the areas bench/mutation.py lists: mutmut in a venv of its own, scope in
# bench/mutation.py, tests in setup.cfg [mutmut]; score and survivors in bench/out/mutation.txt.
MUTVENV ?= .mutvenv
mutation: packages test-packages
	test -x $(MUTVENV)/bin/python || $(PYTHON) -m venv $(MUTVENV)
	$(MUTVENV)/bin/python -m pip install -q -r requirements.txt -r tests/requirements.txt mutmut==3.8.1
	$(MUTVENV)/bin/python bench/mutation.py

packages:
	sh deploy/install-packages.sh deploy/packages.txt

test-packages:
	sh deploy/install-packages.sh deploy/packages.txt tests/packages.txt

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt tests/requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r tests/requirements.txt
	touch $@

bench-institution: packages test-packages venv
	$(PY) -m bench.institution
