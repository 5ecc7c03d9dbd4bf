# Set-up is part of every target: the first call creates .venv and installs the project.
PYTHON ?= python3
VENV   ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
BIN := $(VENV)/bin
OUT ?= demo-out

.PHONY: demo test lint bench clean

$(BIN)/anogan-ray: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,vendor]'
	touch $@

## demo: the main job, end to end on the built-in synthetic cohort with a local Ray
demo: $(BIN)/anogan-ray
	$(BIN)/anogan-ray demo --out $(OUT)

## test: the whole test suite (what CI runs)
test: $(BIN)/anogan-ray
	@started=$$(date +%s); \
	$(BIN)/ruff check anogan_ray jobs tests benchmarks && $(BIN)/python -m pytest -q; \
	status=$$?; took=$$(( $$(date +%s) - started )); \
	echo "make test: $$(( took / 60 )) min $$(( took % 60 )) s (lint and tests)"; exit $$status

lint: $(BIN)/anogan-ray
	$(BIN)/ruff check anogan_ray jobs tests benchmarks
	$(BIN)/ruff format --check anogan_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
