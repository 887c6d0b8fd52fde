# The two commands of the README. Both set up everything they need first.
.PHONY: demo test lint bench setup stack

setup:
	@scripts/bootstrap.sh

demo: setup
	.venv/bin/gradwatch demo

# Collector, Prometheus and Alertmanager on this machine, without Docker (Ctrl-C stops them).
stack: setup
	scripts/stack.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
