#!/usr/bin/env python
"""x3d-exp entry point: `python run.py model=x3d_l data=k400 data.root=/data/k400`."""

from x3d_exp.launch import prepare_process

prepare_process()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from x3d_exp.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from x3d_exp.sweeps import run_job
    from x3d_exp.tasks import run_task

    return run_job(run_task, cfg)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from x3d_exp.launch import check_overrides

    check_overrides(str(Path(__file__).resolve().parent / "conf"), "config", sys.argv[1:])
    main()
