# The two commands a new user needs: `make serve` and `make test` (also `make run`, `make chat`).
# Everything installs into .venv inside the repo.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= qwen2.5-coder-0.5b-instruct
PROMPT ?= Write a Python function that returns the sum of a list of numbers.

HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve run chat pull test test-fast clean

install: $(VENV)/.installed

# torch==2.13.0 is the CPU wheel that lies on this machine kind's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build. An existing torch (your own build) is kept.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test,hf]"
	touch $@

pull: install
	$(BIN)/sugam pull $(MODEL)

serve: pull
	$(BIN)/sugam serve $(MODEL) --host $(HOST) --port $(PORT)

run: pull
	$(BIN)/sugam run $(MODEL) "$(PROMPT)"

chat: pull
	$(BIN)/sugam chat $(MODEL)

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
