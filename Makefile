# sap_lightning: every target that needs Python depends on the virtual environment, so a fresh
# machine needs only `make demo` or `make test`. `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAP := $(VENV)/bin/sap
# The CPU wheel is the default; GPU users set TORCH_SPEC (e.g. 'torch==2.13.0' from the CUDA index)
# or install torch into the venv first: the package's torch range then installs nothing more.
TORCH_SPEC ?= torch==2.13.0
PIP_FLAGS ?= -q --disable-pip-version-check

DATA ?= data
PHANTOMS := $(DATA)/phantoms
HEALTHY ?= 10
PATIENTS ?= 14
SEED ?= 0
CONFIG ?=
ARGS ?=
INIT ?= sap
FOLD ?= 1
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install panoptica-venv test lint format demo data bench clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install the package (editable) with dev extras

# panoptica is the independent reference for one-to-one lesion matching; its pins clash with ours
# (older numpy, pandas and cc3d), so it lives in its own venv and the tests call it in a subprocess.
PANOPTICA_VENV ?= .venv-panoptica
$(PANOPTICA_VENV)/.installed:
	$(PYTHON) -m venv $(PANOPTICA_VENV)
	$(PANOPTICA_VENV)/bin/pip install $(PIP_FLAGS) panoptica==2.1.7
	touch $@

panoptica-venv: $(PANOPTICA_VENV)/.installed ## Isolated panoptica 2.1.7 (reference test and benchmark)

test: install panoptica-venv ## Run the whole test suite (unit, integration, distributed, notebooks)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

$(PHANTOMS)/lesion/dataset.json:
	$(SAP) make-phantoms $(PHANTOMS) --healthy $(HEALTHY) --patients $(PATIENTS) --seed $(SEED)

data: install $(PHANTOMS)/lesion/dataset.json ## Generate, check, preprocess and split the synthetic cohort
	$(SAP) check-data $(PHANTOMS)/skeleton
	$(SAP) check-data $(PHANTOMS)/lesion
	$(SAP) preprocess $(PHANTOMS)/skeleton
	$(SAP) preprocess $(PHANTOMS)/lesion
	$(SAP) split $(PHANTOMS)/skeleton --seed $(SEED)
	$(SAP) split $(PHANTOMS)/lesion --folds 7 --tuning-fold 0 --seed $(SEED)

demo: data ## The main job on the synthetic cohort

bench: install panoptica-venv ## Performance benchmarks (side-by-side ratios against named baselines)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean: ## Remove generated data, runs and reports (keeps .venv)
	rm -rf $(DATA) runs reports wandb lightning_logs
