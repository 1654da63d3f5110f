# Two commands on a fresh machine: `make demo` (install + whole pipeline) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-server data demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# PostgreSQL for the team server (`psyface server`, tests/test_team_server.py): Debian's package where missing.
install-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		[ "$$(id -u)" = 0 ] || { echo "PostgreSQL is missing: sudo apt-get install -y postgresql" >&2; exit 1; }; \
		apt-get update && apt-get install -y postgresql; }

# The embedded default dataset, regenerated deterministically so it matches data.dvc byte for byte.
data/dataset.yaml: | install
	$(BIN)/psyface synth --out data

data: data/dataset.yaml

demo: install data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc status dvc.yaml data.dvc

test: install install-server
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15

bench: install install-server
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf artifacts reports/validation reports/metrics.json reports/landmarks
