# medlab: `make` (or `make help`) lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL := medlab
DATASET ?= synthetic
MEDMNIST ?= pneumoniamnist
MEDMNIST_SIZE ?= 28
NOTEBOOKS ?=
PARAMS ?=
SKIP_BAD_FILES ?=
TRACKING ?=
NBVAL_DIR := build/nbval

.PHONY: help setup lab data reports test browser serve lint bench lock clean mlflow

help: ## Show this help
	@echo "medlab: reproducible medical image classification (see README.md)"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-9s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: DATASET=synthetic|synthetic-4class|pneumoniamnist|path/to/file.npz|path/to/folder"
	@echo "           NOTEBOOKS='01 02' (subset), PARAMS='-p image_size=32' (notebook parameters)"
	@echo "           SKIP_BAD_FILES=1 (leave unreadable images out in every lesson and the bench, and list them)"
	@echo "           TRACKING=mlflow (log every training lesson and the evaluation to MLflow, see make mlflow)"

KERNEL_SPEC := $(VENV)/share/jupyter/kernels/$(KERNEL)/kernel.json

setup: $(VENV)/.installed $(KERNEL_SPEC) ## Create .venv from the lock file and register the Jupyter kernel
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --require-hashes -r requirements.lock
	$(PY) -m pip install --no-deps -e .
	touch $@

# The kernel asks TensorFlow for oneDNN's kernels (as `import medlab` does) before a notebook imports it:
# a notebook opened in JupyterLab then trains as fast, and to the same numbers, as in `make reports`. It also
# loads TensorFlow as it starts (medlab.execution.LESSON_PRELOAD), so TensorFlow's loading lines stay out of cells.
$(KERNEL_SPEC): $(VENV)/.installed Makefile medlab/execution.py
	$(PY) -m medlab.cli kernel

lab: setup ## Open the notebooks in JupyterLab
	$(VENV)/bin/jupyter lab notebooks/

data: setup ## Generate the synthetic datasets and download MEDMNIST (default pneumoniamnist; needs internet)
	$(PY) -m medlab.cli data synthetic --task binary
	$(PY) -m medlab.cli data synthetic --task four_class
	$(PY) -m medlab.cli data download $(MEDMNIST) --size $(MEDMNIST_SIZE)

reports: setup ## Execute every notebook into reports/<run>/ (DATASET=..., default synthetic)
	$(PY) -m medlab.cli reports --dataset "$(DATASET)" $(if $(NOTEBOOKS),--notebooks $(NOTEBOOKS)) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(SKIP_BAD_FILES),-p skip_bad_files=true) $(if $(TRACKING),-p tracking=$(TRACKING)) $(PARAMS)

mlflow: setup ## Open MLflow's UI on the runs logged with TRACKING=mlflow (MLFLOW_TRACKING_URI, else mlruns.db)
	$(PY) -m medlab.tracking ui

browser: ## Install Debian's chromium and chromedriver for the browser test (when root and missing)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "note: chromium/chromedriver missing and not root: the browser test will be skipped"; \
	fi

# The unit tests run beside the notebooks under nbval; tests/test_reports.py (which executes lessons itself)
# follows nbval, so that both legs take about as long. tests/test_execution.py, which mostly waits for kernels
# to start and notebooks to sleep, runs as a third process beside both.
test: setup browser ## Unit tests and, side by side, every notebook under nbval with small parameters
	rm -rf $(NBVAL_DIR)
	$(PY) -m medlab.smoke $(NBVAL_DIR)
	@echo "unit tests (logs: build/unit-tests.log, build/execution-tests.log, shown at the end) and notebooks run side by side"
	@$(PY) -m pytest tests --ignore=tests/test_reports.py --ignore=tests/test_execution.py -p no:cacheprovider \
		--durations=15 > build/unit-tests.log 2>&1 & unit=$$!; \
	$(PY) -m pytest tests/test_execution.py -p no:cacheprovider --durations=5 \
		> build/execution-tests.log 2>&1 & execution=$$!; \
	export MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/$(NBVAL_DIR)/mlruns.db; \
	MEDLAB_RUN_EAGERLY=1 $(PY) -m pytest $(NBVAL_DIR) --nbval-lax --nbval-kernel-name $(KERNEL) -p no:cacheprovider --durations=10 \
		&& $(PY) -m medlab.tracking check \
		&& env -u MLFLOW_TRACKING_URI $(PY) -m pytest tests/test_reports.py -p no:cacheprovider --durations=5; \
	notebooks=$$?; \
	wait $$unit; units=$$?; wait $$execution; executions=$$?; cat build/unit-tests.log build/execution-tests.log; \
	echo "make test: notebooks and test_reports exit $$notebooks, test_execution exit $$executions," \
		"other unit tests exit $$units"; \
	[ $$notebooks = 0 ] && [ $$units = 0 ] && [ $$executions = 0 ]

serve: setup ## Start the web app on http://127.0.0.1:8000 for the newest run (RUN=reports/<run> to choose)
	$(VENV)/bin/medlab serve $(if $(RUN),--run $(RUN))

lint: setup ## Static checks (ruff on code and notebooks) and notebooks-without-outputs check
	$(VENV)/bin/ruff check medlab tests scripts notebooks
	$(PY) -m medlab.smoke --check-clean

SEEDS ?= 3
SPEED ?= 1
bench: setup ## Full report per seed (SEEDS=3) on the real data when found, then one table (SPEED=0: no speed bench)
	$(PY) -m medlab.cli bench full --seeds $(SEEDS) $(if $(filter-out synthetic,$(DATASET)),--dataset "$(DATASET)") \
		$(if $(SKIP_BAD_FILES),--skip-bad-files) $(if $(filter 0,$(SPEED)),--no-speed) $(if $(TRACKING),--tracking $(TRACKING))

lock: ## Re-resolve requirements.lock from pyproject.toml (needs uv) and refresh environment.yml
	uv pip compile pyproject.toml --extra dev -c constraints.txt --python-version 3.11 --generate-hashes -o requirements.lock
	$(PY) scripts/environment_from_lock.py

clean: ## Remove generated reports, caches and build files (keeps .venv and downloads)
	rm -rf build reports/*/ reports/.*staging reports/.*.lock data/cache data/synthetic .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
