"""Hydra's entry point for X3D's progressive expansion search: `python run.py -m +sweep=progressive`.

Hydra instantiates sweepers only from the `hydra_plugins` namespace package, so this file is installed as
`hydra_plugins.x3d_exp_search` (setup.cfg's package_dir). It holds the Hydra plumbing; the search itself is
x3d_exp.search.progressive.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper


class ProgressiveSweeper(Sweeper):
    def __init__(self) -> None:
        self.config = None
        self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Optional[Any]:
        from x3d_exp.errors import UserError
        from x3d_exp.search.progressive import SearchFailed, run_progressive_sweep

        try:
            return run_progressive_sweep(self.config, arguments, self.launcher)
        except (SearchFailed, UserError) as err:
            # SystemExit passes Hydra's error reporting; the sweep callback's exit hook closes the parent FAILED.
            print(f"error: sweep progressive: {err}", file=sys.stderr)
            sys.exit(1)
