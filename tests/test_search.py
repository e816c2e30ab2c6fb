"""X3D's progressive expansion search (x3d_exp.search.progressive, hydra_plugins.x3d_exp_search): the algorithm on its
own, and whole searches through the real CLI, Hydra's joblib and submitit_local launchers and a real sqlite store."""

from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.cli_helpers import (REPO, TINY_DATA, artifact_paths, cli_env, compose_config, final_json, run_cli,
                               store_uri)
from x3d_exp.config import FACTORS
from x3d_exp.search.progressive import (AXIS_STEPS, Candidate, ProgressiveSearch, SearchFailed, SearchSettings, choose,
                                     contract, expand, factor_key, trained_gmacs)

X2D = {name: 1.0 for name in FACTORS}


def test_each_axis_step_is_the_papers():
    assert expand(X2D, "gamma_t", 2.0) == {**X2D, "gamma_t": 2.0}
    # Frame rate x2 at the same duration: twice the frames, half the stride.
    xs = {**X2D, "gamma_t": 4.0, "gamma_tau": 12.0}
    assert expand(xs, "gamma_tau", 2.0) == {**xs, "gamma_t": 8.0, "gamma_tau": 6.0}
    assert AXIS_STEPS == pytest.approx({"gamma_t": 2.0, "gamma_tau": 2.0, "gamma_s": 2 ** 0.5, "gamma_w": 2.0,
                                        "gamma_b": 2.25, "gamma_d": 2.2})
    sweep = compose_config("+sweep=progressive").sweep
    assert list(sweep.axes) == list(FACTORS) and dict(sweep.axis_steps) == pytest.approx(AXIS_STEPS)
    assert compose_config("+sweep=progressive").model.name == "x2d"
    # sweep.resume names the sweep dir; without it, a new dated one.
    assert compose_config("+sweep=progressive", "sweep.resume=/data/s", return_hydra_config=True).hydra.sweep.dir \
        == "/data/s"
    assert compose_config("+sweep=progressive", return_hydra_config=True).hydra.sweep.dir.startswith(
        "multirun/progressive/20")


def test_one_step_from_x2d_costs_what_the_paper_says_per_axis():
    """GMACs at the default data's training clip, counted as the jobs count them: each step about doubles the cost,
    except width, whose x2 quadruples the 1x1x1 convolutions (3.4x in all)."""
    config = compose_config("+sweep=progressive")
    start = trained_gmacs(config, X2D)
    ratios = {axis: trained_gmacs(config, expand(X2D, axis, AXIS_STEPS[axis])) / start for axis in FACTORS}
    assert all(1.5 <= ratios[axis] <= 3.0 for axis in FACTORS if axis != "gamma_w"), ratios
    assert 3.0 < ratios["gamma_w"] < 3.6, ratios


def test_the_cost_of_a_folder_dataset_counts_the_head_its_jobs_build(tmp_path):
    """data=folder sizes the head from its class folders (num_classes null); the search's cost must too."""
    from tests.data_helpers.layouts import class_folders

    class_folders(tmp_path / "videos", {"cat": 3, "dog": 3})
    config = compose_config("+sweep=progressive", "data=folder", f"data.root={tmp_path / 'videos'}")
    assert config.data.num_classes is None
    derived = trained_gmacs(config, X2D)
    config.data.num_classes = 2
    assert derived == trained_gmacs(config, X2D)
    config.data.num_classes = 400
    assert trained_gmacs(config, X2D) > derived


def _candidate(axis, val, gmacs, step=1):
    return Candidate(step, axis, X2D, "FINISHED", val, val, gmacs)


def test_the_rule_picks_gain_per_gmac_or_accuracy_and_ties_go_to_the_cheaper():
    base = _candidate("start", 0.5, 1.0, step=0)
    cheap, dear = _candidate("gamma_s", 0.6, 1.5), _candidate("gamma_w", 0.7, 4.0)
    assert choose(base, [dear, cheap], "gain_per_gmac") is cheap  # 0.2 per GMAC against 0.067
    assert choose(base, [cheap, dear], "accuracy") is dear
    tied = [_candidate("gamma_w", 1.0, 3.0), _candidate("gamma_t", 1.0, 2.0), _candidate("gamma_b", 1.0, 2.5)]
    assert choose(_candidate("start", 1.0, 1.0), tied, "gain_per_gmac").axis == "gamma_t"
    assert choose(_candidate("start", 1.0, 1.0), tied, "accuracy").axis == "gamma_t"


