# Set-up and the two jobs. A fresh machine needs only Python >= 3.10 (3.11 tested).
# TORCH pins the CPU build that this project's CI machines have on disk; on a GPU machine use
# e.g. `make test TORCH=torch` to keep the CUDA build pip picks.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo demo-synthetic test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# NATTEN is the GNA oracle in the tests; it builds against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation "natten>=0.21,<0.22"
	touch $@

# The main job: the built-in tiny Wan model, dense and sparse with the same seed, speedup report.
demo: $(BIN)/.installed
	$(BIN)/vdiff-sparse generate --attn gna --compare-dense --out demo_output

# The three methods vs dense SDPA on a synthetic video-attention problem (no model).
demo-synthetic: $(BIN)/.installed
	$(BIN)/vdiff-sparse demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python bench/attention_cpu.py --densities 0.05 0.10 0.125 0.20

clean:
	rm -rf $(VENV)
