VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint bench
setup:            ## create $(VENV) with torch, sam2 and every dependency
	VENV=$(VENV) bash scripts/setup.sh
run:              ## serve on SAM2_HOST:SAM2_PORT (default 127.0.0.1:8000; 0.0.0.0 with access keys)
	$(PY) main.py
test:             ## the whole test suite (CPU, random-weight checkpoint)
	$(PY) -m pytest
lint:
	$(PY) -m ruff check .
bench:            ## side-by-side benchmark against Meta's predictor (small CPU sizes)
	$(PY) bench/bench.py
