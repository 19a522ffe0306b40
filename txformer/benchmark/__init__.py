"""Benchmarks of txformer's building blocks (`python scripts/benchmark_attention.py`)."""
