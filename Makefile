# Two commands do everything on a fresh machine: `make run` and `make test`.
.PHONY: setup run test lint bench
setup:
	bash scripts/setup.sh
run: setup
	.venv/bin/expertscope run $(ARGS)
test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)
lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
bench: setup
	.venv/bin/python benchmarks/bench_capture.py
