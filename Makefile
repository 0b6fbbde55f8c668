# Everything a fresh machine needs goes through `make install`: CI has nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TOOLS  := .tools/bin
export PATH := $(CURDIR)/$(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test test-fast demo crd bench lint e2e clean

install: $(STAMP)

# torch first and pinned: this machine has the 2.13.0 CPU wheel on disk; any looser spec
# would pull gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	$(PY) scripts/install_tools.py $(TOOLS)
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

demo: install
	$(PY) -m rmjob_trainer.demo

crd: install
	$(PY) -m rmjob_operator.crd > manifests/crd.yaml
	cp manifests/crd.yaml charts/rmjob-operator/crds/rewardmodeljobs.yaml
	$(PY) -m rmjob_operator.crd --markdown > docs/spec-reference.md

bench: install
	$(PY) bench/run.py

e2e: install
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) .tools build *.egg-info
