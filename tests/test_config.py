"""Composition: every group option composes and validates; presets are deltas that the command line overrides."""

from __future__ import annotations

import pytest
import yaml

from tests.cli_helpers import REPO, compose_config
from x3d_exp.config import FACTORS
from x3d_exp.config import validate


def test_every_group_option_composes_and_validates():
    options = {group: sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
               for group in ("model", "data", "optim", "schedule", "launcher")}
    assert {"x2d", "x3d_xs", "x3d_s", "x3d_m", "x3d_l", "x3d_xl"} <= set(options["model"])
    assert {"synthetic", "k400", "k600", "ucf101"} <= set(options["data"])
    default = compose_config()
    assert (default.model.name, default.data.name, default.optim.name, default.schedule.name,
            default.launcher.name, default.task) == ("x3d_xs", "synthetic", "sgd", "cosine_warmup", "local", "train")
    for group, names in options.items():
        for name in names:
            cfg = compose_config(f"{group}={name}")
            validate(cfg)
            assert cfg[group].name == name


def test_kinetics_preset_is_pyslowfasts_recipe_and_yields_to_the_command_line():
    from x3d_exp.engine.build import build_optimizer
    from x3d_exp.models import build_model

    network = build_model("x3d_xs", num_classes=4)
    cfg = compose_config("experiment=pyslowfast_kinetics", "model=x3d_m", "data.root=/data/k400")
    validate(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.launcher.name, cfg.optim.name) == (
        "x3d_m", "k400", "distributed_gpu", "sgd")
    assert cfg.data.batch_size * cfg.launcher.nproc == 128 and cfg.trainer.epochs == 300
    assert (cfg.data.test_num_clips, cfg.data.test_num_crops) == (10, 3)
    _, rates = build_optimizer(cfg, network, steps_per_epoch=10, world_size=cfg.launcher.nproc)
    # 35 warmup epochs from 0.01 to 0.1, then cosine to 0 at epoch 300.
    assert len(rates) == 3000 and rates[0] == pytest.approx(0.01) and rates[350] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(0.1) and rates[-1] < 1e-5
    # Half the GPUs: the lr follows the global batch; and a group chosen on the command line beats the preset's.
    cfg = compose_config("experiment=pyslowfast_kinetics", "launcher.nproc=4", "data=k600", "data.root=/data/k600")
    _, rates = build_optimizer(cfg, network, steps_per_epoch=10, world_size=cfg.launcher.nproc)
    assert cfg.data.name == "k600" and max(rates) == pytest.approx(0.05)


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_group_agrees_with_the_variant_table(path):
    """conf/model/*.yaml and x3d_exp.models.VARIANTS hold the same factors: one set of numbers, checked here."""
    from x3d_exp.models import VARIANTS, X3DSpec

    group = yaml.safe_load(path.read_text())
    spec = X3DSpec(**VARIANTS[group["name"]])
    assert {f: float(group[f]) for f in FACTORS} == {f: float(getattr(spec, f)) for f in FACTORS}
    for key, value in group.items():
        if key not in (*FACTORS, "name", "dropout", "cpu_kernels") and value is not None:
            assert getattr(spec, key) == value, f"{path.name}: {key}={value} but VARIANTS has {getattr(spec, key)}"


def test_every_task_has_its_function():
    from x3d_exp.config import TASKS
    from x3d_exp.tasks import task_function

    assert all(callable(task_function(name)) for name in TASKS)


def test_task_sections_are_typed_and_their_defaults_live_in_the_schema_only(cfg_tiny):
    from dataclasses import asdict

    from x3d_exp.config import ConvertConfig, ExportConfig, InferConfig, PrepareConfig, TrainerConfig

    for section, schema in (("convert", ConvertConfig), ("infer", InferConfig), ("export", ExportConfig),
                            ("prepare", PrepareConfig)):
        assert dict(cfg_tiny[section]) == asdict(schema()), section
    assert (cfg_tiny.prepare.short_side, cfg_tiny.export.format, cfg_tiny.infer.output) == (320, "MINDIR", "auto")
    # The tiny settings set trainer.log_every; the rest is the schema's.
    assert {k: v for k, v in cfg_tiny.trainer.items() if k != "log_every"} == \
        {k: v for k, v in asdict(TrainerConfig()).items() if k != "log_every"}
    # conf/config.yaml composes the groups and sets no key of its own, so no default is written twice.
    assert set(yaml.safe_load((REPO / "conf" / "config.yaml").read_text())) == {"defaults", "hydra"}


@pytest.mark.parametrize("override, key", [("prepare.short_side=abc", "prepare.short_side"),
                                           ("export.verify=maybe", "export.verify"),
                                           ("convert.format=[a]", "convert.format"),
                                           ("prepare.shortside=1", "prepare.shortside")])
def test_a_bad_task_option_fails_with_one_line_naming_its_key(override, key, capsys):
    from x3d_exp.cli import check_overrides

    with pytest.raises(SystemExit) as exit_:
        check_overrides(str(REPO / "conf"), "config", [override])
    message = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message.startswith(f"error: {key}") and "\n" not in message


def test_task_names_come_from_one_table():
    from x3d_exp.config import TASKS
    from x3d_exp.errors import ConfigError

    cfg = compose_config()
    cfg.task = "fit"
    with pytest.raises(ConfigError, match=f"task='fit': must be one of {', '.join(TASKS)}"):
        validate(cfg)
    # A single path is accepted for infer.inputs as well as a list.
    assert compose_config("infer.inputs=a.mp4").infer.inputs == "a.mp4"
