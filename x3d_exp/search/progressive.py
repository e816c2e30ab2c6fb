"""X3D's progressive expansion (Feichtenhofer, CVPR 2020, Sec. 3.2) as a search over Hydra jobs.

Coordinate descent over the six factors: each step trains one candidate per axis (that axis expanded by its step,
the others unchanged) and keeps the one with the best validation top-1 gained per GMAC added (or the best top-1),
until `sweep.target_gmacs` or `sweep.steps`. A last step past the target is contracted back along its axis until
the model fits (the paper's backward contraction) and that model is trained too.

The search only decides what to train. `ProgressiveSearch.run` hands every batch of candidates to `launch` (the
selected Hydra launcher, through the sweeper in hydra_plugins.x3d_exp_search), so candidates of a step run in
parallel wherever the launcher runs them. Each job is a child run of the sweep's parent (x3d_exp.tracking.sweeps),
which is also where a resumed search finds the candidates it has already trained.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from mlflow.tracking import MlflowClient

from x3d_exp.config import FACTORS
from x3d_exp.errors import ConfigError
from x3d_exp.tracking.plots import plot_expansion_path
from x3d_exp.tracking.spool import Spool
from x3d_exp.tracking.sweeps import AXIS_TAG, PARENT_FILE, SEARCH_RESULT, STEP_TAG, as_float, best_val_top1

log = logging.getLogger("x3d_exp.search.progressive")

# One step per axis, from the paper and its published variants (each roughly doubles the GMACs). gamma_tau is
# the frame rate at constant duration: its step multiplies the frames and divides the sampling stride.
AXIS_STEPS = {"gamma_t": 2.0, "gamma_tau": 2.0, "gamma_s": math.sqrt(2), "gamma_w": 2.0, "gamma_b": 2.25,
              "gamma_d": 2.2}
RULES = ("gain_per_gmac", "accuracy")
PATH_CSV = "expansion_path.csv"
PATH_PLOT = "expansion_path.png"
FOUND_MODEL = "found_model.yaml"


# What training a candidate tells (the rest of a Candidate says what it is).
OUTCOME = ("status", "val_top1", "test_top1", "gmacs", "params", "clip", "run_id", "error")


@dataclass
class Candidate:
    step: int
    axis: str  # "start", a factor, or "contract <factor>"
    factors: Dict[str, float]
    status: str = "PENDING"
    val_top1: Optional[float] = None
    test_top1: Optional[float] = None
    gmacs: Optional[float] = None
    params: Optional[int] = None
    clip: Optional[str] = None
    run_id: Optional[str] = None
    error: str = ""
    reused: bool = False
    chosen: bool = False

    @property
    def key(self) -> str:
        return factor_key(self.factors)

    def take_outcome(self, trained: "Candidate") -> None:
        """What training `trained`, the same point of the search, gave."""
        for name in OUTCOME:
            setattr(self, name, getattr(trained, name))

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and self.val_top1 is not None and self.gmacs is not None


def factor_key(factors: Dict[str, float]) -> str:
    """The identity of a point of the search: its six factors to 6 significant digits."""
    return " ".join(f"{name}={factors[name]:.6g}" for name in FACTORS)


def expand(factors: Dict[str, float], axis: str, multiplier: float) -> Dict[str, float]:
    """The factors with `axis` expanded by `multiplier`, to 8 significant digits (so that sqrt(2) twice is 2.0 in
    the jobs' params and run names, not 2.0000000000000004)."""
    out = dict(factors)
    if axis == "gamma_tau":
        # gamma_tau is the sampling stride here: a higher frame rate over the same duration is more frames,
        # each closer to the last.
        out["gamma_t"] = factors["gamma_t"] * multiplier
        out["gamma_tau"] = factors["gamma_tau"] / multiplier
    else:
        out[axis] = factors[axis] * multiplier
    return {name: float(f"{value:.8g}") for name, value in out.items()}


def job_overrides(candidate: Candidate) -> List[str]:
    return [*(f"model.{name}={candidate.factors[name]!r}" for name in FACTORS),
            f"sweep.step={candidate.step}", f"sweep.axis='{candidate.axis}'"]


@dataclass
class SearchSettings:
    steps: int = 3
    target_gmacs: Optional[float] = None
    rule: str = "gain_per_gmac"
    axes: Sequence[str] = tuple(FACTORS)
    axis_steps: Dict[str, float] = field(default_factory=lambda: dict(AXIS_STEPS))

    @classmethod
    def from_config(cls, sweep) -> "SearchSettings":
        """From the `sweep` config node, checked here so a bad setting fails before any job, naming its key."""
        steps = dict(AXIS_STEPS)
        steps.update({k: float(v) for k, v in dict(sweep.get("axis_steps") or {}).items()})
        # A key the sweep leaves out (or sets null, or an empty axes list) keeps this class's default.
        given = {key: sweep.get(key) for key in ("steps", "target_gmacs", "rule", "axes")
                 if sweep.get(key) is not None and (key != "axes" or len(sweep.get(key)))}
        settings = cls(**given, axis_steps=steps)
        settings.steps, settings.rule, settings.axes = int(settings.steps), str(settings.rule), tuple(settings.axes)
        unknown = sorted(set(settings.axes) - set(FACTORS)) + sorted(set(steps) - set(FACTORS))
        if unknown:
            raise ConfigError(f"sweep.axes / sweep.axis_steps: unknown factor(s) {', '.join(unknown)}; "
                              f"the factors are {', '.join(FACTORS)}")
        if settings.rule not in RULES:
            raise ConfigError(f"sweep.rule={settings.rule!r}: must be one of {', '.join(RULES)}")
        if settings.steps < 1:
            raise ConfigError(f"sweep.steps={settings.steps}: must be >= 1")
        if settings.target_gmacs is not None and float(settings.target_gmacs) <= 0:
            raise ConfigError(f"sweep.target_gmacs={settings.target_gmacs}: must be > 0 (or null)")
        return settings


class SearchFailed(Exception):
    """Every candidate of a step failed: there is nothing to go on from."""


def choose(base: Candidate, finished: List[Candidate], rule: str) -> Candidate:
    """The candidate to go on from. Ties (every candidate at 100%, say) go to the cheaper one."""
    if rule == "accuracy":
        return max(finished, key=lambda c: (c.val_top1, -c.gmacs))
    return max(finished, key=lambda c: ((c.val_top1 - base.val_top1) / max(c.gmacs - base.gmacs, 1e-9), -c.gmacs))


def contract(previous: Candidate, chosen: Candidate, target: float, multiplier: float,
             cost: Callable[[Dict[str, float]], float]) -> Optional[Dict[str, float]]:
    """The factors between `previous` and `chosen` along the chosen axis with the largest cost <= `target`
    (bisection over the step's multiplier; None if not even a 1% step fits)."""
    low, high = 1.0, multiplier
    best = None
    for _ in range(10):  # the multiplier to within a factor of 1.001
        middle = math.sqrt(low * high)
        factors = expand(previous.factors, chosen.axis, middle)
        if cost(factors) <= target:
            low, best = middle, factors
        else:
            high = middle
    return best if best is not None and low > 1.01 else None


def recorded_children(client: Optional[MlflowClient], parent: Optional[str]) -> Dict[str, Candidate]:
    """`finished_children`, or none (with one warning line) when there is no parent run or the store is away."""
    if client is None or parent is None:
        return {}
    try:
        return finished_children(client, parent)
    except Exception as err:  # noqa: BLE001 - the search goes on; it trains what it cannot see
        log.warning("cannot read the finished candidates from MLflow (%s): %s", type(err).__name__,
                    next(iter(str(err).splitlines()), ""))
        return {}


def finished_children(client: MlflowClient, parent: str) -> Dict[str, Candidate]:
    """The FINISHED candidates already under `parent`, by factor key (what a resumed search reuses)."""
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                              "attributes.status = 'FINISHED'", max_results=50000)
    found = {}
    for run in runs:
        params, tags = run.data.params, run.data.tags
        if STEP_TAG not in tags:
            continue
        factors = {name: float(params[f"model.{name}"]) for name in FACTORS}
        size = as_float(params.get("model_params"))
        candidate = Candidate(int(tags[STEP_TAG]), tags[AXIS_TAG], factors, "FINISHED",
                              best_val_top1(client, run.info.run_id), run.data.metrics.get("test/top1"),
                              as_float(params.get("model_gmacs")), None if size is None else int(size),
                              params.get("clip"), run.info.run_id, reused=True)
        found[candidate.key] = candidate
    return found


