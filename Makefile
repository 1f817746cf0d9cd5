# `make demo` runs the main job on the built-in offline demo; `make test` runs the test suite.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-env clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/oisd-mlx train configs/demo.yaml --resume  # a second run finds the finished one

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check mlx_oisd cli tests scripts bench

# The peer trainer mlx-lm-lora pins its own packages: it gets a venv of its own.
BENCH_MLX := $(shell [ "$$(uname)" = Linux ] && echo 'mlx[cpu]' || echo mlx)
.venv-bench/bin/.installed:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet 'mlx-lm-lora==5.10.2' '$(BENCH_MLX)'
	touch $@

bench-env: .venv-bench/bin/.installed

# The speed / memory suite (BENCHMARKS.md): under 10 minutes on 2 CPU cores.
bench: $(BIN)/.installed bench-env
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs .pytest_cache
