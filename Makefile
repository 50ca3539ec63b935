# Shortcuts; the README's two commands are what CI runs.
.PHONY: install test lint bench bench-gpu demo

install:
	pip install torch==2.13.0 -e ".[test]"

test:
	python -m pytest -q

lint:
	ruff check .

bench:
	titok-fast bench -k cpu

bench-gpu:
	titok-fast bench -k gpu

demo:
	titok-fast demo