class ProgressiveSearch:
    """The search loop. `launch(candidates)` trains a batch and fills in each candidate's outcome."""

    def __init__(self, settings: SearchSettings, start: Dict[str, float],
                 launch: Callable[[List[Candidate]], None], cost: Callable[[Dict[str, float]], float],
                 done: Optional[Dict[str, Candidate]] = None):
        self.settings = settings
        self.start = {name: float(start[name]) for name in FACTORS}
        self._launch = launch
        self.cost = cost
        self.done = dict(done or {})
        self.candidates: List[Candidate] = []
        self.path: List[Candidate] = []

    def _train(self, batch: List[Candidate]) -> List[Candidate]:
        """Train what has not been trained yet; returns the batch, every candidate with its outcome."""
        missing = []
        for candidate in batch:
            earlier = self.done.get(candidate.key)
            if earlier is not None:
                candidate.take_outcome(earlier)
                candidate.reused = True
            else:
                missing.append(candidate)
        if missing:
            self._launch(missing)
        for candidate in batch:
            if candidate.finished:
                self.done[candidate.key] = candidate
        self.candidates.extend(batch)
        return batch

    def run(self) -> Candidate:
        settings = self.settings
        current = self._train([Candidate(0, "start", self.start)])[0]
        if not current.finished:
            raise SearchFailed(f"the start model ({factor_key(self.start)}) failed: {current.error}")
        current.chosen = True
        self.path.append(current)
        target = settings.target_gmacs
        previous = None
        for step in range(1, settings.steps + 1):
            if target is not None and current.gmacs >= target:
                break
            batch = [Candidate(step, axis, expand(current.factors, axis, settings.axis_steps[axis]))
                     for axis in settings.axes]
            finished = [c for c in self._train(batch) if c.finished]
            if not finished:
                errors = "; ".join(f"{c.axis}: {c.error or c.status}" for c in batch)
                raise SearchFailed(f"step {step}: all {len(batch)} candidates failed ({errors})")
            previous, current = current, choose(current, finished, settings.rule)
            current.chosen = True
            self.path.append(current)
            log.info("step %d: chose %s (val top-1 %.3f at %.4f GMACs)", step, current.axis, current.val_top1,
                     current.gmacs)
        if target is not None and previous is not None and current.gmacs > target:
            factors = contract(previous, current, target, settings.axis_steps[current.axis], self.cost)
            if factors is not None:
                contracted = self._train([Candidate(current.step, f"contract {current.axis}", factors)])[0]
                if contracted.finished:
                    contracted.chosen = True
                    self.path.append(contracted)
                    current = contracted
        return current

    def table(self):
        import pandas as pd

        rows = []
        for c in self.candidates:
            row = {"step": c.step, "axis": c.axis, "chosen": c.chosen, "status": c.status, "reused": c.reused}
            row.update(c.factors)
            row.update(gmacs=c.gmacs, params=c.params, clip=c.clip, val_top1=c.val_top1, test_top1=c.test_top1,
                       run_id=c.run_id, error=c.error)
            rows.append(row)
        return pd.DataFrame(rows)

    def write_artifacts(self, out_dir: Path, found: Candidate, title: str) -> List[Path]:
        """expansion_path.csv, the Figure-2 plot and found_model.yaml (in out_dir/model/, a config group)."""
        table = self.table()
        csv = out_dir / PATH_CSV
        table.to_csv(csv, index=False)
        plot = plot_expansion_path(table, title, out_dir / PATH_PLOT)
        model_dir = out_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        yaml = model_dir / FOUND_MODEL
        lines = [f"# Found by the progressive expansion search in {out_dir}: step {found.step} ({found.axis}),",
                 f"# val top-1 {found.val_top1:.4f} at {found.gmacs:.4f} GMACs per training clip {found.clip}.",
                 f"#   python run.py --config-dir {out_dir} model=found_model",
                 "name: custom"]
        lines += [f"{name}: {found.factors[name]!r}" for name in FACTORS]
        yaml.write_text("\n".join(lines) + "\n")
        return [csv, plot, yaml]


