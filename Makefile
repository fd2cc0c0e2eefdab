# Two commands do everything: `make train` and `make test`; each installs what is missing first.
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup train test test-all lint bench lock clean

setup:
	@bash scripts/install.sh

train: setup
	@$(BIN)/timeshare train $(ARGS)

test: setup lint
	@$(BIN)/python -m pytest -m "not extended" $(PYTEST_ARGS)

# Every test, the extended end-to-end ones (other parallel layouts, multi-node faults) included.
test-all: setup lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check --quiet .
	@$(BIN)/hadolint docker/Dockerfile

bench: setup
	@$(BIN)/timeshare bench $(ARGS)

# Rewrites the lock from the current environment (after a deliberate change to setup.py).
lock: setup
	@{ head -n 2 requirements/lock-cpu.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)=='; } > requirements/lock-cpu.new
	@mv requirements/lock-cpu.new requirements/lock-cpu.txt

clean:
	rm -rf $(VENV) .pytest_cache runs