def test_contraction_lands_just_under_the_target():
    config = compose_config("+sweep=progressive")
    previous = _candidate("start", 0.5, trained_gmacs(config, X2D), step=0)
    grown = expand(X2D, "gamma_w", 2.0)
    chosen = Candidate(1, "gamma_w", grown, "FINISHED", 0.6, 0.6, trained_gmacs(config, grown))
    target = (previous.gmacs + chosen.gmacs) / 2
    factors = contract(previous, chosen, target, 2.0, lambda f: trained_gmacs(config, f))
    assert 1.0 < factors["gamma_w"] < 2.0 and {k: v for k, v in factors.items() if k != "gamma_w"} == \
        {k: v for k, v in X2D.items() if k != "gamma_w"}
    assert 0.9 * target < trained_gmacs(config, factors) <= target


def _search(outcomes, **settings):
    """A search whose `launch` fills in given outcomes by axis (the loop's decisions, without training)."""
    launched = []

    def launch(batch):
        for candidate in batch:
            launched.append(candidate.axis)
            val, gmacs = outcomes[candidate.axis]
            if val is None:
                candidate.status, candidate.error = "FAILED", "ConfigError: impossible"
            else:
                candidate.status, candidate.val_top1, candidate.gmacs = "FINISHED", val, gmacs

    search = ProgressiveSearch(SearchSettings(**settings), X2D, launch, cost=lambda f: 0.0)
    return search, launched


def test_a_failed_candidate_is_skipped_and_a_failed_step_stops_the_search():
    search, launched = _search({"start": (0.3, 1.0), "gamma_t": (0.6, 2.0), "gamma_w": (None, None)},
                               steps=2, axes=("gamma_t", "gamma_w"))
    found = search.run()
    assert launched == ["start", "gamma_t", "gamma_w", "gamma_t", "gamma_w"]
    assert found.axis == "gamma_t" and found.step == 2 and [c.axis for c in search.path] == ["start"] + ["gamma_t"] * 2
    table = search.table()
    assert list(table.status) == ["FINISHED", "FINISHED", "FAILED", "FINISHED", "FAILED"]

    search, _ = _search({"start": (0.3, 1.0), "gamma_w": (None, None)}, steps=2, axes=("gamma_w",))
    with pytest.raises(SearchFailed, match="step 1: all 1 candidates failed"):
        search.run()


def test_the_loop_goes_on_from_the_axis_the_rule_chooses():
    """Step 1: gamma_s gains most per GMAC, gamma_w most in all; step 2 grows from the one the rule chose."""
    outcomes = {"start": (0.3, 1.0), "gamma_s": (0.5, 1.5), "gamma_w": (0.6, 3.0)}
    for rule, axis in (("gain_per_gmac", "gamma_s"), ("accuracy", "gamma_w")):
        search, _ = _search(outcomes, steps=1, axes=("gamma_s", "gamma_w"), rule=rule)
        assert search.run().axis == axis
        assert [c.chosen for c in search.candidates] == [True, axis == "gamma_s", axis == "gamma_w"]


def _costed_search(target, trained=None, steps=3):
    """A search whose cost is the width factor in GMACs, each candidate 'training' to that cost; `trained` gives
    the status of the contracted candidate."""
    launched = []

    def launch(batch):
        for candidate in batch:
            launched.append(candidate)
            failed = candidate.axis.startswith("contract") and trained == "FAILED"
            candidate.status = "FAILED" if failed else "FINISHED"
            candidate.val_top1, candidate.gmacs = 0.5, candidate.factors["gamma_w"]

    search = ProgressiveSearch(SearchSettings(steps=steps, target_gmacs=target, axes=("gamma_w",)), X2D, launch,
                               cost=lambda factors: factors["gamma_w"])
    return search, launched


def test_the_search_stops_at_the_target_and_contracts_an_overshoot():
    search, launched = _costed_search(target=3.0)
    found = search.run()
    # 1 -> 2 -> 4 overshoots 3: the last step is contracted to the widest model that costs at most 3.
    assert [c.axis for c in launched] == ["start", "gamma_w", "gamma_w", "contract gamma_w"]
    assert found.axis == "contract gamma_w" and 2.9 < found.factors["gamma_w"] <= 3.0
    assert [c.axis for c in search.path][-1] == "contract gamma_w"
    # Exactly on target: no step past it, nothing to contract.
    search, launched = _costed_search(target=2.0)
    assert search.run().factors["gamma_w"] == 2.0 and len(launched) == 2


def test_a_failed_contraction_keeps_the_expanded_model():
    search, launched = _costed_search(target=3.0, trained="FAILED")
    found = search.run()
    assert launched[-1].axis == "contract gamma_w" and launched[-1].status == "FAILED"
    assert found.axis == "gamma_w" and found.factors["gamma_w"] == 4.0


