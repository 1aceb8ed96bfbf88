# The README's two commands: `make run` and `make test`. Both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clients clean

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

# Clients generated from openapi.yaml, as the README's "Generated clients" describes; fails on
# any generator warning. Python: an installable project in build/clients/python. TypeScript
# (needs node's npx; not part of `make test`): build/clients/typescript/api.d.ts.
OPENAPI_TS ?= openapi-typescript@7.13.0
clients: $(STAMP)
	rm -rf build/clients && mkdir -p build/clients/typescript
	$(BIN)/openapi-python-client generate --path openapi.yaml \
		--config clients/openapi-python-client.yaml --output-path build/clients/python \
		--fail-on-warning
	npx --yes $(OPENAPI_TS) openapi.yaml -o build/clients/typescript/api.d.ts \
		> build/clients/typescript/log.txt 2>&1 || { cat build/clients/typescript/log.txt; exit 1; }
	@cat build/clients/typescript/log.txt
	@if grep -qi warn build/clients/typescript/log.txt; then echo "openapi-typescript warned"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
