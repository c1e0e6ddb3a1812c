# The two set-up commands of the README:
#   make demo   - install circot into .venv and run `circot demo` on the shipped shapes model
#   make test   - install circot with its test dependencies into .venv and run the default test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.circot-installed

.PHONY: demo test test-slow install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first: 2.13.0 is the CPU build available offline; any range in pyproject accepts it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,baselines]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/circot demo

test: $(STAMP)
	bash scripts/test-setup.sh
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	bash scripts/test-setup.sh
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info