def test_finished_candidates_are_reused_not_trained_again():
    outcomes = {"start": (0.3, 1.0), "gamma_t": (0.6, 2.0), "gamma_s": (0.5, 1.5)}
    first, _ = _search(outcomes, steps=2, axes=("gamma_t", "gamma_s"))
    first.run()
    done = {c.key: c for c in first.candidates if c.step < 2}
    second, launched = _search(outcomes, steps=2, axes=("gamma_t", "gamma_s"))
    second.done = dict(done)
    second.run()
    assert launched == ["gamma_t", "gamma_s"]  # only step 2's
    assert [factor_key(c.factors) for c in second.path] == [factor_key(c.factors) for c in first.path]


def test_settings_left_out_keep_the_defaults():
    assert SearchSettings.from_config({}) == SearchSettings()
    settings = SearchSettings.from_config({"steps": "5", "axes": [], "axis_steps": {"gamma_w": 1.5}, "name": "x"})
    assert (settings.steps, settings.axes, settings.rule) == (5, tuple(FACTORS), "gain_per_gmac")
    assert settings.axis_steps == {**AXIS_STEPS, "gamma_w": 1.5}


def test_bad_search_settings_fail_naming_the_key():
    with pytest.raises(Exception, match="sweep.rule='fastest'"):
        SearchSettings.from_config({"rule": "fastest"})
    with pytest.raises(Exception, match="unknown factor.*gamma_x"):
        SearchSettings.from_config({"axes": ["gamma_x"]})
    with pytest.raises(Exception, match="sweep.steps=0"):
        SearchSettings.from_config({"steps": 0})
    with pytest.raises(Exception, match="sweep.target_gmacs=0"):
        SearchSettings.from_config({"target_gmacs": 0})


@pytest.mark.slow
def test_the_sweeper_is_a_discoverable_hydra_plugin():
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "--info", "plugins"], capture_output=True, text=True,
                          timeout=300, cwd=REPO.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    # Hydra's listing: "Sweeper:", a rule, then one indented class name per line.
    assert re.search(r"Sweeper:\s*\n\s*-+\n(\s+\w+\n)*?\s+ProgressiveSweeper\n", done.stdout), done.stdout[-3000:]


# The search of the CLI tests: from X2D over four axes, two steps; width's step is impossible (factor 0, which
# every job refuses), so its candidate fails in each step and the search goes on without it.
SEARCH = ["+sweep=progressive", "sweep.steps=2", "sweep.axes=[gamma_t,gamma_s,gamma_w,gamma_b]",
          "sweep.axis_steps.gamma_w=0", "trainer.epochs=1"]


