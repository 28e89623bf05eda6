"""Benchmarks of Tandem on the embedded broker: ``python -m bench`` (see README)."""
