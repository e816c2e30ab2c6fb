"""`task=train` and `task=test`: the engine wired to the data, the MLflow run and the ranks of a data-parallel run."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
from mindspore import nn
from omegaconf import DictConfig

from x3d_exp.config import JobContext, input_sizes, train_clip
from x3d_exp.data import build_loader, pipeline_errors
from x3d_exp.distributed import RESULT_FILE, SINGLE, Dist, check_replicas, join
from x3d_exp.engine.build import build_network, build_optimizer, setup_context, training_model
from x3d_exp.engine.callbacks import TrainState, train_callbacks
from x3d_exp.engine.checkpoint import (disk_need, disk_room, resolve_resume, restore_best, restore_training_state,
                                       write_atomic)
from x3d_exp.engine.evaluate import evaluate
from x3d_exp.engine.interrupt import StopAtStepBoundary, StopSignals
from x3d_exp.engine.memory import available_memory, compile_seconds, estimate_memory, memory_warning, size_text
from x3d_exp.engine.progress import eval_cost
from x3d_exp.errors import UserError
from x3d_exp.models.fuse import inference_network
from x3d_exp.models.summary import count_parameters, trace_network
from x3d_exp.tracking import Tracker
from x3d_exp.tracking.models import MODEL_DIR, delivered_model, model_spec, save_trained_model
from x3d_exp.tracking.plots import save_plots
from x3d_exp.tracking.runs import view_command
from x3d_exp.weights import load_pretrained

log = logging.getLogger("x3d_exp.train")
# How long the start line waits for the store to create the run, so that it can give the run's link.
START_LINK_WAIT_S = 10


def _loaders(cfg: DictConfig, spec, run_dir: Path, splits, dist: Dist = SINGLE, skip_batches: int = 0):
    sizes = input_sizes(cfg, spec)
    return {split: build_loader(cfg.data, split, seed=int(cfg.seed), bad_log_dir=str(run_dir / "bad_videos"),
                                shard_id=dist.rank, num_shards=dist.world_size, skip_batches=skip_batches, **sizes)
            for split in splits}


def _record_cost(cfg: DictConfig, network, tracker: Tracker) -> dict:
    """GMACs at the clip the loader feeds (what a sweep compares) and at the model's own input size, logged once;
    returns the result's `clip` and `gmacs`."""
    sizes = input_sizes(cfg, network.spec)
    trained = trace_network(network, train_clip(sizes))
    if not tracker.resume:
        tracker.log_model(cfg.model.name, trained, trace_network(network, network.spec.input_shape), sizes)
    return {"clip": list(trained.input_shape), "sampling_rate": sizes["sampling_rate"],
            "gmacs": round(trained.gmacs, 4)}


def _leave_result(result: dict, out_dir: Path, dist: Dist) -> None:
    """Rank 0's result for the msrun launcher, which prints it (x3d_exp.distributed.msrun)."""
    if dist.world_size > 1 and dist.is_main:
        write_atomic(out_dir / RESULT_FILE, json.dumps(result))


def run_link(cfg: DictConfig, run_id: Optional[str]) -> str:
    """How to open a run in MLflow's UI (x3d_exp.tracking.runs.view_command); '' without a run."""
    if not run_id or not cfg.mlflow.enabled:
        return ""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return view_command(MlflowClient(cfg.mlflow.tracking_uri), cfg.mlflow.tracking_uri, run_id)
    except (MlflowException, OSError):  # the store is away: the spool still holds the run (docs/tracking.md)
        return f"run {run_id} in {cfg.mlflow.tracking_uri} (not answering now)"


def _announce(cfg: DictConfig, network, device: str, run_dir: Path, tracker: Tracker, dist: Dist) -> None:
    """The run's first line: its dir, its MLflow link, the memory it will need and the disk its checkpoints will; a
    warning when either is more than is free."""
    sizes = input_sizes(cfg, network.spec)
    estimate = estimate_memory(network, train_clip(sizes), int(cfg.data.batch_size), str(cfg.optim.name))
    if tracker.sender is not None:
        # The sender creates the run in the background: a store that answers has it in well under a second.
        tracker.sender.drain(START_LINK_WAIT_S)
    link = run_link(cfg, tracker.run_id) or ("MLflow off" if not tracker.active else
                                             f"MLflow run pending in {cfg.mlflow.tracking_uri} (docs/tracking.md)")
    if not dist.is_main:
        return
    disk, free = disk_need(network, cfg.trainer.keep_last), shutil.disk_usage(run_dir).free
    print(f"run dir {run_dir}; view: {link}; memory per process {estimate.describe()}; disk for checkpoints up to "
          f"{size_text(disk)} ({size_text(free)} free)", flush=True)
    warning = memory_warning(estimate, available_memory(device))
    if warning:
        log.warning(warning)
    if disk > free:
        log.warning("the checkpoints of this run need up to %s, but the disk of %s has %s free: free space there "
                    "or lower trainer.keep_last=%d", size_text(disk), run_dir, size_text(free),
                    int(cfg.trainer.keep_last))


