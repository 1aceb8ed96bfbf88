# The README's two commands: `make run` and `make test`. Both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test,lint]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check service tests bench examples
	$(BIN)/ruff format --check service tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	@if command -v docker-compose >/dev/null; then docker-compose -f docker-compose.yml config --quiet && echo "docker-compose.yml: valid"; \
	elif docker compose version >/dev/null 2>&1; then docker compose config --quiet && echo "docker-compose.yml: valid"; \
	else echo "docker compose not installed: skipping docker-compose.yml check"; fi

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
