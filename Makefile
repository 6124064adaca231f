# The two commands of the README: `make demo` and `make test` (each installs everything first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# composer's launcher; -n 1 because on a CPU-only machine there is no GPU count to default to.
COMPOSER := $(VENV)/bin/composer -n 1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint experiment testbed downstream clean gpu-wheels gpu-check gpu-check-dry

# Exact pins (requirements/constraints.txt) keep pip's resolver from backtracking for minutes.
$(INSTALLED): setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $@

install: $(INSTALLED)

demo: install
	$(PY) convert_dataset.py --out mds/
	$(COMPOSER) train.py yamls/demo.yaml
	@echo "Fine-tuned VAE (diffusers format): runs/demo/vae/   eval metrics: runs/demo/metrics.json"

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the multi-process and slow tests: the inner loop while developing.
test-fast: install
	$(PY) -m pytest -m 'not slow and not multiprocess' $(PYTEST_ARGS)

# The formatter and linter the pre-commit hooks run (.pre-commit-config.yaml); part of `make test`.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

experiment: install
	$(PY) scripts/replicate.py

# The replication on the photo testbed (real photographs from Debian's wallpaper packages, collected by
# scripts/photo_testbed.py into runs/photo-testbed): an f4 base, control and eq fine-tunes of both seeds; its
# report goes to docs/testbed/ (docs/RESULTS.md stays the demo's).
DOWNSTREAM_RUNS ?= runs/replicate-testbed
testbed: install
	$(PY) scripts/photo_testbed.py
	$(PY) scripts/replicate.py --photos testbed --downsampling 4 --arms control eq --out $(DOWNSTREAM_RUNS) \
		--docs docs/testbed

# A diffusion model on the latents of the testbed replication's control and eq VAEs (scripts/downstream.py;
# docs/RESULTS.md, Downstream).
downstream: install
	$(PY) scripts/downstream.py --runs $(DOWNSTREAM_RUNS)

# The GPU check (docs/OPERATIONS.md, "Checking on a GPU"): the wheels it carries, downloaded here; the
# check itself, on the GPU machine (no install: its image has torch, .whl/ the rest); its CPU dry run.
gpu-wheels:
	scripts/gpu_wheels.sh

gpu-check:
	scripts/gpu_check.sh

gpu-check-dry: install
	PYTHON=$(PY) scripts/gpu_check.sh --dry

clean:
	rm -rf mds runs .pytest_cache gpu_check_out
