# Both targets set up .venv with the pinned packages first (scripts/setup_venv.sh).
.PHONY: setup train test test-fast bench

setup:
	bash scripts/setup_venv.sh

train: setup
	.venv/bin/selfjudge train $(ARGS)

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/selfjudge bench kernels $(ARGS)
