"""One function per `task=...`, each `(cfg, job) -> dict` (the dict is the run's final JSON line).

Looked up by name and imported on use, so `python run.py task=summary` loads no training code.
"""

from __future__ import annotations

import importlib
from typing import Callable

from omegaconf import DictConfig

from x3d_exp.config import JobContext

# task name -> (module under x3d_exp.tasks, function)
TASKS = {"train": ("train", "task_train"), "test": ("train", "task_test"), "infer": ("infer", "task_infer"),
         "summary": ("model", "task_summary"), "convert": ("model", "task_convert"),
         "export": ("model", "task_export"), "prepare": ("prepare", "task_prepare"),
         "ui": ("ui", "task_ui")}
# Tasks that train or test a network, and so may run as several msrun ranks.
DISTRIBUTED_TASKS = ("train", "test")


def task_function(name: str) -> Callable[[DictConfig, JobContext], dict]:
    module, function = TASKS[name]
    return getattr(importlib.import_module(f"x3d_exp.tasks.{module}"), function)
