# sap_lightning: every target that needs Python depends on the virtual environment, so a fresh
# machine needs only `make demo` or `make test`. `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAP := $(VENV)/bin/sap
# torch is installed first, from TORCH_INDEX when given (a wheel index such as PyTorch's CUDA
# one): make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu126
# (docs/cluster.md). The install stamp names both, so changing either reinstalls torch.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_FLAGS ?= -q --disable-pip-version-check
TORCH_KEY := $(shell printf '%s %s' '$(TORCH_SPEC)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)
INSTALLED := $(VENV)/.installed-torch-$(TORCH_KEY)

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
.PHONY: finetune-config smoke-paper help install panoptica-venv nnunet-venv test test-fast test-learning mae study-repeats lint format demo data pretrain ssl finetune predict sweep agent bench bench-gpu clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip 'setuptools>=70.1'  # builds wheels (tests)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(if $(TORCH_INDEX),--index-url '$(TORCH_INDEX)') "$(TORCH_SPEC)"
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[dev]'
	# nnU-Net's ResEnc U-Net (backbone resenc_unet): without its timm/torchvision dependencies,
	# which would replace the chosen torch; the backbone uses none of them.
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps 'dynamic-network-architectures>=0.4.4,<0.5'
	rm -f $(VENV)/.installed $(VENV)/.installed-torch-*
	printf '%s\n%s\n' '$(TORCH_SPEC)' '$(TORCH_INDEX)' > $@

install: $(INSTALLED) ## Create .venv and install the package (editable); TORCH_SPEC=, TORCH_INDEX= pick torch

# panoptica is the independent reference for one-to-one lesion matching; its pins clash with ours
# (older numpy, pandas and cc3d), so it lives in its own venv and the tests call it in a subprocess.
PANOPTICA_VENV ?= .venv-panoptica
$(PANOPTICA_VENV)/.installed:
	$(PYTHON) -m venv $(PANOPTICA_VENV)
	$(PANOPTICA_VENV)/bin/pip install $(PIP_FLAGS) panoptica==2.1.7
	touch $@

panoptica-venv: $(PANOPTICA_VENV)/.installed ## Isolated panoptica 2.1.7 (reference test and benchmark)

# nnU-Net v2 is the independent reader of `sap predict` folders (its own evaluator scores them);
# it pins its own stack, so it lives in its own venv. The CPU torch goes in first and stays
# pinned while nnunetv2 installs: otherwise its torchvision (via timm) pulls a newer CUDA torch.
NNUNET_VENV ?= .venv-nnunet
$(NNUNET_VENV)/.installed:
	$(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(NNUNET_VENV)/bin/pip install $(PIP_FLAGS) nnunetv2==2.8.1 "$(TORCH_SPEC)"
	touch $@

nnunet-venv: $(NNUNET_VENV)/.installed ## Isolated nnU-Net v2 (reads and scores sap predict folders in tests)

# Two pytest workers; the study tests share one study, so they stay on one worker (loadgroup).
TEST_WORKERS ?= 2
PYTEST_RUN = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup
test: install panoptica-venv nnunet-venv ## The test suite (unit, integration, distributed, notebooks) but the learning checks
	$(PYTEST_RUN) -m "not learning" $(PYTEST_ARGS) tests

test-learning: install ## The learning checks (minutes of training each; CI runs them after make test)
	$(PYTEST_RUN) -m learning $(PYTEST_ARGS) tests

test-fast: install ## The unit tests only (a quick loop while editing)
	$(PYTEST_RUN) -m "not learning" $(PYTEST_ARGS) tests/unit

lint: install ## ruff check and format check
	$(VENV)/bin/ruff check src tests benchmarks notebooks
	$(VENV)/bin/ruff format --check src tests benchmarks notebooks

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix src tests benchmarks notebooks
	$(VENV)/bin/ruff format src tests benchmarks notebooks

data: install ## Generate (or reuse, when this generator drew it with these settings), check, preprocess and split the synthetic cohort
	$(SAP) make-phantoms $(PHANTOMS) --healthy $(HEALTHY) --patients $(PATIENTS) --seed $(SEED) --reuse
	$(SAP) check-data $(PHANTOMS)/skeleton
	$(SAP) check-data $(PHANTOMS)/lesion
	$(SAP) preprocess $(PHANTOMS)/skeleton
	$(SAP) preprocess $(PHANTOMS)/lesion
	$(SAP) split $(PHANTOMS)/skeleton --seed $(SEED)
	$(SAP) split $(PHANTOMS)/lesion --folds 7 --tuning-fold 0 --seed $(SEED)

PRETRAIN_RUN ?= runs/cpu_pretrain
SSL_RUN ?= runs/cpu_ssl
MAE_RUN ?= runs/cpu_mae

# A run interrupted by Ctrl-C or a killed job has checkpoints/last.ckpt but no backbone.pt (or,
# for fine-tuning, no finished marker): the make targets resume their own default runs.
resume_if_interrupted = $(if $(and $(wildcard $(1)/checkpoints/last.ckpt),$(if $(CONFIG),,yes)),resume=true)

pretrain: data ## Stage 1: skeleton pretraining (CONFIG=experiment.yaml ARGS="key=value ...")
	$(SAP) pretrain --config $(or $(CONFIG),experiments/cpu/pretrain.yaml) $(call resume_if_interrupted,$(PRETRAIN_RUN)) $(ARGS)

ssl: data ## The SSL arm's pretraining (Tang et al.) of the same backbone
	$(SAP) ssl --config $(or $(CONFIG),experiments/cpu/ssl.yaml) $(call resume_if_interrupted,$(SSL_RUN)) $(ARGS)

mae: data ## The MAE arm's pretraining (masked autoencoder) of the same backbone
	$(SAP) ssl --config $(or $(CONFIG),experiments/cpu/mae.yaml) $(call resume_if_interrupted,$(MAE_RUN)) $(ARGS)

$(PRETRAIN_RUN)/backbone.pt:
	$(MAKE) pretrain CONFIG= ARGS=

$(SSL_RUN)/backbone.pt:
	$(MAKE) ssl CONFIG= ARGS=

$(MAE_RUN)/backbone.pt:
	$(MAKE) mae CONFIG= ARGS=

# The pretraining an arm starts from is run first when its exported backbone is absent.
FINETUNE_CONFIG = $(or $(CONFIG),experiments/cpu/finetune_$(INIT).yaml)
FINETUNE_RUN ?= runs/cpu_finetune_$(INIT)_fold$(FOLD)

finetune-config:
	@test -f "$(FINETUNE_CONFIG)" || { echo "make finetune: $(FINETUNE_CONFIG) does not exist (INIT must be an arm: scratch, sap, ssl or mae; or give CONFIG=file)" >&2; exit 2; }

ARM_SOURCE = $(if $(filter sap,$(INIT)),$(PRETRAIN_RUN)/backbone.pt) $(if $(filter ssl,$(INIT)),$(SSL_RUN)/backbone.pt) $(if $(filter mae,$(INIT)),$(MAE_RUN)/backbone.pt)
finetune: finetune-config data $(ARM_SOURCE) ## Lesion fine-tuning: INIT=scratch|sap|ssl|mae FOLD=k
	$(SAP) finetune --config $(FINETUNE_CONFIG) data.fold=$(FOLD) $(call resume_if_interrupted,$(FINETUNE_RUN)) $(ARGS)

predict: install ## Predict with a run: RUN=runs/... INPUT=dataset OUT=folder [ARGS=...]
	$(SAP) predict --checkpoint $(RUN) --input $(INPUT) --out $(OUT) $(ARGS)

SWEEP ?= experiments/sweeps/arms_cpu.yaml
sweep: install ## Create a W&B sweep from SWEEP=experiments/sweeps/X.yaml (needs `wandb login`)
	$(SAP) sweep $(SWEEP) $(ARGS)

agent: install ## Run a W&B sweep agent: SWEEP_ID=entity/project/id
	$(VENV)/bin/wandb agent $(SWEEP_ID)

# The paper configuration (Swin UNETR, feature size 48, 96^3 patches) for two optimiser steps per
# run on the CPU: every paper experiment file and the transfers between them, on a small cohort.
SMOKE ?= runs/smoke_paper
SMOKE_PRECISION ?= bf16-mixed
SMOKE_ARGS = trainer.max_steps=2 trainer.max_epochs=1 trainer.limit_val_batches=1 \
	trainer.accelerator=cpu trainer.devices=1 trainer.strategy=auto trainer.global_batch_size=null \
	trainer.precision=$(SMOKE_PRECISION) trainer.enable_progress_bar=false logger=csv \
	data.num_workers=0 data.queue_length=4 data.samples_per_volume=2 validation.sw_batch_size=1
SMOKE_LESION = data.dataset=$(SMOKE)/data/lesion data.n_folds=3 data.fold=1
smoke-paper: install ## Paper configuration end to end for 2 steps per run on the CPU (not in make test)
	rm -rf $(SMOKE)
	$(SAP) make-phantoms $(SMOKE)/data --healthy 3 --patients 9 --size medium --seed $(SEED)
	$(SAP) pretrain --config experiments/paper/pretrain.yaml data.dataset=$(SMOKE)/data/skeleton run_dir=$(SMOKE)/pretrain $(SMOKE_ARGS)
	$(SAP) ssl --config experiments/paper/ssl.yaml data.dataset=$(SMOKE)/data/skeleton run_dir=$(SMOKE)/ssl $(SMOKE_ARGS)
	$(SAP) finetune --config experiments/paper/finetune_scratch.yaml $(SMOKE_LESION) run_dir=$(SMOKE)/scratch $(SMOKE_ARGS)
	$(SAP) finetune --config experiments/paper/finetune_sap.yaml $(SMOKE_LESION) model.pretrained=$(SMOKE)/pretrain run_dir=$(SMOKE)/sap $(SMOKE_ARGS)
	$(SAP) finetune --config experiments/paper/finetune_ssl.yaml $(SMOKE_LESION) model.pretrained=$(SMOKE)/ssl run_dir=$(SMOKE)/ssl_arm $(SMOKE_ARGS)
	$(SAP) predict --checkpoint $(SMOKE)/sap --skeleton-checkpoint $(SMOKE)/pretrain --input $(SMOKE)/data/lesion --out $(SMOKE)/predictions --sw-batch-size 1 --no-progress
	@echo "smoke-paper: every paper experiment ran; transfer reports in $(SMOKE)/{sap,ssl_arm}/transfer_report.json"

demo: install ## The study in miniature: cohort, pretraining, three arms, report (reports/demo)
	$(SAP) study --config experiments/study/demo.yaml $(ARGS)

REPEATS ?= 5
study-repeats: install ## The demo's study REPEATS times (repeat 0 is make demo's), pooled in reports/demo_repeats
	$(SAP) study --config experiments/study/demo.yaml --repeats $(REPEATS) $(ARGS)

bench: install panoptica-venv ## Performance benchmarks: every ratio with its target in one table
	$(PY) benchmarks/run_all.py

BENCH_GPU_ARGS ?=
bench-gpu: install ## First-GPU measurements: steps/s with the real loader and from memory, inference, variants
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

clean: ## Remove generated data, runs and reports (keeps .venv)
	rm -rf $(DATA) runs reports wandb lightning_logs
