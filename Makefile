# The two commands of the README. Both set up everything they need first.
.PHONY: demo test lint bench setup

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/gradwatch demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
