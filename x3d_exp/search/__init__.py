"""Searches over Hydra jobs: X3D's progressive expansion (x3d_exp.search.progressive), run by the sweeper plugin
hydra_plugins.x3d_exp_search. Each job is recorded by x3d_exp.tracking.sweeps like any multirun's."""
