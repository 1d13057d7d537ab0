# SmartLLM Router: `make run` and `make test` work on a fresh Debian 12 machine
# (as root): they install what is missing, fetch and verify the native assets,
# build once (one release profile shared by run and test) and go.
SHELL := /bin/bash
.DEFAULT_GOAL := run

export CARGO_TARGET_DIR ?= $(HOME)/.cache/smartllm-target
export SMARTLLM_ASSETS_DIR ?= $(HOME)/.cache/smartllm-assets
VENV ?= $(HOME)/.cache/smartllm-venv
DATA_DIR ?= $(CURDIR)/.data
CONFIG ?= $(CURDIR)/conf
MOCK_LISTEN ?= 127.0.0.1:8000
CARGO ?= cargo
CARGO_FLAGS := --release --locked
BIN := $(CARGO_TARGET_DIR)/release
OPENAI_SDK_VERSION := 3.57.0
ANTHROPIC_SDK_VERSION := 2.14.0
# HTTP/2 for the SDKs' httpx (http2=True): the e2e suite runs the openai SDK over h2.
H2_VERSION := 4.4.1
# The e2e OTLP receiver decodes the exported protobufs with these (tests/python/otlp_receiver.py).
OTEL_PROTO_VERSION := 1.45.2
PROTOBUF_VERSION := 7.36.2

APT_PACKAGES := build-essential cmake clang libclang-dev libopenblas-dev pkg-config python3 python3-venv python3-pip ca-certificates curl wrk openssl redis-server debootstrap rpm dpkg-dev systemd chromium fonts-dejavu-core

.PHONY: run test deps assets assets-gpu build venv lint fmt bench compare soak fuzz check-config clean-data deb rpm test-packages

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }

assets: deps
	@packaging/fetch-assets.sh "$(SMARTLLM_ASSETS_DIR)"

# The CUDA build of ONNX Runtime and the CUDA libraries it loads (PyPI wheels,
# about 2 GB) in $(SMARTLLM_ASSETS_DIR)/gpu, for `embedder.device: cuda`.
# Never part of `make test`: without a GPU or these files, GPU tests skip.
assets-gpu: assets
	@packaging/fetch-assets.sh --gpu "$(SMARTLLM_ASSETS_DIR)"

build: deps
	# Same package selection as `make test`, so features unify identically and nothing rebuilds.
	$(CARGO) build $(CARGO_FLAGS) --workspace --bins

venv: deps
	@[ -x "$(VENV)/bin/python" ] || python3 -m venv "$(VENV)"
	@"$(VENV)/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$(OPENAI_SDK_VERSION)')" 2>/dev/null \
		|| "$(VENV)/bin/pip" install -q "openai==$(OPENAI_SDK_VERSION)"
	@"$(VENV)/bin/python" -c "import anthropic, sys; sys.exit(anthropic.__version__ != '$(ANTHROPIC_SDK_VERSION)')" 2>/dev/null \
		|| "$(VENV)/bin/pip" install -q "anthropic==$(ANTHROPIC_SDK_VERSION)"
	@"$(VENV)/bin/python" -c "import h2, sys; sys.exit(h2.__version__ != '$(H2_VERSION)')" 2>/dev/null \
		|| "$(VENV)/bin/pip" install -q "h2==$(H2_VERSION)"
	@"$(VENV)/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('opentelemetry-proto') != '$(OTEL_PROTO_VERSION)' or m.version('protobuf') != '$(PROTOBUF_VERSION)')" 2>/dev/null \
		|| "$(VENV)/bin/pip" install -q "opentelemetry-proto==$(OTEL_PROTO_VERSION)" "protobuf==$(PROTOBUF_VERSION)"

