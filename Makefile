# Two commands do all set-up on a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: setup browser serve test test-slow bench bench-service toy packs clean

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

# Rebuild the embedded toy base model and oracle from scratch (about an hour on 2 cores; resumable).
toy: setup
	$(VENV)/bin/erasure toy build

# Train the four shipped toy packs, publish them to the shipped registry and lock them for the service
# (about 10 minutes on 2 cores). Tags are immutable: bump PACK_TAG to publish a retrained set.
# Why each option (measured): docs/esd.md and docs/toy-world.md.
ERASURE  := $(VENV)/bin/erasure
PACKS    := build/packs
PACK_TAG ?= v3
ESD_TOY  := --template toy --eval-samples 200
SHAPES_BUT = $(foreach s,circle square triangle star cross,$(if $(filter $(s),$(1)),,--preserve $(s)))
# square: the toy base draws a square when no shape is named, so c0 names another shape (--anchor)
ANCHORS = $(foreach c,$(2),$(if $(filter $(c),$(1)),,--anchor $(c) --preserve $(c)))
packs: setup
	rm -rf $(PACKS) && mkdir -p $(PACKS)
	$(ERASURE) train --concept circle --method esd-x $(ESD_TOY) --lr 1e-4 --iterations 200 --preserve-weight 10 \
		$(call SHAPES_BUT,circle) --out $(PACKS)/circle
	$(ERASURE) train --concept red --method esd-x $(ESD_TOY) --lr 2e-4 --iterations 300 --preserve-weight 10 \
		--batch-size 4 --refresh-every 20 --preserve green --preserve blue --preserve yellow --preserve purple \
		--preserve-unconditional --out $(PACKS)/red
	$(ERASURE) train --concept striped --method esd-x $(ESD_TOY) --lr 1e-4 --iterations 200 --preserve-weight 5 \
		--preserve dotted --preserve outlined --out $(PACKS)/striped
	$(ERASURE) train --concept square --method esd-u $(ESD_TOY) --lr 1e-4 --iterations 300 --preserve-weight 20 \
		--batch-size 16 --refresh-every 20 $(call ANCHORS,square,circle square triangle star cross) \
		--preserve-unconditional --delta-dtype float16 --out $(PACKS)/square
	for p in circle red striped square; do \
		$(ERASURE) push $(PACKS)/$$p --repo toy/$$p --tag $(PACK_TAG) --registry registry/toy-registry || exit 1; done
	$(ERASURE) lock toy/circle@$(PACK_TAG) toy/red@$(PACK_TAG) toy/striped@$(PACK_TAG) toy/square@$(PACK_TAG) \
		--registry registry/toy-registry --base toy --lock service/packs.lock

clean:
	rm -rf $(VENV) build .pytest_cache
