"""The training callbacks in process (x3d_exp.engine.callbacks, checkpoint): their order, TrainState's decisions,
keep_last pruning, atomic checkpoints and resume.

A real `Model.train` (PyNative, so nothing waits for a graph compile) runs every callback on tiny real videos read by
the real loaders. Its network is a five-op video classifier with a BatchNorm, because even a shallow X3D steps for
seconds in PyNative; checkpoints are also saved and restored on a real tiny X3D training cell (`build_network`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import compose_config
from tests.data_helpers.layouts import kinetics_official
from x3d_exp.config import input_sizes
from x3d_exp.data import build_loader
from x3d_exp.engine.build import build_network, build_optimizer, setup_context, training_model
from x3d_exp.engine.callbacks import (HISTORY_FILE, BadVideoCount, BatchNormStatistics, Checkpointing, StepLogger,
                                      TrainState, Validation, train_callbacks)
from x3d_exp.engine.checkpoint import (BEST_CKPT, checkpoint_bytes, epoch_checkpoints, restore_training_state,
                                       save_checkpoint_atomic, write_atomic)
from x3d_exp.errors import WeightsError

EPOCHS = 3


class MetricLog:
    """A tracker (the callbacks need only log_metrics) that keeps what it was given."""

    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def steps_of(self, key):
        return [step for step, metrics in self.logged if key in metrics]


def tiny_cfg(root: Path, *overrides: str):
    """X3D-XS at depth factor 0.5 on 32x32 crops of 2-frame clips, batch 2, PyNative: a step takes well under a
    second."""
    return compose_config("data=k400", f"data.root={root}", "data.num_classes=2", "data.batch_size=2",
                          "data.num_workers=0", "data.num_frames=2", "data.sampling_rate=2", "data.crop_size=32",
                          "data.test_crop_size=32", "data.train_scale=[32,40]", "data.test_num_clips=1",
                          "data.test_num_crops=1", "model.gamma_d=0.5", "trainer.graph_mode=false",
                          f"trainer.epochs={EPOCHS}", "trainer.eval_every=2", "trainer.keep_last=2",
                          "trainer.log_every=1", "schedule.warmup_epochs=1", "device=CPU", *overrides)


@pytest.fixture(scope="module", autouse=True)
def keep_the_execution_mode():
    """setup_context switches this process to PyNative (trainer.graph_mode=false); the other files expect it back."""
    import mindspore as ms

    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("callbacks_k400")
    kinetics_official(root, {"train": [("archery", "a1"), ("zumba", "z1"), ("archery", "a2"), ("zumba", "z2")],
                             "val": [("archery", "va"), ("zumba", "vz")],
                             "test": [("archery", "ta"), ("zumba", "tz")]})
    return root


def tiny_video_classifier(num_classes: int):
    """[B, 3, T, H, W] clips to logits: a 1x1x1 convolution, BatchNorm, ReLU, the mean over T, H, W, a classifier."""
    from mindspore import nn, ops

    class TinyVideoClassifier(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 1, has_bias=False)
            self.bn = nn.BatchNorm3d(4)
            self.fc = nn.Dense(4, num_classes)

        def construct(self, clip):
            return self.fc(ops.mean(ops.relu(self.bn(self.conv(clip))), axis=(2, 3, 4)))

    return TinyVideoClassifier()


def training_of(cfg, network, train_dir: Path):
    """The loaders, the `Model` and the lr schedule task=train builds for `network`."""
    device = setup_context(cfg)
    sizes = input_sizes(cfg, build_network(cfg, device).spec)
    loaders = {split: build_loader(cfg.data, split, bad_log_dir=str(train_dir / "bad"), **sizes)
               for split in ("train", "val")}
    optimizer, rates = build_optimizer(cfg, network, loaders["train"].steps_per_epoch)
    return loaders, training_model(cfg, network, optimizer, device), rates


def x3d_training_cell(cfg):
    """The training cell (network, loss, optimizer) of a real tiny X3D, as task=train builds it."""
    device = setup_context(cfg)
    network = build_network(cfg, device)
    optimizer, _ = build_optimizer(cfg, network, steps_per_epoch=2)
    return network, training_model(cfg, network, optimizer, device).train_network


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, data_root):
    """Three epochs of two steps (4 videos, batch 2) with every callback."""
    train_dir = tmp_path_factory.mktemp("callbacks_run")
    import mindspore as ms

    cfg = tiny_cfg(data_root)
    ms.set_seed(0)
    network = tiny_video_classifier(2)
    loaders, model, rates = training_of(cfg, network, train_dir)
    state = TrainState.start(cfg, loaders["train"].steps_per_epoch, train_dir)
    # As task_train does: the run's clock, which the step logger and the validation feed.
    state.start_clock(0, loaders["val"].steps_per_epoch, 0, eval_cost=0.5)
    tracker = MetricLog()
    callbacks = train_callbacks(state, tracker, network, rates, loaders["val"], loaders.values())
    model.train(EPOCHS, loaders["train"].dataset, callbacks=callbacks, dataset_sink_mode=False)
    return cfg, state, tracker, network, callbacks, train_dir


def test_the_callbacks_come_in_the_documented_order(three_epochs):
    *_, callbacks, _ = three_epochs
    assert [type(c) for c in callbacks] == [StepLogger, BatchNormStatistics, Validation, BadVideoCount, Checkpointing]


def test_trainstate_validates_and_saves_on_its_epochs_and_always_at_the_last():
    cfg = compose_config("trainer.epochs=7", "trainer.eval_every=2", "trainer.ckpt_every=3")
    state = TrainState.start(cfg, steps_per_epoch=5, train_dir=Path("run"))
    assert [e for e in range(1, 8) if state.evaluating(e)] == [2, 4, 6, 7]
    assert [e for e in range(1, 8) if state.saving(e)] == [3, 6, 7]
    assert state.epoch_step(3) == 15 and state.ckpt_dir == Path("run") / "checkpoints"
    assert (state.best_top1, state.history, state.best_path, state.last_paths) == (-1.0, [], None, [])


def test_every_step_and_epoch_is_logged_on_one_global_step_axis(three_epochs):
    cfg, state, tracker, *_ = three_epochs
    steps = state.steps_per_epoch
    assert steps == 2
    assert tracker.steps_of("train/loss") == list(range(1, EPOCHS * steps + 1))
    assert tracker.steps_of("train/epoch_loss") == [steps * e for e in range(1, EPOCHS + 1)]
    # Validated at epoch 2 (eval_every) and 3 (the last) only.
    assert tracker.steps_of("val/top1") == [2 * steps, 3 * steps]
    assert tracker.steps_of("data/bad_videos") == [steps * e for e in range(1, EPOCHS + 1)]
    rates = [metrics["train/lr"] for _, metrics in tracker.logged if "train/lr" in metrics]
    assert rates[0] == pytest.approx(cfg.optim.lr / 10) and rates[steps] == pytest.approx(cfg.optim.lr)


def test_keep_last_leaves_the_newest_epochs_and_the_history_goes_with_them(three_epochs):
    _, state, _, _, _, train_dir = three_epochs
    ckpt_dir = train_dir / "checkpoints"
    assert [p.name for p in epoch_checkpoints(ckpt_dir)] == ["epoch0002.ckpt", "epoch0003.ckpt"]
    assert state.last_paths == epoch_checkpoints(ckpt_dir)
    history = json.loads((ckpt_dir / HISTORY_FILE).read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3] and history == state.history
    assert "val_top1" not in history[0] and "val_top1" in history[1] and "val_top1" in history[2]
    # Nothing half-written is left under any name.
    assert not [p.name for p in ckpt_dir.iterdir() if "partial" in p.name]


def test_the_best_checkpoint_holds_the_best_validated_epoch_and_trainstate_resumes_from_the_files(three_epochs):
    import mindspore as ms

    cfg, state, _, _, _, train_dir = three_epochs
    tops = [r["val_top1"] for r in state.history if "val_top1" in r]
    assert state.best_top1 == max(tops) and state.best_path == train_dir / "checkpoints" / BEST_CKPT
    best_epoch = next(r["epoch"] for r in state.history if r.get("val_top1") == max(tops))
    assert int(ms.load_checkpoint(str(state.best_path))["epoch"].asnumpy()) == best_epoch
    last = ms.load_checkpoint(str(train_dir / "checkpoints" / "epoch0003.ckpt"))
    assert (int(last["epoch"].asnumpy()), int(last["step"].asnumpy())) == (3, 3 * state.steps_per_epoch)
    assert 0 < float(last["elapsed_s"].asnumpy()) <= state.clock.elapsed() + 0.1  # saved to a tenth of a second
    # Resumed at epoch 2 (its checkpoint pruned since, the history file one epoch ahead): TrainState takes the
    # best top-1 from the checkpoint and the history up to its epoch, the best and kept files from the disk.
    resumed = TrainState.start(cfg, state.steps_per_epoch, train_dir,
                               resumed_from={"epoch": 2, "step": 4, "best_top1": state.best_top1, "elapsed_s": 600.0})
    assert [r["epoch"] for r in resumed.history] == [1, 2] and resumed.history == state.history[:2]
    assert resumed.best_path == state.best_path and resumed.last_paths == state.last_paths
    assert resumed.best_top1 == pytest.approx(state.best_top1)
    # The run's clock goes on from the training time the resumed state had, and saves it on.
    resumed.start_clock(2, 1, 0, eval_cost=0.5)
    assert resumed.clock.status().startswith("run 10 min 0 s,")
    assert resumed.checkpoint_meta(3)["elapsed_s"] == pytest.approx(600.0, abs=1.0)


def test_a_tiny_x3d_training_state_saves_atomically_and_restores_whole(data_root, tmp_path):
    """Weights, optimizer moments and the step counter of a real X3D training cell go into a fresh one."""
    import mindspore as ms

    cfg = tiny_cfg(data_root)
    ms.set_seed(0)
    network, saved_cell = x3d_training_cell(cfg)
    rng = np.random.default_rng(0)
    for param in saved_cell.get_parameters():  # every value unlike a fresh cell's: noise, and the step counter 7
        dtype = ms.dtype_to_nptype(param.dtype)
        value = rng.standard_normal(param.shape) if np.issubdtype(dtype, np.floating) else np.full(param.shape, 7)
        param.set_data(ms.Tensor(value.astype(dtype)))
    path = save_checkpoint_atomic(saved_cell, tmp_path / "checkpoints" / "epoch0002.ckpt",
                                  {"epoch": 2, "step": 4, "best_top1": 0.5})
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch0002.ckpt"]
    # The size the run's start line plans the disk with (x3d_exp.engine.checkpoint.disk_need), within 1 %.
    assert checkpoint_bytes(network) == pytest.approx(path.stat().st_size, rel=0.01)
    ms.set_seed(1)
    _, fresh_cell = x3d_training_cell(cfg)
    meta = restore_training_state(fresh_cell, path)
    assert meta == {"epoch": 2, "step": 4, "best_top1": 0.5}
    saved = {p.name: p.asnumpy() for p in saved_cell.get_parameters()}
    restored = {p.name: p.asnumpy() for p in fresh_cell.get_parameters()}
    assert saved.keys() == restored.keys() and "global_step" in saved
    assert any(name.startswith("accum.") for name in saved)  # SGD's momentum buffers
    assert all(np.array_equal(saved[name], restored[name]) for name in saved)
    # Another model config does not fit: the message names a parameter and the way out.
    _, wider = x3d_training_cell(tiny_cfg(data_root, "model.gamma_d=1.0"))
    with pytest.raises(WeightsError, match=r"does not fit this model: stages\.\S+ missing .*same model config"):
        restore_training_state(wider, path)


def test_an_atomic_save_replaces_the_file_whole_and_a_leftover_partial_is_never_a_checkpoint(tmp_path):
    import mindspore as ms
    from mindspore import nn

    network = nn.Dense(3, 2)
    target = tmp_path / "checkpoints" / "epoch0001.ckpt"
    save_checkpoint_atomic(network, target, {"epoch": 1, "step": 4, "best_top1": 0.5})
    network.weight.set_data(ms.Tensor(np.ones((2, 3), np.float32)))
    save_checkpoint_atomic(network, target, {"epoch": 1, "step": 4, "best_top1": 0.75})
    saved = ms.load_checkpoint(str(target))
    assert np.array_equal(saved["weight"].asnumpy(), np.ones((2, 3))) and float(saved["best_top1"].asnumpy()) == 0.75
    # What a process killed mid-write leaves: the temporary names, which neither resume nor pruning count.
    (target.parent / ".epoch0002.partial.ckpt").write_bytes(b"half")
    write_atomic(target.parent / HISTORY_FILE, "[]")
    assert epoch_checkpoints(target.parent) == [target]
    assert sorted(p.name for p in target.parent.iterdir()) == [".epoch0002.partial.ckpt", "epoch0001.ckpt",
                                                               HISTORY_FILE]


def test_resuming_from_a_file_that_is_not_a_training_checkpoint_names_it(tmp_path):
    import mindspore as ms
    from mindspore import nn

    network = nn.Dense(3, 2)
    plain = tmp_path / "weights.ckpt"
    ms.save_checkpoint(network, str(plain))
    with pytest.raises(WeightsError, match=r"weights\.ckpt has no epoch, step entry"):
        restore_training_state(network, plain)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.ckpt is not a readable checkpoint"):
        restore_training_state(network, junk)
