# The two commands the README promises: `make run` and `make test`.
# Each bootstraps .venv (Python >= 3.12) itself; see scripts/bootstrap.sh.
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: bootstrap run run-remote test lint typecheck docs bench bench-peers clean

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	$(BIN)/uvicorn example_app.main:app --host $(HOST) --port $(PORT)

run-remote: bootstrap
	FASTWORKER_MODE=remote $(BIN)/uvicorn example_app.main:app --host $(HOST) --port $(PORT)

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: bootstrap
	$(BIN)/mypy fastworker_fastapi

docs: bootstrap
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint typecheck docs
	$(BIN)/pytest --cov --cov-report=term-missing -q

bench: bootstrap
	$(BIN)/python -m bench

bench-peers: bootstrap
	scripts/bench_peers.sh

clean:
	rm -rf $(VENV) .venv-peers site .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