# Start the gateway on the shipped conf/. Without OPENAI_API_KEY or
# ANTHROPIC_API_KEY it starts the bundled mock LLM too (demo mode).
# The gateway runs on a copy of conf/ in $(DATA_DIR)/conf with the demo key
# (demo/keys.yaml) spliced in: the shipped conf/ carries no usable key.
RUN_CONF := $(DATA_DIR)/conf
run: assets build
	@mkdir -p "$(DATA_DIR)"
	@rm -rf "$(RUN_CONF)" && cp -r "$(CONFIG)" "$(RUN_CONF)"
	@sed -i -e '/^keys: \[\]/{r $(CURDIR)/demo/keys.yaml' -e 'd}' "$(RUN_CONF)/keys.yaml"
	@grep -q 241225ddd2c375055fc3494c538ecf20525fbfd1adb00bf3f0ad30e8b13fcdf8 "$(RUN_CONF)/keys.yaml" \
		|| { echo "could not add the demo key to $(RUN_CONF)/keys.yaml (it needs a 'keys: []' line)" >&2; exit 1; }
	@sed -i 's|^  upstream: http://127.0.0.1:8000/v1$$|  upstream: http://$(MOCK_LISTEN)/v1|' "$(RUN_CONF)/smartllm.yaml"
	@grep -qxF '  upstream: http://$(MOCK_LISTEN)/v1' "$(RUN_CONF)/smartllm.yaml" \
		|| { echo "could not point demo.upstream in $(RUN_CONF)/smartllm.yaml at $(MOCK_LISTEN)" >&2; exit 1; }
	@echo "Config: $(RUN_CONF) (a copy of $(CONFIG) with the demo key sk-smartllm-demo; edit it for live reloads)"
	@set -euo pipefail; \
	if [ -z "$${OPENAI_API_KEY:-}$${ANTHROPIC_API_KEY:-}" ]; then \
		echo "No provider key set: starting the bundled mock LLM on $(MOCK_LISTEN) (demo mode)"; \
		"$(BIN)/mock-llm" --listen "$(MOCK_LISTEN)" --chunk-delay-ms 20 & MOCK=$$!; \
		trap 'kill $$MOCK 2>/dev/null || true' EXIT INT TERM; \
		up=""; for _ in $$(seq 1 50); do \
			sleep 0.1; \
			kill -0 $$MOCK 2>/dev/null || { echo "mock-llm exited: is $(MOCK_LISTEN) in use? (set MOCK_LISTEN=host:port)" >&2; exit 1; }; \
			if curl -fs "http://$(MOCK_LISTEN)/health" >/dev/null 2>&1; then up=1; break; fi; \
		done; \
		[ -n "$$up" ] || { echo "mock-llm did not answer on http://$(MOCK_LISTEN)/health within 5 s" >&2; exit 1; }; \
	fi; \
	SMARTLLM_DATA_DIR="$(DATA_DIR)" "$(BIN)/smartllm" serve --config "$(RUN_CONF)"

check-config: build
	"$(BIN)/smartllm" check --config "$(CONFIG)"

fmt:
	$(CARGO) fmt --all

lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

# Every test: lints, unit tests, end-to-end tests against the real server and
# mock-llm, the official openai Python SDK as a client, and the packages
# (installed into a clean Debian root).
test: assets venv lint
	$(CARGO) build $(CARGO_FLAGS) --workspace --bins
	@set -o pipefail; SMARTLLM_PYTHON="$(VENV)/bin/python" $(CARGO) test $(CARGO_FLAGS) --workspace --no-fail-fast 2>&1 \
		| tee "$(CARGO_TARGET_DIR)/test.log" || { \
		echo "=== failed tests: what they said (whole output in $(CARGO_TARGET_DIR)/test.log) ==="; \
		grep -A12 "panicked at" "$(CARGO_TARGET_DIR)/test.log" | cut -c1-400 | head -200; exit 1; }
	packaging/test-packages.sh

# Packages (cargo-deb / cargo-generate-rpm, installed when missing) in
# $(CARGO_TARGET_DIR)/packages/.
deb: assets deps
	packaging/build-package.sh deb

rpm: assets deps
	packaging/build-package.sh rpm

# Build both packages, check their file lists, install the .deb into a clean
# Debian 12 root (debootstrap) and run it; upgrade and purge.
test-packages: assets deps
	packaging/test-packages.sh

bench: assets build
	bench/gateway-overhead.sh

# SmartLLM next to nginx, LiteLLM and Portkey (installs them; ~10 minutes).
compare: assets
	bench/compare

# Mixed traffic with faults and reloads for SOAK_MINUTES (default 10).
SOAK_MINUTES ?= 10
soak: assets build
	@test -x $(HOME)/.cache/smartllm-bench/plot-venv/bin/python || { python3 -m venv $(HOME)/.cache/smartllm-bench/plot-venv && $(HOME)/.cache/smartllm-bench/plot-venv/bin/pip install -q matplotlib; }
	$(HOME)/.cache/smartllm-bench/plot-venv/bin/python bench/soak.py --minutes $(SOAK_MINUTES)

# Bounded fuzzing (60 s per target); crashes become regression tests.
fuzz:
	fuzz/run.sh 60

clean-data:
	rm -rf "$(DATA_DIR)"
