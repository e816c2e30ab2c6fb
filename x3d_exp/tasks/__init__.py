"""One function per `task=...`, each `(cfg, job) -> dict` (the dict is the run's final JSON line).

Looked up in x3d_exp.config.TASKS and imported on use, so `python run.py task=summary` loads no training code.
"""

from __future__ import annotations

import importlib
from typing import Callable

from omegaconf import DictConfig

from x3d_exp.config import TASKS, JobContext

# Tasks that train or test a network, and so may run as several msrun ranks.
DISTRIBUTED_TASKS = ("train", "test")


def task_function(name: str) -> Callable[[DictConfig, JobContext], dict]:
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(f"x3d_exp.tasks.{module}"), function)
