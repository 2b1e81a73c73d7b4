# Two commands do everything on a fresh machine: `make run` and `make test`.
.PHONY: setup run test test-fast lint bench
setup:
	bash scripts/setup.sh
# One torch thread per process, and the steering stage's evaluations spread over two worker processes: the
# bundled demo's matrices are too small for two threads (they made the run slower), not for two processes.
run: setup
	.venv/bin/expertscope run --threads 1 --executor process --workers 2 $(ARGS)
# One torch thread per test process unless the caller says otherwise (the tests' tiny models run slower on two),
# and one test process per core, at most 4 (each holds torch and a few tiny models): PYTEST_WORKERS=0 for one.
PYTEST_WORKERS ?= $(shell python3 -c "import os; print(min(4, os.cpu_count() or 1))")
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (into git-ignored __pycache__ folders): every test
# process and every worker process the tests spawn would otherwise compile the package and the tests again.
test: setup
	PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)
# The fast subset while working: unit and integration tiers, less the tests marked slow.
test-fast: setup
	PYTHONDONTWRITEBYTECODE= OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests/unit tests/integration -m "not slow" $(PYTEST_ARGS)
lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy
bench: setup
	.venv/bin/python benchmarks/bench_capture.py
