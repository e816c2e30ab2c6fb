"""Benchmarks, scripts that print figures: `python -m x3d_exp.bench.speed` (model steps; needs the `bench` extra for
the PyTorch reference) and `python -m x3d_exp.bench.loader` (the decord data loader)."""
