"""`task=sync`: deliver what jobs spooled but could not send, their tracking server being away (docs/tracking.md).

`sync.path` is a run dir or any folder above run dirs (a sweep dir, `outputs/`); every spool under it is delivered,
a sweep's own spool before its jobs' (a child run names its parent). Delivery is idempotent: a second sync sends
nothing. The store is the one each job logged to, unless `mlflow.tracking_uri=` is given on the command line (a
new server, say): then everything is delivered there from the start.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from x3d_exp.config import JobContext
from x3d_exp.errors import UserError
from x3d_exp.tracking.delivery import sync
from x3d_exp.tracking.spool import SPOOL_FILE, Spool


def task_sync(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    root = Path(str(cfg.sync.path or job.output_dir)).expanduser().resolve()
    spools = sorted(root.rglob(SPOOL_FILE), key=lambda p: (len(p.parts), str(p)))
    if not spools:
        raise UserError(f"sync.path={root}: no {SPOOL_FILE} in it or below it (nothing a job spooled)")
    given = any(o.startswith("mlflow.tracking_uri=") for o in job.task_overrides)
    delivered = pending = 0
    busy = []
    for path in spools:
        spool = Spool(path)
        uri = str(cfg.mlflow.tracking_uri) if given else (spool.tracking_uri() or str(cfg.mlflow.tracking_uri))
        try:
            sent, left, run_id = sync(spool, uri, float(cfg.mlflow.drain_timeout))
        except RuntimeError as err:  # its job is still running and delivering it
            busy.append(str(err))
            print(f"{spool.run_dir}: skipped, {err}")
            continue
        delivered += sent
        pending += left
        print(f"{spool.run_dir}: {sent} records delivered to {uri}" + (f", {left} still pending" if left else "")
              + (f" (run {run_id})" if run_id else ""), flush=True)
    if pending:
        raise UserError(f"sync: {pending} records still pending (the tracking server did not answer within "
                        f"mlflow.drain_timeout={cfg.mlflow.drain_timeout}s); run the same command again")
    return {"task": "sync", "spools": len(spools), "delivered": delivered, "busy": len(busy)}
