"""Shared test set-up: run.py's process hygiene before MindSpore loads, and the fixtures several files use."""

import subprocess
import sys
from pathlib import Path

import pytest

from x3d_exp.env import prepare_process

prepare_process()

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.cli_helpers import (SHALLOW, TINY, compose_config, final_json, mlflow_server,  # noqa: E402
                               multirun, run_cli, store_uri)


# The registered model of the `trained` run.
REGISTERED_MODEL = "x3d-tiny"


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data and kernel cache for the session's CLI runs, so the synthetic set is rendered once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def cfg_tiny():
    """The default config with the tiny settings of the CLI tests (tests.cli_helpers.TINY), composed by Hydra."""
    return compose_config(*TINY)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache):
    """One finished 2-epoch training run through the real CLI, shared by the tests that inspect what it left (its
    records, not its network: so the shallow X3D-XS, whose graph compiles in about half the time); its model is
    registered as REGISTERED_MODEL."""
    work = tmp_path_factory.mktemp("train")
    done = run_cli(TINY + SHALLOW + ["trainer.epochs=2", "schedule.warmup_epochs=1", "trainer.precise_bn_batches=2",
                           "mlflow.system_metrics=true", "mlflow.system_metrics_interval=1",
                           f"mlflow.registered_model={REGISTERED_MODEL}",
                           f"hydra.run.dir={work / 'run'}", f"mlflow.tracking_uri={store_uri(work)}"],
                   cwd=work, cache=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return work, final_json(done.stdout), done


@pytest.fixture(scope="session")
def trained_server(trained, tmp_path_factory):
    """A real `mlflow server` over the `trained` run's store, for the tests that read it through a server (one
    start, about 10 s, instead of one per test); yields its base URL."""
    work, _, _ = trained
    with mlflow_server(store_uri(work), tmp_path_factory.mktemp("trained_server")) as base:
        yield base


@pytest.fixture(scope="session")
def expansion(tmp_path_factory, cache):
    """A finished 4-job expand_one_axis sweep (base, gamma_t, gamma_tau, gamma_s) through the real CLI, each job on
    the clip its model derives."""
    work = tmp_path_factory.mktemp("expand")
    done = multirun(work, cache, "+sweep=expand_one_axis", "+expand=base,gamma_t,gamma_tau,gamma_s",
                    clip_follows_model=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, done


# Session fixtures that run a whole job: under pytest-xdist every test that uses one goes to the same worker, so the
# job runs once.
SHARED_JOBS = ("trained", "expansion")
# The slow tier, marked here rather than test by test, so that a test added anywhere lands in it by what it uses:
# every CLI run takes the `cache` fixture (tests.cli_helpers.run_cli needs it), and so does every job fixture built on
# run_cli (the shared jobs above, a file's own session job). Anything slow that uses neither carries
# @pytest.mark.slow itself. docs/testing.md states the rule and the fast tier's budget.
SLOW_FIXTURES = ("cache", *SHARED_JOBS)


def _uses_a_session_fixture_of_its_file(item) -> bool:
    return any(defs[-1].scope == "session" and getattr(defs[-1].func, "__module__", None) == item.module.__name__
               for defs in item._fixtureinfo.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With `-n N --dist loadgroup` (pytest-xdist): one group per shared job, and one per test file for the tests that
    use a session fixture of their file (such as test_search's resumed search), so that each such job runs once, in
    one worker. The other tests are free, so that long ones (the data groups' CLI runs) spread over the workers.
    tryfirst: xdist reads the groups in its own hook of this name; marks added after it are ignored.
    Also marks slow every test that uses a fixture of SLOW_FIXTURES (itself or through another fixture)."""
    for item in items:
        if any(name in item.fixturenames for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
        shared = [name for name in SHARED_JOBS if name in item.fixturenames]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
        elif _uses_a_session_fixture_of_its_file(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture
def small_disk(tmp_path):
    """A real 56 MB file system (tmpfs) that fills up: room for two of the tiny run's 22 MB checkpoints, not three.
    Mounting needs root, as CI and this project's machines have."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=56m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
