"""Benchmarks (pytest-benchmark) on the shared harness ``bench/harness.py``; run ``pytest bench/``."""