def _children(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("x3d-exp").experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


# Session scope: under pytest-xdist a worker may run other files' tests between this file's, which would end a
# module-scoped fixture and run the whole search again.
@pytest.fixture(scope="session")
def resumed_search(tmp_path_factory, cache):
    """A 2-step search with 2 joblib workers in the sweep dir the config gives it (multirun/progressive/<date>),
    killed (the whole process group) once a step-2 candidate has finished, then resumed with sweep.resume=<its
    dir>. Returns the work dir, the runs at the kill, the resumed process and the sweep dir."""
    work = tmp_path_factory.mktemp("search")
    uri = store_uri(work)
    args = [sys.executable, str(REPO / "run.py"), "-m", *TINY_DATA, *SEARCH, "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", f"mlflow.tracking_uri={uri}"]
    first = subprocess.Popen(args, cwd=work, env=cli_env(cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 900
    killed_at = sweep_dir = None
    while first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        # Only once the search has its parent run: the store is migrated by then (two migrations at once fail).
        started = list(work.glob("multirun/progressive/*/mlflow_parent_run_id"))
        if not started:
            continue
        sweep_dir = started[0].parent
        _, children = _children(uri)
        if any(c.data.tags.get("sweep.step") == "2" and c.info.status == "FINISHED" for c in children):
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            killed_at = _children(uri)
            break
    assert killed_at is not None, f"never caught step 2 running (exit {first.returncode}): " \
                                  f"{first.stderr.read().decode()[-3000:]}"
    resumed = run_cli(["-m", *TINY_DATA, *SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       f"sweep.resume={sweep_dir}", f"mlflow.tracking_uri={uri}"], cwd=work, cache=cache,
                      timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return work, killed_at, resumed, sweep_dir


def test_the_resumed_search_trains_only_the_missing_candidates(resumed_search):
    work, (parents_before, before), resumed, _ = resumed_search
    parents, children = _children(store_uri(work))
    # One parent: the resumed search continued it.
    assert [p.info.run_id for p in parents] == [p.info.run_id for p in parents_before]
    finished_before = {c.info.run_id for c in before if c.info.status == "FINISHED"}
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished_before <= {c.info.run_id for c in finished}
    # Each point of the search trained once: start + 3 trainable axes x 2 steps.
    keys = [" ".join(c.data.params[f"model.{f}"] for f in FACTORS) for c in finished]
    assert len(keys) == len(set(keys)) == 7
    trained_after = len(finished) - len(finished_before)
    assert trained_after >= 1
    assert f"({trained_after} trained here, 2 failed)" in resumed.stdout
    # The killed jobs' runs were removed from the parent; nothing is left RUNNING.
    assert all(c.info.status in ("FINISHED", "FAILED") for c in children)
    assert parents[0].info.status == "FINISHED"


def test_the_search_records_its_path_and_a_failed_axis(resumed_search):
    work, _, resumed, sweep_dir = resumed_search
    path = pd.read_csv(sweep_dir / "expansion_path.csv")
    assert list(path.columns[:5]) == ["step", "axis", "chosen", "status", "reused"]
    assert {*FACTORS, "gmacs", "params", "val_top1", "test_top1", "run_id"} <= set(path.columns)
    assert list(path.step) == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert list(path.axis) == ["start"] + ["gamma_t", "gamma_s", "gamma_w", "gamma_b"] * 2
    width = path[path.axis == "gamma_w"]
    assert set(width.status) == {"FAILED"} and width.error.str.contains("must be > 0").all()
    assert (path[path.axis != "gamma_w"].status == "FINISHED").all()
    # One chosen model per step, each the one the rule picks from its step, the next step grown from it.
    chosen = path[path.chosen]
    assert list(chosen.step) == [0, 1, 2]
    for step in (1, 2):
        base = chosen[chosen.step == step - 1].iloc[0]
        rows = path[(path.step == step) & (path.status == "FINISHED")]
        gain = (rows.val_top1 - base.val_top1) / (rows.gmacs - base.gmacs)
        best = rows.loc[(gain == gain.max())].sort_values("gmacs").iloc[0]
        assert chosen[chosen.step == step].iloc[0].axis == best.axis
        assert (rows.gmacs > base.gmacs).all()
    # The parent carries the path, its plot and the found model; the sweep's last line says what was found.
    parents, children = _children(store_uri(work))
    assert {"expansion_path.csv", "expansion_path.png", "found_model.yaml"} <= \
        set(artifact_paths(store_uri(work), parents[0].info.run_id))
    assert (sweep_dir / "expansion_path.png").read_bytes().startswith(b"\x89PNG")
    last = [line for line in resumed.stdout.splitlines() if line.strip()][-1]
    assert re.match(r"sweep progressive: 2 steps, 9 candidates \(\d trained here, 2 failed\), found gamma_t=\S+ .* at "
                    r"[0-9.]+ GMACs", last), last
    # Each candidate's run: its step and axis as tags, each factor a param, val and test top-1.
    for child in children:
        if child.info.status == "FINISHED":
            assert child.data.tags["sweep.step"] in ("0", "1", "2") and child.data.tags["sweep.axis"]
            assert "val/top1" in child.data.metrics and "test/top1" in child.data.metrics
            assert all(f"model.{f}" in child.data.params for f in FACTORS)


def _process_with_open_file_under(folder: Path) -> Optional[int]:
    """The pid of a process holding a file under `folder` open (a Hydra job keeps its log file open)."""
    prefix = f"{folder}{os.sep}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                    return int(proc.name)
            except OSError:  # the process ended, or is not ours to read
                continue
    return None


@pytest.mark.slow
def test_a_job_the_launcher_loses_fails_alone_and_the_batch_keeps_its_finished_jobs(tmp_path, cache):
    """submitit's launch() raises once any job of a batch died outside its task (SIGKILL here, as the OOM killer or a
    lost node would), and its other jobs' return values are lost with it. The search takes the finished ones from
    their MLflow runs, fails only the lost one, and goes on."""
    uri = store_uri(tmp_path)
    args = [sys.executable, str(REPO / "run.py"), "-m", *TINY_DATA, "+sweep=progressive", "sweep.steps=1",
            "sweep.axes=[gamma_t,gamma_s]", "trainer.epochs=1", "hydra/launcher=submitit_local",
            f"mlflow.tracking_uri={uri}"]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        search = subprocess.Popen(args, cwd=tmp_path, env=cli_env(cache), stdout=stdout, stderr=stderr)
        killed, deadline = None, time.time() + 600
        # Job 2 is gamma_s, the last of step 1's batch: submitit's launch() waits for job 1, then raises for it.
        while killed is None and search.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            # Killed once Hydra has saved the job's overrides (it opens the job's log file a moment before), as
            # the OOM killer would kill a job that had started.
            for job_dir in tmp_path.glob("multirun/progressive/*/2"):
                if not (job_dir / ".hydra" / "overrides.yaml").is_file():
                    continue
                killed = _process_with_open_file_under(job_dir)
                if killed:
                    os.kill(killed, signal.SIGKILL)
        search.wait(timeout=600)
    out, err = out.read_text(), err.read_text()
    assert killed, f"job 2 never ran (exit {search.returncode}): {err[-3000:]}"
    assert search.returncode == 0, err[-3000:]
    assert re.search(r"the launcher lost jobs 1-2: Job \d+ \(task: 0\)", out + err), (out + err)[-3000:]
    assert re.search(r"1 steps, 3 candidates \(2 trained here, 1 failed\), found gamma_t=2 ", out), out[-2000:]
    (sweep_dir,) = tmp_path.glob("multirun/progressive/*")
    path = pd.read_csv(sweep_dir / "expansion_path.csv").set_index("axis")
    assert list(path.status) == ["FINISHED", "FINISHED", "FAILED"] and bool(path.chosen["gamma_t"])
    assert path.error["gamma_s"].startswith("the launcher lost the batch: UncompletedJobError")
    _, children = _children(uri)
    assert {c.data.tags["sweep.axis"]: c.info.status for c in children if c.info.status == "FINISHED"} == \
        {"start": "FINISHED", "gamma_t": "FINISHED"}
    assert all(c.info.status != "RUNNING" for c in children)
    # The sweep's own account counts the job that died before it opened a run.
    assert "2 of 3 jobs finished" in out
    summary = pd.read_csv(sweep_dir / "sweep_summary.csv").set_index("job")
    assert summary.status.to_dict() == {0: "FINISHED", 1: "FINISHED", 2: "FAILED"}
    assert summary.error[2].startswith("the job ended before it opened its MLflow run")
    assert "model.gamma_s=1.4142136" in summary.overrides[2]


def test_the_found_model_trains_with_model_equals(resumed_search, cache):
    work, _, _, sweep_dir = resumed_search
    path = pd.read_csv(sweep_dir / "expansion_path.csv")
    found = path[path.chosen].iloc[-1]
    (work / "found").mkdir()
    done = run_cli(["--config-dir", str(sweep_dir), "model=found_model", *TINY_DATA, "trainer.epochs=1",
                    f"hydra.run.dir={work / 'found' / 'run'}", f"mlflow.tracking_uri={store_uri(work / 'found')}"],
                   cwd=work, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    result = final_json(done.stdout)
    assert "x".join(str(d) for d in result["clip"]) == found["clip"] and result["gmacs"] == pytest.approx(found.gmacs)


def fresh_venv_over_this_interpreter(venv: Path) -> str:
    """A new virtual environment that sees this interpreter's packages (hydra, omegaconf, ...) after its own; returns
    its python. Not `venv --system-site-packages`: run from inside a venv, that exposes the base interpreter's
    packages, not this venv's. A .pth file of plain paths puts this interpreter's site-packages on the new one's
    path without running their .pth files, so this checkout's own (editable) install stays out of sight."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(own) / "outer_site_packages.pth").write_text("".join(f"{path}\n" for path in outer if Path(path).is_dir()))
    return python


@pytest.mark.slow
def test_a_wheel_install_puts_the_sweeper_where_hydra_finds_it(tmp_path):
    """A normal (non-editable) install: the wheel, installed into a fresh virtual environment."""
    wheel_dir, venv = tmp_path / "wheel", tmp_path / "venv"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheel_dir.glob("x3d_exp-*.whl")
    python = fresh_venv_over_this_interpreter(venv)
    # --ignore-installed: this interpreter's own install of x3d-exp is visible (the same version) and stays untouched.
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = ("import hydra_plugins.x3d_exp_search as m; from hydra.core.plugins import Plugins; "
             "from hydra.plugins.sweeper import Sweeper; print(m.__file__); "
             "print(' '.join(p.__name__ for p in Plugins.instance().discover(Sweeper)))")
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-3000:]
    where, sweepers = found.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(venv)) and where.endswith("hydra_plugins/x3d_exp_search/__init__.py"), where
    assert "ProgressiveSweeper" in sweepers.split()
