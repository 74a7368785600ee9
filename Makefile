# Convenience targets; each one is a script in scripts/ or bench/ so a fresh machine without
# make can run the same thing with bash.
.PHONY: setup demo test lint bench fuzz

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench:
	bash bench/run.sh

fuzz:
	bash fuzz/run.sh 60
