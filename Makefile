.PHONY: docs test bench

docs:
	python -m sphinx -W --keep-going -q -b html docs docs/_build/html

test:
	python -m pytest -q --benchmark-disable

bench:
	python benchmarks/solver_table.py
