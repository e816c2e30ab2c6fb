"""The engine as a library: resume resolution, the optimizer, precise BN, gradient clipping, video metrics."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.cli_helpers import compose_config


def test_resume_auto_in_a_new_run_dir_names_the_newest_unfinished_run(tmp_path, capsys):
    from x3d_exp.engine.checkpoint import resolve_resume

    day = tmp_path / "outputs" / "2026-11-26"

    def run_dir(name, saved, planned, mtime):
        run = day / name
        (run / ".hydra").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"trainer:\n  epochs: {planned}\n")
        ckpt = run / "checkpoints" / f"epoch{saved:04d}.ckpt"
        ckpt.write_bytes(b"")
        os.utime(ckpt, (mtime, mtime))
        return run

    older = run_dir("05-00-00", 3, 20, 1000)
    finished = run_dir("05-10-00", 20, 20, 3000)
    newer = run_dir("05-20-00", 7, 20, 2000)
    fresh = day / "05-30-00"
    assert resolve_resume("auto", fresh) == (fresh, None)
    said = capsys.readouterr().out
    assert "starting from scratch" in said and f"resume={newer} " in said and "epoch 7 of 20" in said
    assert str(older) not in said and str(finished) not in said


def test_optimizer_has_no_weight_decay_on_bn_and_biases():
    from x3d_exp.engine.build import build_optimizer
    from x3d_exp.models import build_model

    cfg = compose_config()
    network = build_model("x3d_xs", num_classes=4)
    optimizer, rates = build_optimizer(cfg, network, steps_per_epoch=5)
    assert len(rates) == cfg.trainer.epochs * 5
    decay = dict(zip([p.name for p in optimizer.parameters], optimizer.decay_flags))
    assert decay and all(not decay[n] for n in decay if n.endswith(("gamma", "beta", "bias")))
    assert all(decay[n] for n in decay if n.endswith("weight"))


@pytest.mark.parametrize("impl", ["native", "custom"])
def test_precise_bn_sets_the_mean_of_the_batch_statistics(impl):
    import mindspore as ms
    from mindspore import dataset as ds
    from mindspore import nn

    from x3d_exp.engine.batchnorm import precise_batchnorm_statistics
    from x3d_exp.models.x3d import _bn

    rng = np.random.default_rng(0)
    scale, shift = np.array([1, 2, 3]).reshape(3, 1, 1, 1), np.array([0, 5, -1]).reshape(3, 1, 1, 1)
    clips = (rng.normal(size=(24, 3, 2, 5, 5)) * scale + shift).astype(np.float32)

    class Batches:  # what precise BN reads of a Loader
        dataset = ds.NumpySlicesDataset({"clip": clips}, shuffle=False).batch(6)

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        bn = _bn(3, impl=impl)
        # What the running averages held before must not matter.
        bn.bn2d.moving_mean.set_data(ms.Tensor(np.full(3, 7.0, np.float32)))
        assert precise_batchnorm_statistics(nn.SequentialCell([bn]), Batches, num_batches=3) == 3
    finally:
        ms.set_context(mode=previous)
    # The first three batches of 6, per channel over batch, time and space; unbiased variance, as BN keeps it.
    per_batch = clips[:18].reshape(3, 6, 3, -1).transpose(0, 2, 1, 3).reshape(3, 3, -1)
    np.testing.assert_allclose(bn.bn2d.moving_mean.asnumpy(), per_batch.mean(-1).mean(0), atol=1e-5)
    np.testing.assert_allclose(bn.bn2d.moving_variance.asnumpy(), per_batch.var(-1, ddof=1).mean(0), rtol=1e-5)


def test_clipped_step_scales_the_update_to_the_norm_bound_and_keeps_checkpoint_names():
    import mindspore as ms
    from mindspore import nn
    from mindspore.train import Model

    from x3d_exp.engine.build import ClippedTrainStep

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(size=(8, 16)).astype(np.float32) * 10)
    y = ms.Tensor(rng.integers(0, 4, 8).astype(np.int32))
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        moved = {}
        for max_norm in (None, 0.01):
            ms.set_seed(0)
            net = nn.Dense(16, 4)
            before = [p.asnumpy().copy() for p in net.trainable_params()]
            optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
            step = (ClippedTrainStep(nn.WithLossCell(net, loss_fn), optimizer, max_norm) if max_norm
                    else nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), optimizer))
            step(x, y)
            moved[max_norm] = np.sqrt(sum(((p.asnumpy() - b) ** 2).sum()
                                          for p, b in zip(net.trainable_params(), before)))
        names = {}
        for clipped in (False, True):
            net = nn.Dense(16, 4)
            optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9)
            model = (Model(ClippedTrainStep(nn.WithLossCell(net, loss_fn), optimizer, 1.0)) if clipped
                     else Model(net, loss_fn, optimizer))
            names[clipped] = sorted(p.name for p in model.train_network.get_parameters())
    finally:
        ms.set_context(mode=previous)
    # Unclipped, the update's norm is lr x |g| (well above 0.001 here); clipped, exactly lr x max_norm.
    assert moved[None] > 0.01 and moved[0.01] == pytest.approx(0.1 * 0.01, rel=1e-3)
    assert names[True] == names[False] and any(n.startswith("accum.") for n in names[True])


def test_video_metrics_average_softmax_over_views():
    from x3d_exp.engine.evaluate import video_metrics

    # Video 0: one confident wrong view, two milder right ones: the average is right, the most confident view is not.
    prob_sum = {0: np.array([0.9, 0.1, 0.0]) + np.array([0.2, 0.8, 0.0]) + np.array([0.2, 0.8, 0.0]),
                1: np.array([0.2, 0.3, 0.5]) * 3}
    metrics = video_metrics(prob_sum, {0: 1, 1: 1}, loss_sum=6.0, views=6, num_classes=3)
    assert metrics["top1"] == 0.5 and metrics["top5"] == 1.0 and metrics["loss"] == 1.0
    assert metrics["per_class"][1] == 0.5 and np.isnan(metrics["per_class"][0])
