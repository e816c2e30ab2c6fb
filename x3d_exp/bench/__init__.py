"""Benchmarks, scripts that print figures: `python -m x3d_exp.bench.speed` (model steps against PyTorch; needs the
`bench` extra), `python -m x3d_exp.bench.api` (the public `build_model` with its defaults) and
`python -m x3d_exp.bench.loader` (the decord data loader)."""
