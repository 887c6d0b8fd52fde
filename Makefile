# The two commands of the README (demo, test). Both set up everything they need first.
.PHONY: demo test unit lint setup stack

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

# The fast loop: tests that need no ML framework and start no process (collector, agent core,
# proto), in seconds.
unit: setup
	.venv/bin/python -m pytest -q tests/unit --hypothesis-profile=quick

lint: setup
	.venv/bin/ruff check .
