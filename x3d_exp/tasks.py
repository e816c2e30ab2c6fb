"""Dispatch of `task=...`: one function per task, user errors as one line and a non-zero exit."""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from x3d_exp.config import ConfigError, validate


class UserError(Exception):
    """Any error caused by the user's input: printed as one line, exit status 2."""


def model_kwargs(cfg: DictConfig) -> dict:
    """The model group as `build_model` keyword arguments (data-independent)."""
    m = cfg.model
    keys = ("gamma_t", "gamma_tau", "gamma_s", "gamma_w", "gamma_b", "gamma_d", "num_frames", "sampling_rate",
            "crop_size", "test_crop_size", "train_scale", "dropout")
    kwargs = {k: m[k] for k in keys if m[k] is not None}
    if "train_scale" in kwargs:
        kwargs["train_scale"] = list(kwargs["train_scale"])
    return kwargs


def task_summary(cfg: DictConfig) -> dict:
    from x3d_exp.models import build_model
    from x3d_exp.models.summary import format_summary, trace_network

    net = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **model_kwargs(cfg))
    count = trace_network(net, net.spec.input_shape)
    test_input = [3, net.spec.num_frames, net.spec.test_crop_size, net.spec.test_crop_size]
    test_count = trace_network(net, test_input)
    print(format_summary(cfg.model.name, count))
    print(f"test crop {test_input}: {test_count.gmacs:.3f} GMACs")
    return {"task": "summary", "model": cfg.model.name, "params": count.params, "gmacs": round(count.gmacs, 4),
            "test_gmacs": round(test_count.gmacs, 4), "input": list(count.input_shape),
            "num_classes": int(cfg.data.num_classes)}


def task_convert(cfg: DictConfig) -> dict:
    from x3d_exp.weights import task_convert as convert

    return convert(cfg)


def task_export(cfg: DictConfig) -> dict:
    from x3d_exp.weights import task_export as export

    return export(cfg)


def task_train(cfg: DictConfig) -> dict:
    from x3d_exp.engine import task_train as train

    return train(cfg)


def task_test(cfg: DictConfig) -> dict:
    from x3d_exp.engine import task_test as test

    return test(cfg)


def task_infer(cfg: DictConfig) -> dict:
    from x3d_exp.infer import task_infer as infer

    return infer(cfg)


TASKS = {"summary": task_summary, "train": task_train, "test": task_test, "convert": task_convert,
         "export": task_export, "infer": task_infer}


def run_task(cfg: DictConfig):
    from x3d_exp.data import DataError
    from x3d_exp.models import FactorError
    from x3d_exp.weights import WeightsError

    try:
        validate(cfg)
        if cfg.task not in TASKS:
            raise UserError(f"task={cfg.task} is not available yet")
        result = TASKS[cfg.task](cfg)
    except (ConfigError, FactorError, UserError, DataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result), flush=True)
    return result
