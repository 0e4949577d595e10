# make run  : the main job (reproduce the paper's quick preset) — sets up .venv first if needed
# make test : the test suite — sets up .venv first if needed
VENV := .venv
STAMP := $(VENV)/.outlierlab-setup

.PHONY: setup run test lint
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/constraints.txt
	./scripts/setup.sh

run: $(STAMP)
	$(VENV)/bin/outlierlab reproduce --preset quick --out runs/quick

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
