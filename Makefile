# Everything a fresh machine needs goes through `make install`: CI has nothing else.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TOOLS  := .tools/bin
export PATH := $(CURDIR)/$(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install install-python test test-fast demo crd bench lint e2e clean k8s-tools cluster-up cluster-down

# Both at once: pip mostly downloads and unpacks while go compiles, so a cold install takes
# about as long as the Go build alone.
install:
	@$(MAKE) --no-print-directory -j2 --output-sync=line install-python k8s-tools

# The virtual environment and its tools, without the local Kubernetes control plane (whose
# cold build takes about half an hour and needs go).
install-python: $(STAMP)

# torch first and pinned, so that no later requirement swaps it for another build (PyPI's
# 2.13.0 is the CUDA build, ~3.5 GB with its nvidia wheels; it runs on the CPU too).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	$(PY) scripts/install_tools.py $(TOOLS)
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not scale"

# The operator at scale (1,000 jobs created and deleted twice): too long for every CI run.
.PHONY: test-scale
test-scale: install
	$(PY) -m pytest -q -s -m scale

# The day-to-day loop: without the local Kubernetes control plane, the image builds and the
# multi-process runs (`make test` runs everything).
test-fast: install-python
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not cluster and not images and not slow"

# The local Kubernetes control plane (hack/k8s, pinned in its go.mod files) is built from the Go
# module proxy; the script skips binaries already at their pinned version. Without go it is left
# out and tests/cluster is skipped, except under CI, where a missing go is an error.
k8s-tools:
	@if command -v go >/dev/null; then hack/k8s/build.sh $(TOOLS); \
	else case "$$CI" in ""|0|false|no) \
	  echo "note: go is not on PATH: the local Kubernetes control plane is not built (tests/cluster skipped)";; \
	  *) echo "error: CI is set but go is not on PATH: cannot build the local Kubernetes control plane" >&2; exit 1;; \
	esac; fi

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK nodes on 127.0.0.1;
# admin kubeconfig in .cluster/kubeconfig, logs in .cluster/logs/ (hack/cluster/cluster.py).
cluster-up: k8s-tools
	python3 hack/cluster/cluster.py up

cluster-down:
	python3 hack/cluster/cluster.py down

demo: install
	$(PY) -m rmjob_trainer.demo

# The same training through the local control plane: CRD, operator and pod runner as local
# processes, manifests/examples/cpu-local.yaml applied, `kubectl get rmj` until it finishes.
.PHONY: demo-cluster
demo-cluster: install
	$(PY) hack/cluster/demo.py

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

# The operator and trainer images (CPU variant) with podman on a debootstrapped Debian base;
# installs podman, buildah and debootstrap when missing. Details: docs/deploy.md, "Images".
.PHONY: images
images:
	hack/images/build.sh

# The operator's latency and its scale at 1,000 jobs against the local control plane (started
# if needed; the operator as a process with the chart's RBAC): docs/benchmarks.md, "Operator".
.PHONY: bench-operator
bench-operator: install
	$(PY) bench/operator_bench.py

# The GPU check (bench/gpu_check.py; docs/benchmarks.md, "GPU check") on a GPU machine that has
# torch, transformers and accelerate but no network: `make gpu-wheels` where PyPI is reachable
# puts what else the trainer and TRL import (GPU_PACKAGES, at .venv's versions) into
# build/gpu-wheels; carry that folder over; `make gpu-check` there installs them under build/
# and runs the check on the working tree's trainer. Where they are importable already (this
# .venv), nothing is installed. The trainer comes from trainer/ itself (PYTHONPATH), never a
# wheel that could be older than the sources.
GPU_WHEELS     := build/gpu-wheels
GPU_SITE       := build/gpu-site
GPU_PACKAGES   ?= datasets dill multiprocess trl
GPU_PYTHON     ?= python3
GPU_CHECK_OUT  ?= bench/results
GPU_CHECK_ARGS ?=
.PHONY: gpu-wheels gpu-check
gpu-wheels: install-python
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(GPU_WHEELS) $$($(PY) -c 'import importlib.metadata as m, sys; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_PACKAGES))

gpu-check:
	@if ! $(GPU_PYTHON) -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(n) is None for n in sys.argv[1:]))' $(GPU_PACKAGES); then \
	  if ! ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	    echo "error: $(GPU_PYTHON) lacks some of $(GPU_PACKAGES) and $(GPU_WHEELS) holds no wheels: run make gpu-wheels where PyPI is reachable and carry $(GPU_WHEELS)" >&2; exit 2; fi; \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 2; \
	fi
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR)/trainer$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) bench/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
