# kubetune — developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TESTBIN ?= $(HOME)/.cache/kubetune/testbin
PYTEST_ARGS ?=

.PHONY: venv testbin testbin-s5cmd node-deps images cluster-up cluster-down test test-unit test-cluster test-node test-trainer lint crds docs demo clean

# Installs the pinned environment (constraints.txt) into .venv/; re-runs only
# when pyproject.toml or constraints.txt change.
$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install --progress-bar on -c constraints.txt -e '.[trainer,dev]'
	@touch $@

venv: $(VENV)/.installed

testbin: testbin-s5cmd
	tools/build-testbin.sh

# s5cmd alone, first: the trainer image carries it (tools/images.sh), so `images` waits only
# for this one binary, not the whole control plane, and the two never build it at once.
testbin-s5cmd:
	tools/build-testbin.sh s5cmd

# Debian packages of the real test node and the image builds (root; installs only what is missing).
NODE_DEBS := containerd runc containernetworking-plugins iptables conntrack iproute2 curl \
	buildah debootstrap busybox-static
node-deps:
	@missing="$$(for p in $(NODE_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
	  echo "[node-deps] installing" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The project's images (kubetune/trainer:dev, kubetune/controller:dev) built with buildah on a
# local Debian base; rebuilt only when their inputs change (tools/images.sh).
images: node-deps testbin-s5cmd
	tools/images.sh build

# KUBETUNE_REAL_NODES=1 also starts the real kubelet node (needs root, node-deps, images).
cluster-up: testbin
	@tools/cluster.sh up

cluster-down:
	@tools/cluster.sh down

# The whole suite: lint (ruff, mypy), then unit, cluster (real control plane), node (real
# pods on the real node), trainer (real torch) and e2e tests.
test: venv testbin images lint
	KUBETUNE_REAL_NODES=1 PATH="$(TESTBIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

test-cluster: venv testbin
	PATH="$(TESTBIN):$$PATH" $(BIN)/pytest -m cluster $(PYTEST_ARGS)

test-node: venv testbin images
	KUBETUNE_REAL_NODES=1 PATH="$(TESTBIN):$$PATH" $(BIN)/pytest -m node $(PYTEST_ARGS)

test-trainer: venv
	$(BIN)/pytest -m trainer $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check orchestrator tests bench demo
	$(BIN)/mypy

crds: venv
	$(BIN)/python -m orchestrator.api.crdgen

clean:
	rm -rf $(VENV) .pytest_cache

# A real local sweep on this machine: tiny Llama base + datasets built here, 8 trials of
# torchrun (2 processes, gloo) + DeepSpeed, Pareto front, best adapter collected and loaded.
# Re-running reuses .kubetune/demo/ (DEMO_ARGS=--fresh starts over).
DEMO_ARGS ?=
demo: venv
	$(BIN)/python demo/run.py $(DEMO_ARGS)
