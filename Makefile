# Developer entry points. The two virtual environments exist because kvpress (the benchmark
# peer) needs transformers<5.3 while hcmemory itself tracks current transformers: `.venv` is
# the main one, `.venv-compat` runs the benchmarks and the tests marked `core`.
#
# Installs are stamped (<venv>/.installed, remade when pyproject.toml changes), so repeated
# `make test` calls do not touch pip at all.

PY ?= python3
VENV := .venv
COMPAT := .venv-compat
# On a machine without an NVIDIA driver, torch is installed first and pinned, so the CPU build
# is used (set TORCH_INDEX to e.g. https://download.pytorch.org/whl/cpu where PyPI's default
# wheel is the CUDA one).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP_QUIET ?= --quiet

HAVE_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_FIRST = $(if $(HAVE_NVIDIA),@true,$(1)/bin/python -m pip install $(PIP_QUIET) '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)))

.PHONY: venv venv-compat model demo test bench

venv: $(VENV)/.installed

venv-compat: $(COMPAT)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(call TORCH_FIRST,$(VENV))
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -e '.[dev,langchain,llamaindex,agents]'
	touch $@

$(COMPAT)/.installed: pyproject.toml
	test -x $(COMPAT)/bin/python || $(PY) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(call TORCH_FIRST,$(COMPAT))
	$(COMPAT)/bin/python -m pip install $(PIP_QUIET) 'transformers>=5.2,<5.3' -e '.[dev,bench,langchain]'
	touch $@

# Downloads and converts the embedded default model once (about half a minute); afterwards
# it only loads the converted copy.
model: venv
	$(VENV)/bin/python -c "import hcmemory; hcmemory.load_model()"

demo: venv model
	$(VENV)/bin/hcmemory demo

test: venv venv-compat model
	$(VENV)/bin/python -m pytest -q
	$(COMPAT)/bin/python -m pytest -q -m core

# The standard evaluation grid (every method, RULER-style tasks, 2K/4K/7.5K; resumable, several CPU hours)
# with its report in docs/RESULTS.md, then the speed, context, bounded and integration benchmarks.
EVAL_OUT ?= benchmarks/results/eval
bench: venv venv-compat model
	$(COMPAT)/bin/hcmemory eval --out $(EVAL_OUT)
	$(COMPAT)/bin/hcmemory report $(EVAL_OUT) --output docs/RESULTS.md --ablations benchmarks/results/ablation-4k benchmarks/results/ablation-compact-7.5k
	$(COMPAT)/bin/python -m benchmarks.run
	$(VENV)/bin/python -m benchmarks.bench_integrations