def _first_free_job(sweep_dir: Path) -> int:
    """Job numbers continue after any job folder already in the sweep dir (a resumed search keeps them)."""
    numbers = [int(p.name) for p in sweep_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(numbers) + 1 if numbers else 0


def _apply_outcome(candidate: Candidate, outcome) -> None:
    if not isinstance(outcome, dict):
        candidate.status, candidate.error = "FAILED", f"{type(outcome).__name__}: {outcome}"[:500]
        return
    clip = outcome.get("clip")
    candidate.status = outcome.get("status", "FAILED")
    candidate.error = str(outcome.get("error") or "")
    candidate.run_id = outcome.get("run_id")
    candidate.val_top1, candidate.test_top1 = outcome.get("val_top1"), outcome.get("test_top1")
    candidate.gmacs, candidate.params = outcome.get("gmacs"), outcome.get("params")
    candidate.clip = "x".join(str(d) for d in clip) if clip else None


def trained_gmacs(config, factors: Dict[str, float]) -> float:
    """GMACs of the model with these factors at the clip the run's data group would train it on."""
    from omegaconf import OmegaConf

    from x3d_exp.config import input_sizes, train_clip
    from x3d_exp.data.loader import resolve_num_classes
    from x3d_exp.models import build_from_config
    from x3d_exp.models.summary import trace_network

    cfg = OmegaConf.merge(OmegaConf.masked_copy(config, ["model", "data"]), {"model": factors})
    # data=folder leaves the count null: its jobs size the head from the class folders, so the cost does too.
    net = build_from_config(cfg.model, resolve_num_classes(cfg.data), conv_impl="native")
    return trace_network(net, train_clip(input_sizes(cfg, net.spec))).gmacs


def run_progressive_sweep(config, arguments: Sequence[str], launcher) -> Candidate:
    """The body of the ProgressiveSweeper: search with `launcher`, record the path on the sweep's parent run.

    Raises SearchFailed (after recording what there is) when the start model or a whole step fails.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import JobStatus

    sweeping = [o.input_line for o in OverridesParser.create().parse_overrides(list(arguments))
                if o.is_sweep_override()]
    if sweeping:
        raise ConfigError(f"{sweeping[0]}: the progressive search chooses the factors itself; give single values")
    settings = SearchSettings.from_config(config.sweep)
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    parent_file = sweep_dir / PARENT_FILE
    parent = parent_file.read_text().strip() if parent_file.is_file() else None
    client = MlflowClient(str(config.mlflow.tracking_uri)) if parent else None
    done = recorded_children(client, parent)
    if done:
        log.info("resuming: %d candidates already trained in %s", len(done), sweep_dir)
    next_job = _first_free_job(sweep_dir)

    def launch(batch: List[Candidate]) -> None:
        nonlocal next_job
        first, next_job = next_job, next_job + len(batch)
        try:
            returns = launcher.launch([[*arguments, *job_overrides(c)] for c in batch], initial_job_idx=first)
        except Exception as err:  # noqa: BLE001 - e.g. submitit's launch() raises when one job dies outside the task
            log.error("the launcher lost jobs %d-%d: %s", first, next_job - 1, err)
            returns = [None] * len(batch)
            first_line = next(iter(str(err).splitlines()), "")
            reason = f"the launcher lost the batch: {type(err).__name__}: {first_line[:300]}"
            # One lost job makes the whole launch() raise; the jobs that did finish say so in their runs.
            recorded = recorded_children(client, parent)
            for candidate in batch:
                if candidate.key in recorded:
                    candidate.take_outcome(recorded[candidate.key])
                else:
                    candidate.status, candidate.error = "FAILED", reason
        for candidate, ret in zip(batch, returns):
            if ret is not None:
                _apply_outcome(candidate, ret._return_value if ret.status == JobStatus.COMPLETED
                               else ret._return_value or ret.status)

    search = ProgressiveSearch(settings, {name: float(config.model[name]) for name in FACTORS}, launch,
                               lambda factors: trained_gmacs(config, factors), done)
    found = None
    try:
        found = search.run()
    finally:
        _record(search, found, sweep_dir, settings)
    return found


def _record(search: ProgressiveSearch, found: Optional[Candidate], sweep_dir: Path, settings: SearchSettings) -> None:
    """The path so far, on disk and on the parent run (through the sweep's spool); with a result, the line the sweep
    ends with."""
    if not search.candidates:
        return
    last = found or search.path[-1]
    paths = search.write_artifacts(sweep_dir, last, "progressive expansion")
    trained = sum(1 for c in search.candidates if not c.reused and c.finished)
    failed = sum(1 for c in search.candidates if c.status != "FINISHED")
    factors = " ".join(f"{k}={v:.4g}" for k, v in last.factors.items())
    steps = max(c.step for c in search.path)
    line = (f"{steps} steps, {len(search.candidates)} candidates ({trained} trained here, {failed} failed), "
            f"{'found' if found else 'stopped at'} {factors} at {last.gmacs:.4f} GMACs "
            f"(val top-1 {last.val_top1:.3f}, rule {settings.rule}); {FOUND_MODEL}: {paths[2]}")
    (sweep_dir / SEARCH_RESULT).write_text(json.dumps({"line": line}))
    spool = Spool.in_dir(sweep_dir)
    if spool.run_key():
        for path in paths:
            spool.append("log_artifact", path=str(path))
        now = int(time.time() * 1000)
        spool.append("log_metrics", metrics=[["search/found_gmacs", float(last.gmacs), now, 0],
                                             ["search/found_val_top1", float(last.val_top1), now, 0]])
        spool.append("set_tags", tags={"search.found": factors})
