"""The C++ kernels against MindSpore's own ops (channelwise Conv3d, BatchNorm + activation, SE squeeze and
gate), the full model on them, the build cache and the fallback."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore import ops as P

from x3d_exp import kernels
from x3d_exp.kernels import build, ops
from x3d_exp.kernels.build import KernelBuildError
from x3d_exp.models.x3d import channelwise_conv3d

FORWARD_RTOL = 1e-5
GRAD_RTOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture
def pynative_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def graph_mode():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


@pytest.fixture
def broken_compiler(tmp_path, monkeypatch):
    """No cached library and a compiler that does not exist: the build must fail."""
    monkeypatch.setenv("X3D_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ops.kernel_library.cache_clear()
    ops.kernels_available.cache_clear()
    yield
    ops.kernel_library.cache_clear()
    ops.kernels_available.cache_clear()


def pair(channels, kernel, stride, pads):
    """Our cell and nn.Conv3d with the same weights."""
    ours = ops.ChannelwiseConv3d(channels, kernel, stride, pads)
    native = nn.Conv3d(channels, channels, kernel, stride=stride, pad_mode="pad", padding=pads, group=channels)
    native.weight.set_data(ours.weight.data.copy())
    return ours, native


def grads(cell, x):
    """(output, d input, d weight) for the loss sum(output * fixed random weights)."""
    out = cell(x)
    probe = Tensor(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32))

    def loss(inp):
        return (cell(inp) * probe).sum()

    dx, (dw,) = ms.grad(loss, grad_position=0, weights=cell.trainable_params())(x)
    return out.asnumpy(), dx.asnumpy(), dw.asnumpy()


# Every channelwise geometry X3D uses, at training and test-crop sizes (odd
# sizes from the 182 and 256 test crops), plus a general one it does not use.
CASES = {
    "3x3x3 stride 1": ((2, 5, 4, 10, 10), (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1, odd": ((1, 3, 3, 7, 9), (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1, one frame": ((1, 3, 1, 6, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1,2,2": ((2, 4, 4, 12, 12), (3, 3, 3), (1, 2, 2), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1,2,2, odd (test crop)": ((1, 3, 3, 23, 23), (3, 3, 3), (1, 2, 2), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1,2,2, 5x5 out": ((2, 6, 4, 10, 9), (3, 3, 3), (1, 2, 2), (1, 1, 1, 1, 1, 1)),
    "3x3x3 stride 1, large plane": ((1, 2, 2, 40, 41), (3, 3, 3), (1, 1, 1), (1, 1, 1, 1, 1, 1)),
    "stem 5x1x1": ((2, 4, 4, 9, 9), (5, 1, 1), (1, 1, 1), (2, 2, 0, 0, 0, 0)),
    "stem 5x1x1, 13 frames": ((1, 3, 13, 6, 5), (5, 1, 1), (1, 1, 1), (2, 2, 0, 0, 0, 0)),
    "general: stride 2,2,1, uneven pads": ((1, 3, 7, 8, 9), (3, 2, 3), (2, 2, 1), (0, 1, 1, 0, 2, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_nn_conv3d(case, pynative_mode):
    check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["3x3x3 stride 1,2,2, odd (test crop)", "stem 5x1x1"])
def test_matches_nn_conv3d_in_graph_mode(case, graph_mode):
    check_case(case)


def check_case(case):
    shape, kernel, stride, pads = CASES[case]
    ours, native = pair(shape[1], kernel, stride, pads)
    x = Tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    y, dx, dw = grads(ours, x)
    y_ref, dx_ref, dw_ref = grads(native, x)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= FORWARD_RTOL
    assert rel_err(dx, dx_ref) <= GRAD_RTOL
    assert rel_err(dw, dw_ref) <= GRAD_RTOL


@pytest.mark.slow
def test_train_one_step_cell_in_graph_mode(graph_mode):
    """One SGD step through nn.TrainOneStepCell moves the weights as with nn.Conv3d."""
    ours, native = pair(4, (3, 3, 3), (1, 2, 2), (1, 1, 1, 1, 1, 1))
    x = Tensor(np.random.default_rng(2).standard_normal((2, 4, 3, 8, 8)).astype(np.float32))
    target = Tensor(np.random.default_rng(3).standard_normal((2, 4, 3, 4, 4)).astype(np.float32))
    for cell in (ours, native):
        step = nn.TrainOneStepCell(nn.WithLossCell(cell, nn.MSELoss()), nn.SGD(cell.trainable_params(), 0.5))
        step(x, target)
    assert rel_err(ours.weight.asnumpy(), native.weight.asnumpy()) <= GRAD_RTOL


def test_cell_looks_like_conv3d_to_the_model_code():
    cell = channelwise_conv3d(6, (3, 3, 3), (1, 2, 2), (1, 1, 1), impl="custom")
    assert cell.counts_as_conv and cell.group == 6
    assert cell.stride == (1, 2, 2) and cell.padding == (1, 1, 1, 1, 1, 1)
    assert cell.weight.shape == (6, 1, 3, 3, 3) and cell.weight.name == "weight"


def swish(x):
    return x * P.sigmoid(x)


class NativeBatchNormAct(nn.Cell):
    def __init__(self, channels, activation):
        from x3d_exp.models.x3d import ACTIVATIONS

        super().__init__()
        self.bn = nn.BatchNorm3d(channels, eps=1e-5, momentum=0.9)
        self.activation = ACTIVATIONS[activation]()

    def construct(self, x):
        return self.activation(self.bn(x))


# (N, C, T, H, W): volumes that are not whole vectors, one longer than the kernels' 1024-element sum blocks,
# a single element per channel (the head at a tiny input), and batch 1.
BN_SHAPES = [(2, 5, 3, 7, 9), (2, 3, 4, 20, 21), (3, 4, 1, 1, 1), (1, 6, 2, 5, 5)]


def bn_results(cell, stats, x, probe, train):
    """Output, d input, d gamma, d beta, and the running statistics after the call."""
    bn = cell.bn2d if isinstance(cell, nn.BatchNorm3d) else cell.bn.bn2d
    for param, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), stats):
        param.set_data(Tensor(value))
    cell.set_train(train)
    out = cell(x)
    dx, (dgamma, dbeta) = ms.grad(lambda inp: (cell(inp) * probe).sum(), grad_position=0,
                                  weights=[bn.gamma, bn.beta])(x)
    # The gradient pass ran the forward again: set the running statistics again for one clean update.
    bn.moving_mean.set_data(Tensor(stats[2]))
    bn.moving_variance.set_data(Tensor(stats[3]))
    cell(x)
    return [a.asnumpy() for a in (out, dx, dgamma, dbeta, bn.moving_mean, bn.moving_variance)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("activation", [None, "relu", "swish"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_act_matches_native(shape, activation, train, pynative_mode):
    check_batchnorm_act(shape, activation, train, scale=3.0, offset=1.5)


def test_batchnorm_statistics_of_a_far_off_centre_input(pynative_mode):
    """Mean 50 times the standard deviation: the one-pass variance must not cancel its digits away."""
    check_batchnorm_act((2, 5, 3, 7, 9), "relu", True, scale=1.0, offset=50.0)


def check_batchnorm_act(shape, activation, train, scale, offset):
    rng = np.random.default_rng(6)
    channels = shape[1]
    # Large values reach the sigmoid's tails.
    x = Tensor((rng.standard_normal(shape) * scale + offset).astype(np.float32))
    stats = [rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32),
             rng.standard_normal(channels).astype(np.float32), (rng.random(channels) + 0.5).astype(np.float32)]
    probe = Tensor(rng.standard_normal(shape).astype(np.float32))
    ours = bn_results(kernels.ops.BatchNormAct3d(channels, 1e-5, 0.9, activation=activation), stats, x, probe, train)
    native = bn_results(NativeBatchNormAct(channels, activation), stats, x, probe, train)
    names = ["output", "d input", "d gamma", "d beta", "running mean", "running variance"]
    for name, a, b in zip(names, ours, native):
        tolerance = FORWARD_RTOL if name in ("output", "running mean", "running variance") else GRAD_RTOL
        assert rel_err(a, b) <= tolerance, name


def test_batchnorm_act_is_a_batchnorm3d():
    cell = kernels.ops.BatchNormAct3d(7, 1e-5, 0.9, gamma_init="zeros", activation="relu")
    assert isinstance(cell, nn.BatchNorm3d)
    assert sorted(p.name for p in cell.get_parameters()) == sorted(p.name for p in nn.BatchNorm3d(7).get_parameters())
    assert not cell.bn2d.gamma.asnumpy().any()


@pytest.mark.slow
def test_batchnorm_train_step_in_graph_mode(graph_mode):
    """nn.TrainOneStepCell: the same weights and running statistics after two steps as nn.BatchNorm3d."""
    rng = np.random.default_rng(7)
    x = Tensor((rng.standard_normal((2, 4, 3, 6, 6)) + 0.5).astype(np.float32))
    target = Tensor(rng.standard_normal((2, 4, 3, 6, 6)).astype(np.float32))
    cells = [kernels.ops.BatchNormAct3d(4, 1e-5, 0.9, activation="swish"), NativeBatchNormAct(4, "swish")]
    for cell in cells:
        cell.set_train(True)
        step = nn.TrainOneStepCell(nn.WithLossCell(cell, nn.MSELoss()), nn.SGD(cell.trainable_params(), 0.5))
        step(x, target)
        step(x, target)
    ours, native = (sorted((p.name, p.asnumpy()) for p in c.get_parameters()) for c in cells)
    for (name, a), (_, b) in zip(ours, native):
        assert rel_err(a, b) <= GRAD_RTOL, name


@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 3, 4, 20, 21), (2, 2, 1, 1, 1)])
def test_channel_mean_matches_reduce_mean(shape, pynative_mode):
    rng = np.random.default_rng(8)
    x = Tensor((rng.standard_normal(shape) + 2).astype(np.float32))
    probe = Tensor(rng.standard_normal(shape[:2] + (1, 1, 1)).astype(np.float32))
    ours, native = kernels.ops.ChannelMean(), P.ReduceMean(keep_dims=True)
    assert rel_err(ours(x).asnumpy(), native(x, (2, 3, 4)).asnumpy()) <= FORWARD_RTOL
    dx = ms.grad(lambda inp: (ours(inp) * probe).sum())(x)
    dx_ref = ms.grad(lambda inp: (native(inp, (2, 3, 4)) * probe).sum())(x)
    assert rel_err(dx.asnumpy(), dx_ref.asnumpy()) <= GRAD_RTOL


@pytest.mark.parametrize("activation", [None, "swish"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 3, 4, 20, 21)])
def test_gate_matches_native(activation, shape, pynative_mode):
    rng = np.random.default_rng(9)
    x = Tensor((rng.standard_normal(shape) * 4).astype(np.float32))
    gate = Tensor(rng.random(shape[:2] + (1, 1, 1)).astype(np.float32))
    probe = Tensor(rng.standard_normal(shape).astype(np.float32))
    ours = kernels.ops.FusedGate(activation)

    def native(a, g):
        return swish(a * g) if activation == "swish" else a * g

    assert rel_err(ours(x, gate).asnumpy(), native(x, gate).asnumpy()) <= FORWARD_RTOL
    grads_ours = ms.grad(lambda a, g: (ours(a, g) * probe).sum(), grad_position=(0, 1))(x, gate)
    grads_native = ms.grad(lambda a, g: (native(a, g) * probe).sum(), grad_position=(0, 1))(x, gate)
    for a, b in zip(grads_ours, grads_native):
        assert rel_err(a.asnumpy(), b.asnumpy()) <= GRAD_RTOL


def test_swish_saturates_without_overflow(pynative_mode):
    values = np.array([-1e4, -100, -88, -20, -1e-3, 0, 1e-3, 20, 88, 100, 1e4], np.float32)
    gate = Tensor(np.ones((1, 1, 1), np.float32))
    ours = kernels.ops.FusedGate("swish")(Tensor(values.reshape(1, 1, -1)), gate).asnumpy().ravel()
    exact = values.astype(np.float64) / (1 + np.exp(-values.astype(np.float64)))
    np.testing.assert_allclose(ours, exact, rtol=FORWARD_RTOL, atol=1e-30)


def randomise_batchnorms(net, seed):
    """Non-trivial running statistics and affine parameters, as after training."""
    rng = np.random.default_rng(seed)
    for name, param in net.parameters_and_names():
        if "bn2d" in name:
            positive = "variance" in name or "gamma" in name
            value = rng.random(param.shape) + 0.5 if positive else rng.standard_normal(param.shape) * 0.3
            param.set_data(Tensor(value.astype(np.float32)))


@pytest.mark.slow
def test_fused_inference_network_matches_eval_mode(graph_mode):
    """BatchNorms folded into the channelwise kernels: the same logits at the training and a test crop."""
    from x3d_exp.models import build_model
    from x3d_exp.models.fuse import fuse_for_inference

    # The reference runs the unfused custom kernels: they are held equal to native elsewhere in this file, and
    # native channelwise convs cost one oneDNN call per channel, which made this the slowest kernel test.
    net = build_model("x3d_xs", num_classes=7, conv_impl="custom", stage_depths=[2, 2, 1, 1], head_width=64)
    randomise_batchnorms(net, 11)
    names = sorted(p.name for p in net.get_parameters())
    fused = fuse_for_inference(net)
    assert sorted(p.name for p in net.get_parameters()) == names  # the original is untouched
    kinds = [type(c) for _, c in fused.cells_and_names()]
    assert kinds.count(ops.FusedChannelwiseConv3d) == 1 + 6  # the stem and every block
    assert kinds.count(ops.ResidualRelu) == 6
    assert nn.BatchNorm3d not in kinds and ops.BatchNormAct3d in kinds  # only the head's BN is left
    assert not fused.training

    net.set_train(False)
    rng = np.random.default_rng(12)
    for crop in (64, 91):
        x = Tensor(rng.standard_normal((2, 3, 4, crop, crop)).astype(np.float32))
        assert rel_err(fused(x).asnumpy(), net(x).asnumpy()) <= FORWARD_RTOL


def test_fused_conv_refuses_combinations_without_a_kernel():
    conv = channelwise_conv3d(4, (3, 3, 3), (1, 1, 1), (1, 1, 1), impl="custom")
    with pytest.raises(ValueError, match="no fused kernel"):
        ops.FusedChannelwiseConv3d(conv, np.ones((4, 4)), "swish", None)


def small_x3d(conv_impl):
    from x3d_exp.models import build_model

    # Narrow and shallow: MindSpore runs a native channelwise Conv3d as one oneDNN call per channel.
    return build_model("x3d_xs", num_classes=7, conv_impl=conv_impl, num_frames=4, crop_size=32, stem_width=8,
                       stage_widths=[8, 8, 16, 16], inner_widths=[16, 16, 24, 24], stage_depths=[1, 2, 1, 1],
                       head_width=32, dropout=0.0)


@pytest.mark.slow
def test_full_model_auto_matches_native(pynative_mode):
    """Same weights, same logits and gradients; parameter names and shapes interchangeable."""
    from x3d_exp.models.summary import trace_network

    native, custom = small_x3d("native"), small_x3d("auto")
    kinds = {type(c) for _, c in custom.cells_and_names()}
    assert {ops.ChannelwiseConv3d, ops.BatchNormAct3d, ops.ChannelMean, ops.FusedGate} <= kinds
    assert not any(type(c) is nn.BatchNorm3d for _, c in custom.cells_and_names())
    native_params = {p.name: p for p in native.get_parameters()}
    assert {p.name: p.shape for p in custom.get_parameters()} == {k: p.shape for k, p in native_params.items()}
    for p in custom.get_parameters():
        p.set_data(native_params[p.name].data.copy())
    shape = [3, 4, 32, 32]
    assert trace_network(custom, shape).macs == trace_network(native, shape).macs

    x = Tensor(np.random.default_rng(4).standard_normal((2, *shape)).astype(np.float32))
    labels = Tensor(np.array([1, 5], np.int32))
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    results = []
    for net in (native, custom):
        net.set_train(False)
        logits = net(x).asnumpy()
        net.set_train(True)
        grad_fn = ms.grad(nn.WithLossCell(net, loss), grad_position=None, weights=net.trainable_params())
        results.append((logits, [g.asnumpy() for g in grad_fn(x, labels)]))
    (logits_ref, grads_ref), (logits, grads_) = results
    assert rel_err(logits, logits_ref) <= FORWARD_RTOL
    assert max(rel_err(g, r) for g, r in zip(grads_, grads_ref)) <= GRAD_RTOL


@pytest.mark.slow
def test_fallback_warns_once_and_matches(broken_compiler, caplog):
    from x3d_exp.models.x3d import channelwise_conv3d

    with caplog.at_level(logging.WARNING, logger="x3d_exp.kernels"):
        cells = [channelwise_conv3d(4, (3, 3, 3), (1, 2, 2), impl="auto") for _ in range(3)]
        assert kernels.resolve_conv_impl("auto", "CPU") == "native"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "nn.Conv3d" in warnings[0].getMessage()
    assert all(isinstance(c, nn.Conv3d) for c in cells)

    reference = channelwise_conv3d(4, (3, 3, 3), (1, 2, 2), impl="native")
    cells[0].weight.set_data(reference.weight.data.copy())
    x = Tensor(np.random.default_rng(5).standard_normal((1, 4, 3, 9, 9)).astype(np.float32))
    np.testing.assert_array_equal(cells[0](x).asnumpy(), reference(x).asnumpy())

    from x3d_exp.models.x3d import X3DResBlock

    block = X3DResBlock(4, 6, 4, se_width=8, conv_impl="auto")
    assert {type(c) for _, c in block.cells_and_names()}.isdisjoint(
        {ops.ChannelwiseConv3d, ops.BatchNormAct3d, ops.ChannelMean, ops.FusedGate})

    with pytest.raises(KernelBuildError):
        channelwise_conv3d(4, (3, 3, 3), impl="custom")
    with pytest.raises(KernelBuildError):
        kernels.resolve_conv_impl("custom", "CPU")


def test_resolve_conv_impl():
    assert kernels.resolve_conv_impl("native", "CPU") == "native"
    assert kernels.resolve_conv_impl("auto") == "custom"  # the device MindSpore runs on: the CPU here
    assert kernels.resolve_conv_impl("auto", "CPU") == "custom"
    assert kernels.resolve_conv_impl("custom", "cpu") == "custom"
    for device in ("GPU", "Ascend"):
        for setting in kernels.SETTINGS:
            assert kernels.resolve_conv_impl(setting, device) == "native"
    with pytest.raises(ValueError):
        kernels.resolve_conv_impl("fast", "CPU")


@pytest.mark.slow
def test_cache_key_and_parallel_builds(tmp_path, monkeypatch):
    """Parallel first builds (msrun ranks, pytest workers) leave one complete library and no temp files."""
    env = {**os.environ, "X3D_EXP_CACHE": str(tmp_path)}
    script = "from x3d_exp.kernels.build import build_library; print(build_library())"
    repo = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=repo, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert sorted(f.name for f in (tmp_path / "kernels").iterdir()) == [Path(paths.pop()).name]

    monkeypatch.setenv("X3D_EXP_CACHE", str(tmp_path))
    first = build.library_path()
    monkeypatch.setenv("X3D_EXP_CXXFLAGS", "-O2")
    assert build.library_path() != first  # flags are part of the key
