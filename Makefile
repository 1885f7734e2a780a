# Two commands do all set-up on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: setup browser serve test test-slow bench bench-service bench-batching toy packs clean

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

# The page test drives Debian's chromium (nothing downloads a browser build). Installed here when missing and we are
# root; otherwise that test fails and says how to install it.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	@[ -x $(CHROMIUM) ] || echo "warning: $(CHROMIUM) is missing (apt-get install chromium as root): the page test will fail"

test: setup browser
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/generate_speed.py

# Service latency / throughput / pack-switch cost as JSON (in-process ASGI; see service/README.md).
bench-service: setup
	$(PY) bench/service_bench.py

# Batched serving through two real `bentoml serve` (batching on / off) against the bare pipeline's batched ceiling,
# and how far a batched image is from the same request alone (service/README.md, "Batching"); a quiet machine.
bench-batching: setup
	$(PY) bench/batching_bench.py
	$(PY) bench/batch_determinism.py

# Rebuild the embedded toy base model and oracle from scratch (about an hour on 2 cores; resumable).
toy: setup
	$(VENV)/bin/erasure toy build

# Train the four shipped toy packs (registry/catalogues/toy.yaml: one Ray task each, 2 at a time on 2 cores),
# publish each that passes its quick erasure check to the shipped registry and lock them for the service and for
# deploy/kubernetes. Packs already published with the same config are skipped (a rerun resumes). Tags are
# immutable: give a retrained set a new `tag:` in the catalogue. See docs/scale-out.md;
# why each option (measured): docs/esd.md and docs/toy-world.md.
ERASURE   := $(VENV)/bin/erasure
CATALOGUE ?= registry/catalogues/toy.yaml
packs: setup
	$(ERASURE) train-many $(CATALOGUE) --registry registry/toy-registry --work build/packs --lock service/packs.lock
	cp service/packs.lock deploy/kubernetes/packs.lock

clean:
	rm -rf $(VENV) build .pytest_cache
