"""Benchmarks: `python -m x3d_exp.bench.speed` (needs the `bench` extra for the PyTorch reference)."""
