#!/usr/bin/env python
"""x3d-exp entry point: `python run.py model=x3d_l data=k400 data.root=/data/k400` (x3d_exp.cli)."""

import sys
from pathlib import Path

from x3d_exp.env import prepare_process

prepare_process()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from x3d_exp import cli  # noqa: E402
from x3d_exp.config import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return cli.main(cfg)


if __name__ == "__main__":
    cli.check_overrides(str(Path(__file__).resolve().parent / "conf"), "config", sys.argv[1:])
    main()
