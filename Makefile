# Two commands do all set-up on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: setup serve test test-slow bench bench-service toy clean

setup: $(STAMP)

# torch is installed first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build;
# constraints.txt pins the rest to the versions the tests last passed with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The BentoML service on :3000 with service/config.yaml (ERASURE_SERVICE_CONFIG=other.yaml to change it).
serve: setup
	$(VENV)/bin/bentoml serve service.service:ErasureService

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/generate_speed.py

# Service latency / throughput / pack-switch cost as JSON (in-process ASGI; see service/README.md).
bench-service: setup
	$(PY) bench/service_bench.py

# Rebuild the embedded toy base model and oracle from scratch (about an hour on 2 cores; resumable).
toy: setup
	$(VENV)/bin/erasure toy build

clean:
	rm -rf $(VENV) build .pytest_cache
