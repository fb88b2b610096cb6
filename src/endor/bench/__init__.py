"""Benchmarks: one harness (harness.py), one module per benchmark with `run(...) -> dict`."""
