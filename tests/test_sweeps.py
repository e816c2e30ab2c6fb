"""Hydra multiruns through the real CLI and a real sqlite store: one MLflow parent per multirun, a child per job."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from tests.cli_helpers import artifact_paths, compose_config, metric_steps, multirun, store_uri
from x3d_exp.config import FACTORS
from x3d_exp.models import VARIANTS, X3DSpec


# X3D-XS's factors as the model defines them, in the sweep's axis order.
XS = {k: float(getattr(X3DSpec(**VARIANTS["x3d_xs"]), k)) for k in FACTORS}


def parent_and_children(work):
    client = MlflowClient(store_uri(work))
    experiment = client.get_experiment_by_name("x3d-exp")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], sorted(children, key=lambda r: int(r.data.tags["sweep.job"]))


def summary(work, parent):
    assert {"sweep_summary.csv", "top1_vs_gmacs.png"} <= set(artifact_paths(store_uri(work), parent.info.run_id))
    png = (work / "sweep" / "top1_vs_gmacs.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    return pd.read_csv(work / "sweep" / "sweep_summary.csv", keep_default_na=False)


def test_expansion_sweep_is_one_parent_with_four_finished_children(expansion):
    work, done = expansion
    parent, children = parent_and_children(work)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "expand_one_axis"
    assert [c.info.status for c in children] == ["FINISHED"] * 4
    # The parent exists before any job starts.
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.data.metrics["sweep/jobs"] == 4 and parent.data.metrics["sweep/failed"] == 0
    assert "sweep expand_one_axis: 4 of 4 jobs finished" in done.stdout
    # Named briefly; the whole command line is a tag.
    assert parent.info.run_name == "expand_one_axis (4 jobs)"
    assert parent.data.tags["command"].startswith("python run.py -m ") and "+sweep=expand_one_axis" in \
        parent.data.tags["command"]
    # Nulls are not params: what a run holds was set (or derived, like the clip).
    assert "None" not in parent.data.params.values() and "None" not in children[0].data.params.values()
    assert children[0].data.params["clip"] == "3x4x64x64"


# The expansion fixture's jobs: what each changes from X3D-XS at depth factor 1 (tests.cli_helpers.SHALLOW).
EXPANDED = [{}, {"gamma_t": 8.0}, {"gamma_t": 8.0, "gamma_tau": 6.0}, {"gamma_s": 2 * XS["gamma_s"]}]


def test_each_child_records_its_factors(expansion):
    work, _ = expansion
    _, children = parent_and_children(work)
    base = {**XS, "gamma_d": 1.0}
    for child, changes in zip(children, EXPANDED):
        factors = {k: float(child.data.params[f"model.{k}"]) for k in XS}
        assert factors == pytest.approx({**base, **changes}), child.info.run_name
        assert float(child.data.params["model_gmacs"]) > 0 and "test/top1" in child.data.metrics
        # Every metric of the job reached the store: one train/loss per step (16 videos in batches of 4).
        assert metric_steps(store_uri(work), child.info.run_id, "train/loss") == [1, 2, 3, 4]


def test_the_clip_follows_each_jobs_model_and_gmacs_are_counted_at_it(expansion):
    """On the default data (spatial scale 0.4): XS trains 4 frames 12 apart at 64 px; gamma_t doubles the frames,
    the frame-rate step doubles them at half the stride, gamma_s (x2) doubles the crop (crop 320 x 0.4)."""
    work, _ = expansion
    _, children = parent_and_children(work)
    clips = [(c.data.params["clip"], int(c.data.params["clip_sampling_rate"])) for c in children]
    assert clips == [("3x4x64x64", 12), ("3x8x64x64", 12), ("3x8x64x64", 6), ("3x4x128x128", 12)]
    gmacs = [float(c.data.params["model_gmacs"]) for c in children]
    nominal = [float(c.data.params["model_gmacs_nominal"]) for c in children]
    # GMACs scale with the clip: twice the frames about twice the cost, twice the side about four times.
    assert gmacs[1] == pytest.approx(2 * gmacs[0], rel=0.1) and gmacs[2] == pytest.approx(gmacs[1], rel=1e-3)
    assert gmacs[3] == pytest.approx(4 * gmacs[0], rel=0.15)
    # At the model's own input (160 px) the cost is higher, by about (160/64)^2.
    assert all(n == pytest.approx(g * (160 / 64) ** 2, rel=0.15) for g, n in zip(gmacs[:3], nominal[:3]))


def test_summary_table_and_plot_are_parent_artifacts(expansion):
    work, _ = expansion
    parent, children = parent_and_children(work)
    table = summary(work, parent)
    assert list(table.job) == [0, 1, 2, 3] and set(table.status) == {"FINISHED"}
    assert list(table.changed) == ["(base)", "gamma_t=8.0", "gamma_t=8.0 gamma_tau=6.0",
                                   f"gamma_s={2 * XS['gamma_s']}"]
    assert list(table.run_id) == [c.info.run_id for c in children]
    # Each child is named after what it changes (numbers to 4 significant digits), so the MLflow run list reads as
    # the sweep.
    from x3d_exp.tracking.sweeps import _short_numbers

    names = [f"{job}: {_short_numbers(changed)}" for job, changed in zip(table.job, table.changed)]
    assert names[3] == f"3: gamma_s={2 * XS['gamma_s']:.4g}"
    assert [c.info.run_name for c in children] == names
    base, longer, _, larger = table.itertuples()
    assert list(table["clip"]) == ["3x4x64x64", "3x8x64x64", "3x8x64x64", "3x4x128x128"]
    assert longer.gmacs > base.gmacs and larger.gmacs > base.gmacs and larger.params == base.params
    assert all(0 <= t <= 1 for t in table.test_top1) and all(0 <= v <= 1 for v in table.val_top1)


def test_a_failing_job_is_recorded_and_the_others_still_run(tmp_path, cache):
    # The impossible factor comes first: the job after it must still run.
    done = multirun(tmp_path, cache, "model.gamma_d=-1,1", shallow=False)
    assert done.returncode == 1
    assert "error: sweep job 0 (gamma_d=-1.0) failed: ConfigError: model.gamma_d=-1.0: must be > 0" in done.stderr
    parent, (bad, good) = parent_and_children(tmp_path)
    assert bad.info.status == "FAILED" and "must be > 0" in bad.data.tags["error"]
    assert bad.data.params["model.gamma_d"] == "-1.0"
    assert good.info.status == "FINISHED" and "test/top1" in good.data.metrics
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/failed"] == 1
    table = summary(tmp_path, parent)
    assert list(table.status) == ["FAILED", "FINISHED"]
    assert table.error[0] == "ConfigError: model.gamma_d=-1.0: must be > 0" and table.error[1] == ""
    assert table.test_top1[0] == "" and 0 <= float(table.test_top1[1]) <= 1


def test_parallel_joblib_sweep_records_every_job(tmp_path, cache):
    done = multirun(tmp_path, cache, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2")
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED"] * 2
    first, second = children
    assert first.info.start_time < second.info.end_time and second.info.start_time < first.info.end_time, \
        "the two jobs did not run at the same time"
    for child in children:
        assert metric_steps(store_uri(tmp_path), child.info.run_id, "train/loss") == [1, 2, 3, 4]
        assert not math.isnan(child.data.metrics["test/top1"])
    assert list(summary(tmp_path, parent).changed) == ["seed=1", "seed=2"]


def _compose(*overrides):
    return compose_config(*overrides, return_hydra_config=True)


def test_every_expansion_step_doubles_one_axis_of_x3d_xs():
    from x3d_exp.search.progressive import expand

    params = _compose("+sweep=expand_one_axis").hydra.sweeper.params
    steps = params["+expand"].split(",")
    assert steps == ["base", *XS]
    for step in steps:
        model = _compose("+sweep=expand_one_axis", f"+expand={step}").model
        # expand(): gamma_tau's doubling is the frame rate's (twice the frames at half the stride).
        expected = XS if step == "base" else expand(XS, step, 2.0)
        assert {k: model[k] for k in XS} == pytest.approx(expected), step


def test_grid_variant_and_seed_sweeps_compose():
    grid = _compose("+sweep=width_depth_grid").hydra.sweeper.params
    assert grid["model.gamma_w"] == "1.0,1.5,2.0" and grid["model.gamma_d"] == "2.2,3.3,4.4"
    variants = _compose("+sweep=published_variants").hydra.sweeper.params
    assert variants["model"] == "x3d_xs,x3d_s,x3d_m,x3d_l"
    assert _compose("+sweep=seeds").hydra.sweeper.params["seed"] == "0,1,2,3,4,5"


def test_slurm_launcher_config_composes():
    # The [slurm] extra is part of the test install: the launcher plugin must be importable, not skipped.
    import hydra_plugins.hydra_submitit_launcher  # noqa: F401

    launcher = _compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.nodes == 1


def test_optuna_search_is_one_parent_with_a_child_per_trial_and_the_best_on_the_parent(tmp_path, cache):
    # The sweep's own search space and sampler; only the trial count is cut.
    done = multirun(tmp_path, cache, "+sweep=hparams_optuna", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "hparams_optuna"
    assert [c.info.status for c in children] == ["FINISHED"] * 2
    # Each trial drew its own lr, weight decay and warmup from the search space.
    drawn = [(float(c.data.params["optim.lr"]), float(c.data.params["optim.weight_decay"]),
              float(c.data.params["schedule.warmup_epochs"])) for c in children]
    assert len(set(drawn)) == 2
    assert all(0.005 <= lr <= 0.2 and 1e-6 <= wd <= 1e-3 and warmup in (0, 1, 2, 3) for lr, wd, warmup in drawn)
    # Names round the drawn numbers to 4 significant digits; the params keep them whole.
    for child in children:
        assert f"optim.lr={float(child.data.params['optim.lr']):.4g}" in child.info.run_name, child.info.run_name
    # The objective the sweeper got is each job's best val top-1, and the parent names the best trial.
    client = MlflowClient(store_uri(tmp_path))
    best_val = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "val/top1"))
                for c in children}
    winner = parent.data.tags["sweep.best_run_id"]
    assert best_val[winner] == max(best_val.values()) == pytest.approx(parent.data.metrics["sweep/best_val_top1"])
    optuna_result = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert optuna_result.best_value == pytest.approx(max(best_val.values()))


def test_run_names_round_long_numbers_to_four_significant_digits():
    from x3d_exp.tracking.sweeps import _short_numbers

    assert _short_numbers("optim.lr=0.04064540627628723 optim.weight_decay=3.4795893749284416e-05 seed=123456 "
                          "gamma_s=2.8284271247461903 gamma_t=8.0") == \
        "optim.lr=0.04065 optim.weight_decay=3.48e-05 seed=123456 gamma_s=2.828 gamma_t=8.0"
