# Developer entry points. The two virtual environments exist because kvpress (the benchmark
# peer) needs transformers<5.3 while hcmemory itself tracks current transformers: `.venv` is
# the main one, `.venv-compat` runs the benchmarks and the tests marked `core`.
#
# Both install from the locks in lock/ (the exact versions the suite last passed with, used as pip
# constraints), so a fresh machine gets what was tested; `make lock` refreshes them and
# `make test-latest` tries the newest releases pyproject.toml allows. Installs are stamped
# (<venv>/.installed, remade when pyproject.toml or the lock changes), so repeated `make test`
# calls do not touch pip at all.

PY ?= python3
VENV := .venv
COMPAT := .venv-compat
LATEST := .venv-latest
MAIN_EXTRAS := dev,docs,serve,ray,postgres,langchain,llamaindex,agents
COMPAT_EXTRAS := dev,bench,langchain
# On a machine without an NVIDIA driver, torch is installed first and pinned, so the CPU build
# is used (set TORCH_INDEX to e.g. https://download.pytorch.org/whl/cpu where PyPI's default
# wheel is the CUDA one).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP_QUIET ?= --quiet
comma := ,

HAVE_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_FIRST = $(if $(HAVE_NVIDIA),@true,$(1)/bin/python -m pip install $(PIP_QUIET) '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)))
# $(call NEW_VENV,dir): a venv with a current pip and torch
NEW_VENV = test -x $(1)/bin/python || $(PY) -m venv $(1); \
	$(1)/bin/python -m pip install $(PIP_QUIET) --upgrade pip; \
	$(call TORCH_FIRST,$(1))

# The smoke set `make test-latest` runs on the newest releases: packaging, the quickstart, exactness
# against transformers' own cache, the context's life cycle and the server driven by its real clients.
SMOKE := tests/test_packaging.py tests/test_cache_exact.py tests/test_context.py tests/test_serve.py "tests/test_examples.py::test_example_runs[quickstart.py]"

.PHONY: venv venv-compat model demo test test-latest lock docs bench bench-gemma

venv: $(VENV)/.installed

venv-compat: $(COMPAT)/.installed

$(VENV)/.installed: pyproject.toml lock/main.txt
	$(call NEW_VENV,$(VENV))
	$(VENV)/bin/python -m pip install $(PIP_QUIET) -c lock/main.txt -e '.[$(MAIN_EXTRAS)]'
	touch $@

$(COMPAT)/.installed: pyproject.toml lock/compat.txt
	$(call NEW_VENV,$(COMPAT))
	$(COMPAT)/bin/python -m pip install $(PIP_QUIET) -c lock/compat.txt -e '.[$(COMPAT_EXTRAS)]'
	touch $@

# Resolves both environments afresh to the newest releases pyproject.toml allows (uv, for the
# platform and Python of this machine); run `make test` afterwards and commit lock/ when it passes.
# torch stays at $(TORCH), the release the CPU machines install first.
LOCK = echo '$(TORCH)' | $(VENV)/bin/uv pip compile --quiet --upgrade --python-version 3.11 \
	--annotation-style line --extra $(subst $(comma), --extra ,$(1)) - pyproject.toml -o $(2)
lock:
	test -x $(VENV)/bin/uv || { test -x $(VENV)/bin/python || $(PY) -m venv $(VENV); $(VENV)/bin/python -m pip install $(PIP_QUIET) uv; }
	$(call LOCK,$(MAIN_EXTRAS),lock/main.txt)
	$(call LOCK,$(COMPAT_EXTRAS),lock/compat.txt)

# Downloads and converts the embedded default model once (about half a minute); afterwards
# it only loads the converted copy.
model: venv
	$(VENV)/bin/python -c "import hcmemory; hcmemory.load_model()"

demo: venv model
	$(VENV)/bin/hcmemory demo

test: venv venv-compat model
	$(VENV)/bin/python -m pytest -q --durations=25
	$(COMPAT)/bin/python -m pytest -q -m core

# A throwaway venv with the newest releases pyproject.toml allows (no lock; torch as above), running
# the smoke set: a release that breaks hcmemory shows here before a user meets it.
test-latest: model
	rm -rf $(LATEST)
	$(call NEW_VENV,$(LATEST))
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) -e '.[dev,serve,langchain,llamaindex,agents]'
	$(LATEST)/bin/python -m pip list --format freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q $(SMOKE)

# The API reference and guides (docs/, mkdocs.yml) as a static site in site/; strict: a broken link
# or a reference to a missing object fails the build.
docs: venv
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The standard evaluation grid (every method, RULER-style tasks, 2K/4K/7.5K; resumable, several CPU hours)
# with its report in docs/RESULTS.md, then the speed, context, bounded and integration benchmarks.
EVAL_OUT ?= benchmarks/results/eval
bench: venv venv-compat model
	$(COMPAT)/bin/hcmemory eval --out $(EVAL_OUT)
	$(COMPAT)/bin/hcmemory report $(EVAL_OUT) --output docs/RESULTS.md --ablations benchmarks/results/ablation-4k benchmarks/results/ablation-compact-7.5k
	$(COMPAT)/bin/python -m benchmarks.run
	$(VENV)/bin/python -m benchmarks.bench_integrations

# The second model's grid: Gemma 3 270M from 2K to 32,512 tokens (its 32,768 positions less room for a
# question), the presets, quanto int4 and the kvpress presses at 12.5 % and 40 %, report in
# docs/RESULTS-gemma.md.  Resumable, round-robin over tasks and lengths; 30-45 minutes per 32K
# haystack at one thread (docs/ACCURACY.md, "Gemma 3 270M").
GEMMA_OUT ?= benchmarks/results/eval-gemma
GEMMA_METHODS ?= full hc-25 hc-12.5 compact quanto-4 kvpress:SnapKV@0.125 kvpress:StreamingLLM@0.125 \
	kvpress:Knorm@0.125 kvpress:ExpectedAttention@0.125 kvpress:TOVA@0.125 kvpress:SnapKV@0.4 \
	kvpress:ExpectedAttention@0.4 kvpress:TOVA@0.4
bench-gemma: venv-compat
	$(COMPAT)/bin/hcmemory eval --model gemma-3-270m --lengths 2048 4096 8192 16384 32512 \
		--methods $(GEMMA_METHODS) --out $(GEMMA_OUT)
	$(COMPAT)/bin/hcmemory report $(GEMMA_OUT) --output docs/RESULTS-gemma.md
