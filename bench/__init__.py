"""Benchmarks and long-running checks; run with ``python -m bench...``."""
