# agelab — every target is a thin wrapper over the `agelab` CLI in a venv under the repo.
# `make demo` and `make test` work as the first command on a fresh clone (they install first).

PYTHON   ?= $(shell command -v python3.11 || command -v python3)
VENV     := .venv
BIN      := $(VENV)/bin
AGELAB   := $(BIN)/agelab
STAMP    := $(VENV)/.installed-stamp
STUDY    ?= experiments/demo.yaml
N        ?= 4
PORT     ?= 5000
DASH_PORT ?= 8080
MODEL    ?= models:/demo@champion
IMAGES   ?=
OUT      ?=
HOST     ?= 127.0.0.1
ARGS     ?=
DATA     ?=
DATA_ARG := $(if $(DATA),data.path=$(DATA),)
PYTEST   := $(BIN)/python -m pytest

.DEFAULT_GOAL := help
.PHONY: help install sysdeps demo test test-fast test-gpu lint study grid random workers \
        report check register predict ui dashboard bench bench-quick bench-gpu preview clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

install: $(STAMP) ## create .venv and install agelab (seconds when nothing changed)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

sysdeps: ## install Debian packages the full test run uses (postgresql, chromium, chromium-driver), when root
	@bash scripts/sysdeps.sh

demo: install ## run the default study on embedded synthetic faces (~5 min on 2 CPU cores)
	$(AGELAB) run experiments/demo.yaml $(ARGS)

test: install sysdeps ## the whole suite: slow, PostgreSQL, browser; GPU tests skip with a reason without CUDA
	$(PYTEST) --durations=15 $(ARGS)

test-fast: install ## quick tests only (no slow, PostgreSQL or browser tests)
	$(PYTEST) -m "not slow and not postgres and not browser and not gpu" $(ARGS)

test-gpu: install ## CUDA tests (needs a GPU machine; they fail, not skip, without CUDA)
	AGELAB_REQUIRE_CUDA=1 $(PYTEST) -m gpu -rs $(ARGS)

lint: install ## ruff
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

study: install ## run a study: make study STUDY=experiments/x.yaml [DATA=path] [ARGS="k=v ..."]
	$(AGELAB) run $(STUDY) $(DATA_ARG) $(ARGS)

grid: install ## the full norm x act x backbone grid (GPU-sized)
	$(AGELAB) run experiments/norm_act_grid.yaml $(DATA_ARG) $(ARGS)

random: install ## random search over choices and numeric hyper-parameters
	$(AGELAB) run experiments/random_search.yaml $(DATA_ARG) $(ARGS)

workers: install ## N local workers on one study, worker i on GPU i mod G: make workers N=4 STUDY=... [ARGS="--gpus 0,1 --workers-per-gpu 2"]
	$(AGELAB) run $(STUDY) --workers $(N) $(DATA_ARG) $(ARGS)

report: install ## ablation report (verdict, CIs, tests): make report STUDY=experiments/x.yaml | NAME
	$(AGELAB) report $(STUDY) $(ARGS)

check: install ## do Optuna and MLflow agree? repair what is safe: make check STUDY=... [ARGS=--dry-run]
	$(AGELAB) check $(STUDY) $(ARGS)

register: install ## best cell's best run -> Model Registry (alias champion): make register STUDY=... [ARGS="--name x"]
	$(AGELAB) register $(STUDY) $(ARGS)

predict: install ## ages of images: make predict IMAGES="folder|labels.csv|files" [MODEL=models:/demo@champion] [OUT=preds.csv]
	@test -n "$(IMAGES)" || { echo 'make predict: set IMAGES (a folder, a CSV manifest or image files)'; exit 2; }
	$(AGELAB) predict $(MODEL) $(IMAGES) $(if $(OUT),--out $(OUT),) $(ARGS)

ui: install ## MLflow UI on http://$(HOST):$(PORT) (loopback only unless HOST is set)
	$(AGELAB) ui --host $(HOST) --port $(PORT) $(ARGS)

dashboard: install ## optuna-dashboard on http://$(HOST):$(DASH_PORT)
	$(AGELAB) dashboard --host $(HOST) --port $(DASH_PORT) $(ARGS)

bench: install ## all benchmarks, full size, -> bench/results.json + .md (~20 min on 2 CPU cores)
	$(AGELAB) bench $(ARGS)

bench-quick: install ## the same comparisons at small sizes (< 2 min on 2 idle CPU cores)
	$(AGELAB) bench --quick $(ARGS)

bench-gpu: install ## GPU path: fp32/bf16/channels_last/compile img/s, bare-loop fraction, memory, loader/naive ratios (refuses without CUDA)
	$(AGELAB) bench --gpu $(ARGS)

preview: install ## contact sheet of synthetic faces -> docs/img/synthetic_preview.png
	$(AGELAB) data preview --rows 6 --cols 7 --out docs/img/synthetic_preview.png $(ARGS)

clean: ## remove caches; the venv only with VENV_TOO=1, mlruns/ only with FORCE=1
	rm -rf .cache .pytest_cache .ruff_cache .hypothesis test-artifacts
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
	@if [ "$(FORCE)" = "1" ]; then \
	  find mlruns -mindepth 1 -not -name .gitkeep -exec rm -rf {} + ; echo "removed mlruns/ contents"; \
	else echo "kept mlruns/ (tracking data); use 'make clean FORCE=1' to delete it too"; fi
	@if [ "$(VENV_TOO)" = "1" ]; then rm -rf $(VENV); fi
