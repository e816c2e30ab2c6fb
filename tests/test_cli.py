"""The command line as users meet it: one-line errors for bad overrides and devices, and the debug preset end to end."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.cli_helpers import REPO, final_json, run_cli, runs_of, store_uri
from x3d_exp.cli import check_overrides
from x3d_exp.config import register_configs


# Caught when run.py composes the config before Hydra starts (x3d_exp.cli.check_overrides): tested in process.
@pytest.mark.parametrize("overrides, named", [
    (["model=x3d_q"], "model=x3d_q"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["model.gamma_d=abc"], "model.gamma_d"),
    (["model.gamma_d=-1"], "model.gamma_d"),
    (["model.no_such_key=1"], "model.no_such_key"),
    (["optim.clip_grad_norm=0"], "optim.clip_grad_norm"),
])
def test_a_bad_override_is_one_error_line_and_exit_status_2(overrides, named, capsys):
    register_configs()  # as run.py does on import
    with pytest.raises(SystemExit) as exited:
        check_overrides(str(REPO / "conf"), "config", overrides)
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], errors
    if overrides[0] == "model=x3d_q":
        assert "x3d_xs" in errors[0]  # the valid options are listed


# Through the real CLI: one error caught before Hydra starts, and the ones found while the job runs.
@pytest.mark.parametrize("overrides, named", [
    (["model=x3d_q"], "model=x3d_q"),
    (["data=k400"], "data.root"),
    (["data=k400", "data.root=/no/such/k400"], "/no/such/k400"),
])
def test_bad_overrides_exit_non_zero_with_one_line(overrides, named, cache, tmp_path):
    done = run_cli(overrides + [f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_smoke_preset_runs_one_tiny_epoch_in_its_own_data_folder(cache, tmp_path):
    done = run_cli(["debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    result = final_json(done.stdout)
    assert result["epochs"] == 1 and result["test_videos"] == 8
    (run,) = runs_of(store_uri(tmp_path))
    assert run.info.status == "FINISHED" and run.data.params["data.crop_size"] == "32"
    assert run.data.params["data.root"] == str(cache / "synthetic_smoke")
    # The set generated for the run's clip, in its own folder under the preset's data.root.
    assert len(list((cache / "synthetic_smoke").glob("*px-*/synthetic.json"))) == 1


@pytest.mark.parametrize("overrides, fix", [
    (["launcher=distributed_gpu"], "launcher=distributed_cpu"),
    (["device=GPU"], "device=CPU"),
])
def test_a_gpu_that_is_not_there_is_one_line_with_the_fix_before_anything_starts(overrides, fix, cache, tmp_path):
    # No GPU visible even on a machine that has one, so the check is the same everywhere.
    env = {"CUDA_VISIBLE_DEVICES": ""}
    done = run_cli(overrides + [f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and overrides[0] in errors[0] and fix in errors[0], done.stderr[-2000:]
    # Stopped before msrun or MindSpore's device set-up: no rank started, no traceback, no MLflow run.
    assert "Traceback" not in done.stderr and "Unsupported device target" not in done.stderr
    assert not (tmp_path / "run" / "msrun_logs").exists()
    client = MlflowClient(store_uri(tmp_path))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
