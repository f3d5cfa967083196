# The two commands that work on a fresh Debian 12 machine as root: `make demo` and `make test`.
.PHONY: setup lint test test-fast demo clean-demo

PY := .venv/bin

setup:
	bash scripts/setup.sh

lint:
	bash scripts/setup.sh --venv-only
	$(PY)/ruff check daemon tests scripts
	$(PY)/ruff format --check daemon tests scripts
	$(PY)/mypy

test: setup lint
	$(PY)/pytest

# Everything but the tests that boot guests: seconds, not minutes.
test-fast: lint
	$(PY)/pytest -m "not guest"

demo: setup
	$(PY)/python scripts/demo.py

clean-demo:
	$(PY)/python scripts/demo.py --remove