def task_train(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    with StopSignals() as signals:
        return _train(cfg, job, signals)


def _train(cfg: DictConfig, job: JobContext, signals: StopSignals) -> dict:
    started = time.time()
    train_dir, resume_from = resolve_resume(cfg.resume, job.output_dir)
    device = setup_context(cfg)
    dist = join(device)
    network = build_network(cfg, device)
    with Tracker(cfg, train_dir, job, resume=resume_from is not None, active=dist.is_main,
                 print_link=False) as tracker:
        _announce(cfg, network, device, train_dir, tracker, dist)
        loaders = _loaders(cfg, network.spec, train_dir, ("train", "val", "test"), dist)
        if cfg.ckpt and resume_from is None:
            skipped = load_pretrained(network, cfg.ckpt, cfg.mlflow.tracking_uri)
            if skipped:
                print(f"ckpt={cfg.ckpt}: loaded all but {', '.join(skipped)} (class count differs)")
        cost = _record_cost(cfg, network, tracker)
        if resume_from is None:
            tracker.log_params({"world_size": dist.world_size})
            tracker.log_datasets(cfg.data.name, loaders)
        train = loaders["train"]
        optimizer, rates = build_optimizer(cfg, network, train.steps_per_epoch, dist.world_size)
        model = training_model(cfg, network, optimizer, device)
        start = None
        if resume_from is not None:
            start = restore_training_state(model.train_network, resume_from)
            print(f"resumed from {resume_from} at epoch {start['epoch']}, step {start['step']}", flush=True)
        first_epoch = int(start["epoch"]) if start else 0
        if first_epoch >= cfg.trainer.epochs:
            raise UserError(f"resume={cfg.resume}: {resume_from} is already at epoch {first_epoch} of "
                            f"trainer.epochs={cfg.trainer.epochs}")
        # Its own pipeline: the training one is mid-iteration inside Model.train when the statistics are taken.
        bn_loader = (_loaders(cfg, network.spec, train_dir, ("train",), dist)["train"]
                     if cfg.trainer.precise_bn_batches else None)
        state = TrainState.start(cfg, train.steps_per_epoch, train_dir, start, dist)
        state.clip = (cost["clip"][1], cost["clip"][2])
        # Resumed mid-epoch: the rest of that epoch comes from a pipeline of its own, which leaves out the batches
        # already trained; the full pipeline takes over at the next epoch.
        rest = (_loaders(cfg, network.spec, train_dir, ("train",), dist, skip_batches=state.skip_steps)["train"]
                if state.skip_steps else None)
        if rest is not None:
            rest.set_epoch(first_epoch)
        full_from = first_epoch + (rest is not None)
        train.set_epoch(full_from)
        sizes = input_sizes(cfg, network.spec)
        val_batch = int(cfg.data.eval_batch_size or cfg.data.batch_size)
        state.start_clock(first_epoch, loaders["val"].steps_per_epoch, loaders["test"].steps_per_epoch,
                          eval_cost(int(cfg.data.batch_size), sizes["crop_size"], val_batch, sizes["test_crop_size"]))
        if cfg.trainer.graph_mode:
            state.compile_estimate_s = compile_seconds(network, train_clip(sizes))
        callbacks = train_callbacks(state, tracker, network, rates, loaders["val"], loaders.values(), bn_loader)
        callbacks.append(StopAtStepBoundary(state, signals))
        signals.deferring = True
        with pipeline_errors(f"data={cfg.data.name}"):
            if rest is not None:
                model.train(full_from, rest.dataset, callbacks=callbacks, dataset_sink_mode=False,
                            initial_epoch=first_epoch)
            if full_from < cfg.trainer.epochs:
                model.train(int(cfg.trainer.epochs), train.dataset, callbacks=callbacks, dataset_sink_mode=False,
                            initial_epoch=full_from)
        signals.deferring = False
        if signals.requested:
            # Asked during the last epoch's end: training is complete, so the test runs and the job finishes.
            log.info("%s after the last epoch: finishing with the test", signals.requested)
        check_replicas(model.train_network, dist, train_dir)
        restore_best(network, state.best_weights, state.ckpt_dir)
        with pipeline_errors(f"data={cfg.data.name}"):
            result, metrics = _test_and_record(cfg, network, loaders["test"], tracker, train_dir, state.history, dist)
        # The checkpoints stay in the run dir; MLflow gets the best network as a model, with the metrics linked.
        if dist.is_main:
            test = loaders["test"]
            spec = model_spec(cfg, network, sizes, test.class_names)
            with disk_room(train_dir / MODEL_DIR):
                model_dir = save_trained_model(train_dir / MODEL_DIR, network, spec,
                                               test.paths[0] if len(test.paths) else None)
            tracker.log_trained_model(model_dir, {**metrics, "val/best_top1": state.best_top1})
            result["model_dir"] = str(model_dir)
        result.update(cost, task="train", run_id=tracker.run_id, val_top1=state.best_top1, best_epoch=state.best_epoch,
                      epochs=int(cfg.trainer.epochs), seconds=round(time.time() - started, 1), run_dir=str(train_dir))
        _leave_result(result, train_dir, dist)
    # The tracker delivered what it could on leaving: the LoggedModel's ids, once the store has it.
    result.update(delivered_model(train_dir))
    return result


def _test_and_record(cfg, network, test_loader, tracker, run_dir, history, dist: Dist = SINGLE,
                     scorer: Optional[nn.Cell] = None) -> dict:
    """Test the network, log the bad-video count and plots; returns (the job's result, the test metrics), which the
    caller logs: task=train links them to the trained model."""
    metrics = evaluate(scorer or network, test_loader, int(cfg.data.num_classes), cfg, "test", dist)
    bad = int(round(dist.all_reduce_sum(np.array([len(test_loader.bad_videos())]))[0]))
    tracker.log_metrics({"data/bad_videos_test": bad}, None)
    if dist.is_main:
        plots = save_plots(history, metrics["per_class"], test_loader.class_names, run_dir / "plots")
        for plot in plots:
            tracker.log_artifact(plot, "plots")
        per_class_path = run_dir / "per_class_accuracy.json"
        per_class_path.write_text(json.dumps(dict(zip(test_loader.class_names, metrics["per_class"])), indent=1))
        tracker.log_artifact(per_class_path, None)
    result = {"model": cfg.model.name, "params": count_parameters(network), "test_top1": metrics["top1"],
              "test_top5": metrics["top5"], "test_videos": metrics["videos"], "world_size": dist.world_size}
    return result, {"test/top1": metrics["top1"], "test/top5": metrics["top5"], "test/loss": metrics["loss"]}


def task_test(cfg: DictConfig, job: JobContext = JobContext()) -> dict:
    started = time.time()
    run_dir = job.output_dir
    device = setup_context(cfg)
    dist = join(device)
    network = build_network(cfg, device)
    with Tracker(cfg, run_dir, job, active=dist.is_main, print_link=False) as tracker:
        skipped = load_pretrained(network, cfg.ckpt, cfg.mlflow.tracking_uri)
        if skipped:
            raise UserError(f"ckpt={cfg.ckpt}: its head does not fit data.num_classes={cfg.data.num_classes}")
        loaders = _loaders(cfg, network.spec, run_dir, ("test",), dist)
        cost = _record_cost(cfg, network, tracker)
        tracker.log_params({"world_size": dist.world_size})
        tracker.log_datasets(cfg.data.name, loaders)
        with pipeline_errors(f"data={cfg.data.name}"):
            result, metrics = _test_and_record(cfg, network, loaders["test"], tracker, run_dir, [], dist,
                                               scorer=inference_network(network))
        tracker.log_metrics(metrics, None)
        result.update(cost, task="test", run_id=tracker.run_id, val_top1=None, epochs=0,
                      seconds=round(time.time() - started, 1), run_dir=str(run_dir))
        _leave_result(result, run_dir, dist)
    return result
