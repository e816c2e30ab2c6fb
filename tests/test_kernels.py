"""The C++ channelwise Conv3d kernels against MindSpore's nn.Conv3d, the build cache and the fallback."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from x3d_exp import kernels
from x3d_exp.kernels import build, ops
from x3d_exp.kernels.build import KernelBuildError

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
    cell = kernels.build_channelwise_conv3d(6, (3, 3, 3), (1, 2, 2), (1, 1, 1), "custom")
    assert cell.counts_as_conv and cell.group == 6
    assert cell.stride == (1, 2, 2) and cell.padding == (1, 1, 1, 1, 1, 1)
    assert cell.weight.shape == (6, 1, 3, 3, 3) and cell.weight.name == "weight"


def small_x3d(conv_impl):
    from x3d_exp.models import build_model

    # Narrow and shallow: MindSpore runs a native channelwise Conv3d as one oneDNN call per channel.
    return build_model("x3d_xs", num_classes=7, conv_impl=conv_impl, num_frames=4, crop_size=32, stem_width=8,
                       stage_widths=[8, 8, 16, 16], inner_widths=[16, 16, 24, 24], stage_depths=[1, 2, 1, 1],
                       head_width=32, dropout=0.0)


def test_full_model_auto_matches_native(pynative_mode):
    """Same weights, same logits and gradients; parameter names and shapes interchangeable."""
    from x3d_exp.models.summary import trace_network

    native, custom = small_x3d("native"), small_x3d("auto")
    assert any(isinstance(c, ops.ChannelwiseConv3d) for _, c in custom.cells_and_names())
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


def test_fallback_warns_once_and_matches(broken_compiler, caplog):
    from x3d_exp.models.x3d import channelwise_conv3d

    with caplog.at_level(logging.WARNING, logger="x3d_exp.kernels"):
        cells = [channelwise_conv3d(4, (3, 3, 3), (1, 2, 2), impl="auto") for _ in range(3)]
        assert kernels.resolve_cpu_kernels("auto", "CPU") == "native"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "nn.Conv3d" in warnings[0].getMessage()
    assert all(isinstance(c, nn.Conv3d) for c in cells)

    reference = channelwise_conv3d(4, (3, 3, 3), (1, 2, 2), impl="native")
    cells[0].weight.set_data(reference.weight.data.copy())
    x = Tensor(np.random.default_rng(5).standard_normal((1, 4, 3, 9, 9)).astype(np.float32))
    np.testing.assert_array_equal(cells[0](x).asnumpy(), reference(x).asnumpy())

    with pytest.raises(KernelBuildError):
        channelwise_conv3d(4, (3, 3, 3), impl="custom")
    with pytest.raises(KernelBuildError):
        kernels.resolve_cpu_kernels("custom", "CPU")


def test_resolve_cpu_kernels():
    assert kernels.resolve_cpu_kernels("native", "CPU") == "native"
    assert kernels.resolve_cpu_kernels("auto", "CPU") == "custom"
    assert kernels.resolve_cpu_kernels("custom", "cpu") == "custom"
    for device in ("GPU", "Ascend"):
        for setting in kernels.SETTINGS:
            assert kernels.resolve_cpu_kernels(setting, device) == "native"
    with pytest.raises(ValueError):
        kernels.resolve_cpu_kernels("fast", "CPU")


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
