"""x3d_exp.config.validate: every range it checks fails as one ConfigError that starts with the key and its value."""

from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf

from tests.cli_helpers import compose_config
from x3d_exp.config import FACTORS, validate
from x3d_exp.errors import ConfigError


@pytest.fixture(scope="module")
def default():
    cfg = compose_config()
    validate(cfg)
    return cfg


RANGE_ERRORS = [
    ({"task": "fit"}, "task", "must be one of"),
    ({"device": "TPU"}, "device", "must be one of"),
    ({"amp_level": "O4"}, "amp_level", "must be one of"),
    *[({f"model.{name}": 0.0}, f"model.{name}", "must be > 0") for name in FACTORS],
    ({"model.num_frames": 0}, "model.num_frames", "must be >= 1"),
    ({"model.sampling_rate": 0}, "model.sampling_rate", "must be >= 1"),
    ({"data.crop_size": 0}, "data.crop_size", "must be >= 1"),
    ({"data.test_crop_size": -4}, "data.test_crop_size", "must be >= 1"),
    ({"data.spatial_scale": 0.0}, "data.spatial_scale", "must be > 0"),
    ({"model.dropout": 1.0}, "model.dropout", "must be in [0, 1)"),
    ({"model.cpu_kernels": "fast"}, "model.cpu_kernels", "must be auto, native or custom"),
    ({"optim.lr": 0.0}, "optim.lr", "must be > 0"),
    ({"optim.weight_decay": -1e-4}, "optim.weight_decay", "must be >= 0"),
    ({"optim.clip_grad_norm": 0.0}, "optim.clip_grad_norm", "must be > 0"),
    ({"optim.clip_grad_norm": 1.0, "amp_level": "O2"}, "optim.clip_grad_norm", "not combined with amp_level"),
    ({"optim.name": "adam"}, "optim.name", "must be sgd or adamw"),
    ({"schedule.name": "linear"}, "schedule.name", "must be cosine_warmup or multistep"),
    ({"schedule.warmup_epochs": -1.0}, "schedule.warmup_epochs", "must be >= 0"),
    ({"data.batch_size": 0}, "data.batch_size", "must be >= 1"),
    ({"data.eval_batch_size": 0}, "data.eval_batch_size", "must be >= 1"),
    ({"data.num_workers": "many"}, "data.num_workers", "must be auto or a whole number >= 0"),
    ({"data.num_workers": -1}, "data.num_workers", "must be auto or a whole number >= 0"),
    ({"data.decode_threads": 0}, "data.decode_threads", "must be auto or a whole number >= 1"),
    ({"data.train_clips_per_video": 0}, "data.train_clips_per_video", "must be >= 1"),
    ({"data.train_clips_per_video": 3}, "data.train_clips_per_video", "must divide data.batch_size=16"),
    ({"data.num_classes": 0}, "data.num_classes", "must be >= 1"),
    ({"data.max_bad_fraction": 1.5}, "data.max_bad_fraction", "must be in [0, 1]"),
    ({"data.test_num_clips": 0}, "data.test_num_clips", "must be >= 1"),
    ({"data.test_num_crops": 2}, "data.test_num_crops", "must be 1 or 3"),
    ({"trainer.epochs": 0}, "trainer.epochs", "must be >= 1"),
    *[({f"trainer.{name}": 0}, f"trainer.{name}", "must be >= 1")
      for name in ("eval_every", "ckpt_every", "keep_last", "log_every")],
    ({"trainer.precise_bn_batches": -1}, "trainer.precise_bn_batches", "must be >= 0"),
    ({"launcher.nproc": 0}, "launcher.nproc", "must be >= 1"),
    ({"task": "test"}, "ckpt", "task=test needs ckpt=PATH"),
]


@pytest.mark.parametrize("values, key, reason", RANGE_ERRORS,
                         ids=[" ".join(f"{k}={v}" for k, v in case[0].items()) for case in RANGE_ERRORS])
def test_each_range_error_starts_with_its_key_and_value(default, values, key, reason):
    cfg = copy.deepcopy(default)
    for name, value in values.items():
        OmegaConf.update(cfg, name, value, merge=False)
    with pytest.raises(ConfigError) as raised:
        validate(cfg)
    message = str(raised.value)
    assert message.startswith(f"{key}=") and reason in message and "\n" not in message, message


def test_the_edges_of_the_ranges_are_valid(default):
    cfg = copy.deepcopy(default)
    for name, value in {"model.dropout": 0.0, "optim.weight_decay": 0.0, "schedule.warmup_epochs": 0.0,
                        "data.max_bad_fraction": 1.0, "data.num_workers": 0, "data.train_clips_per_video": 2,
                        "data.test_num_crops": 1, "trainer.precise_bn_batches": 0, "optim.clip_grad_norm": 5.0,
                        "task": "test", "ckpt": "x3d_xs.ckpt"}.items():
        OmegaConf.update(cfg, name, value, merge=False)
    validate(cfg)
