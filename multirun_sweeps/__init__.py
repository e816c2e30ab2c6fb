"""Sweep definitions for `python run.py -m +sweep=<name>` (Hydra configs, found as pkg://multirun_sweeps).

sweep/:  whole sweeps (their jobs and output folder); expand/: one X3D expansion step per option.
Each multirun is recorded as one MLflow parent run with a child run per job (x3d_exp/sweeps.py).
"""
