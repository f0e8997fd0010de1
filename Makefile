# The few commands a newcomer needs. Everything installs itself on a fresh machine (as root for apt).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts/demo
# The demo's neighbour cache, shared by its server processes (make redis starts one if none answers).
REDIS_URL ?= redis://127.0.0.1:6379/0
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The demo is a fine-tuned build: its head beat the frozen one on validation (docs/finetune.md); BUILD_ARGS=
# builds the frozen one.
BUILD_ARGS ?= --finetune

.PHONY: demo build evaluate test lint docs bench finetune-cost ray-bench grpc-load load load-quick docker-test setup data redis browser wrk clean

demo: setup data redis $(ARTIFACTS)/manifest.json  ## build the demo artifacts if missing, then serve on 127.0.0.1:8000
	REDIS_URL=$(REDIS_URL) $(BIN)/rac serve --artifacts $(ARTIFACTS) --host 127.0.0.1 --port 8000

build: setup data  ## rebuild the demo artifacts, and record their figures in results/build.json
	$(BIN)/rac build --out $(ARTIFACTS) $(BUILD_ARGS)
	$(BIN)/python docs/hooks/figures.py --from-manifest $(ARTIFACTS)/manifest.json

$(ARTIFACTS)/manifest.json:
	$(BIN)/rac build --out $(ARTIFACTS) $(BUILD_ARGS)

evaluate: setup data $(ARTIFACTS)/manifest.json  ## the paper's tables (Table 1, k sweep, memory ablation)
	$(BIN)/rac evaluate --artifacts $(ARTIFACTS) --json results/evaluation.json

test: setup data redis browser wrk grpc-load  ## lint, the docs built strictly, then every test
	$(MAKE) lint
	$(MAKE) docs
	$(BIN)/pytest

docs: setup  ## the docs site into site/: every figure marker checked, then mkdocs build --strict (a broken link fails)
	$(BIN)/python docs/hooks/figures.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

results/build.json: $(ARTIFACTS)/manifest.json  ## the demo build's own figures (its manifest is git-ignored)
	$(BIN)/python docs/hooks/figures.py --from-manifest $(ARTIFACTS)/manifest.json

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup data wrk grpc-load $(ARTIFACTS)/manifest.json  ## service vs in-process vs raw encoder; writes results/bench.json
	$(BIN)/rac bench --artifacts $(ARTIFACTS) --json results/bench.json

# The frozen-only build a fine-tuned demo's encoder cost is measured against (same data, same memory).
FROZEN ?= artifacts/frozen

$(FROZEN)/manifest.json:
	$(BIN)/rac build --out $(FROZEN)

finetune-cost: setup data $(ARTIFACTS)/manifest.json $(FROZEN)/manifest.json  ## the fine-tuned encoder's cost against the frozen one; results/finetune_cost.json
	$(BIN)/rac bench --artifacts $(ARTIFACTS) --frozen $(FROZEN) --json results/finetune_cost.json

ray-bench: setup data wrk $(ARTIFACTS)/manifest.json  ## the service on Ray Serve (2 shards) vs one process; results/ray_bench.json
	$(BIN)/python -m loadtests.ray_bench --artifacts $(ARTIFACTS) --shards-dir /tmp/rac-ray-bench/shards --json results/ray_bench.json

load: setup data redis $(ARTIFACTS)/manifest.json  ## locust against the demo service with Redis; results/load/
	$(BIN)/python -m loadtests.run --artifacts $(ARTIFACTS) $(LOAD_ARGS)

load-quick: setup data redis  ## a short load run over a quick artifact directory (CI)
	$(BIN)/python -m loadtests.run --quick --users 8 --duration 20

docker-test: setup  ## build the image, bring the compose stack up and check it through the containers
	$(BIN)/python -m deploy.check $(DOCKER_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e '.[build,dev,ray]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, onnxruntime, faiss, fastapi, efficientnet_lite_pytorch"
	touch $@

data:  ## Fashion-MNIST from Debian's package
	@test -f $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
	@test -f $(FMNIST)

redis:  ## a Redis on 127.0.0.1:6379 for the cache tests: started if down, installed if absent
	@if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then \
	  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir /tmp; \
	  sleep 1; \
	fi

browser:  ## Debian's chromium for the page's browser test: installed if absent (as root); the test says so if it is not
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the browser test will be skipped"

wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

# The native gRPC load driver (loadtests/grpc_load.cc) against Debian's gRPC C++ library.
GRPC_LOAD := .cache/bin/rac-grpc-load

grpc-load: $(GRPC_LOAD)  ## the gRPC load driver rac bench uses (installs g++ and libgrpc++-dev if absent)

$(GRPC_LOAD): loadtests/grpc_load.cc
	@{ pkg-config --exists grpc++ 2>/dev/null && command -v g++ >/dev/null; } || \
	  { apt-get update -qq && apt-get install -y -qq g++ libgrpc++-dev >/dev/null; }
	@mkdir -p $(@D)
	g++ -O2 -std=c++17 -Wall -Wextra $< $$(pkg-config --cflags --libs grpc++) -o $@

clean:
	rm -rf $(VENV) .cache artifacts site results/load/stats.csv results/load/locust.json
