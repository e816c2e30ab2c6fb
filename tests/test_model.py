"""The X3D family: exact counts, shapes, gradients, structure and factor validation."""

import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from x3d_exp import build_model
from x3d_exp.models import FactorError, X3DSpec, round_width
from x3d_exp.models.summary import count_network, count_parameters, trace_network
from x3d_exp.models.x3d import SqueezeExcite, X3DResBlock, X3DStem

# MindSpore 2.10 runs a channelwise nn.Conv3d on the CPU as one oneDNN call per channel: a graph-mode
# backward through it took over 20 GB here. Forward/backward tests use the project's CPU kernels, as runs do.
CONV_IMPL = "auto"

PUBLISHED = {  # params at 400 / 600 classes, GMACs at the training crop and the test crop
    "x3d_xs": (3_794_322, 4_204_122, 0.605, 0.839),
    "x3d_s": (3_794_322, 4_204_122, 1.963, 2.722),
    "x3d_m": (3_794_322, 4_204_122, 4.732, 6.18),
    "x3d_l": (6_153_432, 6_563_232, 18.368, 24.76),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_pyslowfast(name):
    params_400, params_600, _, _ = PUBLISHED[name]
    assert count_parameters(build_model(name, num_classes=400)) == params_400
    assert count_parameters(build_model(name, num_classes=600)) == params_600


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gmacs_within_one_percent(name):
    _, _, train_gmacs, test_gmacs = PUBLISHED[name]
    net = build_model(name)
    spec = net.spec
    assert trace_network(net, spec.input_shape).gmacs == pytest.approx(train_gmacs, rel=0.01)
    test_input = [3, spec.num_frames, spec.test_crop_size, spec.test_crop_size]
    assert trace_network(net, test_input).gmacs == pytest.approx(test_gmacs, rel=0.01)


@pytest.mark.slow
def test_traced_counts_equal_counts_hooked_on_a_real_forward():
    net = build_model("x3d_xs", num_classes=7, gamma_w=1.5, num_frames=3, conv_impl=CONV_IMPL)
    shape = [3, 3, 70, 50]  # odd sizes exercise the stride arithmetic
    traced = trace_network(net, shape)
    hooked = count_network(net, shape)

    def as_rows(count):
        return sorted((layer.name, layer.out_shape, layer.macs, layer.params) for layer in count.layers)

    assert as_rows(traced) == as_rows(hooked)
    assert len(traced.layers) > 50


def test_variant_sizes_derive_from_factors():
    xs = X3DSpec(**{k: v for k, v in dict(gamma_t=4, gamma_tau=12, gamma_s=math.sqrt(2), gamma_d=2.2).items()})
    assert (xs.num_frames, xs.sampling_rate, xs.crop_size, xs.test_crop_size) == (4, 12, 160, 182)
    assert list(xs.train_scale) == [182, 228]
    assert xs.stage_widths == [24, 48, 96, 192] and xs.inner_widths == [54, 108, 216, 432]
    assert xs.stage_depths == [3, 5, 11, 7]
    assert X3DSpec(gamma_d=5).stage_depths == [5, 10, 25, 15]
    m = X3DSpec(gamma_t=16, gamma_tau=5, gamma_s=2)
    assert (m.num_frames, m.crop_size, m.test_crop_size, list(m.train_scale)) == (16, 224, 256, [256, 320])
    overridden = X3DSpec(gamma_t=16, num_frames=9, crop_size=96)
    assert (overridden.num_frames, overridden.crop_size) == (9, 96)


def test_round_width_rule():
    assert [round_width(w, 1.0, divisor=8) for w in (24, 48, 96, 192)] == [24, 48, 96, 192]
    assert round_width(24, 1.5, divisor=8) == 40
    assert round_width(54, 1 / 16, min_width=8, divisor=8) == 8
    assert round_width(432, 1 / 16, min_width=8, divisor=8) == 32
    assert round_width(10, 1.0, divisor=8) == 16  # 8 would lose more than 10%


def test_structure_channelwise_convs_bn_and_se_placement():
    net = build_model("x3d_xs", conv_impl="native")
    stem = net.stem
    assert isinstance(stem, X3DStem)
    assert stem.conv_xy.weight.shape == (24, 3, 1, 3, 3)
    assert stem.conv_t.weight.shape == (24, 1, 5, 1, 1) and stem.conv_t.group == 24
    assert [type(c).__name__ for c in stem.name_cells().values()] == ["Conv3d", "Conv3d", "BatchNorm3d", "ReLU"]
    for stage_index, stage in enumerate(net.stages):
        blocks = list(stage.blocks)
        for index, block in enumerate(blocks):
            assert isinstance(block, X3DResBlock)
            branch = block.branch
            inner = branch.conv_a.weight.shape[0]
            assert branch.conv_b.weight.shape == (inner, 1, 3, 3, 3)
            assert branch.conv_b.group == inner  # channelwise, not dense
            assert isinstance(branch.bn_a, nn.BatchNorm3d) and isinstance(branch.bn_b, nn.BatchNorm3d)
            assert np.all(branch.bn_c.bn2d.gamma.asnumpy() == 0)
            assert isinstance(branch.se, SqueezeExcite) == (index % 2 == 0)
            expected_stride = 2 if index == 0 else 1
            assert tuple(branch.conv_b.stride)[-2:] == (expected_stride, expected_stride)
            assert tuple(branch.conv_b.stride)[-3] == 1  # never a temporal stride
            has_shortcut = block.shortcut_conv is not None
            assert has_shortcut == (index == 0)
            if has_shortcut:
                assert isinstance(block.shortcut_bn, nn.BatchNorm3d)
    assert stage_index == 3
    assert net.stages[0].blocks[0].branch.se.fc1.weight.shape == (8, 54, 1, 1, 1)
    assert net.head.fc.weight.shape == (2048, 432) and not net.head.fc.has_bias
    assert net.head.proj.weight.shape == (400, 2048)


@pytest.mark.slow
def test_unusual_factor_combinations_build_and_run():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    for overrides in (dict(gamma_w=1.5), dict(gamma_d=1), dict(gamma_b=1), dict(num_frames=5, crop_size=48)):
        net = build_model("x3d_xs", num_classes=3, conv_impl=CONV_IMPL, **overrides)
        net.set_train(False)
        frames = overrides.get("num_frames", 2)
        out = net(ms.Tensor(np.random.rand(1, 3, frames, 40, 40).astype(np.float32)))
        assert out.shape == (1, 3)
    assert build_model("x3d_xs", gamma_w=1.5).spec.stage_widths == [40, 72, 144, 288]
    assert build_model("x3d_xs", gamma_d=1).spec.stage_depths == [1, 2, 5, 3]


@pytest.mark.slow
def test_output_shapes_at_training_and_test_crop_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = build_model("x3d_xs", num_classes=5, conv_impl=CONV_IMPL)
        net.set_train(False)
        for crop in (net.spec.crop_size, net.spec.test_crop_size):  # fully convolutional at 182
            x = ms.Tensor(np.random.rand(1, 3, 4, crop, crop).astype(np.float32))
            assert net(x).shape == (1, 5)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.slow
def test_gradients_reach_every_parameter_in_graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = build_model("x3d_xs", num_classes=4, num_frames=2, conv_impl=CONV_IMPL)
        # The zero-initialised residual BN would block gradients to its branch; open it for this check.
        for name, param in net.parameters_and_names():
            if name.endswith("bn_c.bn2d.gamma"):
                param.set_data(ms.Tensor(np.full(param.shape, 0.5, np.float32)))
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        with_loss = nn.WithLossCell(net, loss_fn)
        params = net.trainable_params()
        grad_fn = ms.value_and_grad(with_loss, None, params)
        x = ms.Tensor(np.random.rand(2, 3, 2, 32, 32).astype(np.float32))
        y = ms.Tensor(np.array([1, 3], np.int32))
        net.set_train(True)
        loss, grads = grad_fn(x, y)
        assert np.isfinite(loss.asnumpy())
        assert len(grads) == len(params)
        silent = [p.name for p, g in zip(params, grads) if not np.any(g.asnumpy() != 0)]
        assert silent == []
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("overrides, key", [
    (dict(gamma_d=0), "model.gamma_d"),
    (dict(gamma_d=-1.0), "model.gamma_d"),
    (dict(num_frames=0), "model.num_frames"),
    (dict(gamma_w="abc"), "model.gamma_w"),
    (dict(crop_size=2.5), "model.crop_size"),
])
def test_bad_factors_fail_with_the_key_named(overrides, key):
    with pytest.raises(FactorError, match=key):
        build_model("x3d_xs", **overrides)


def test_unknown_variant_lists_the_choices():
    with pytest.raises(FactorError, match="x3d_m"):
        build_model("x3d_q")


@pytest.mark.slow
def test_the_public_build_model_runs_on_the_cpu_kernels_by_default():
    """`from x3d_exp import build_model; build_model("x3d_xs")` is the documented API: with MindSpore on the CPU it
    must pick the C++ kernels, not MindSpore's per-channel Conv3d (which took >15 min for one XS step)."""
    from x3d_exp.kernels.ops import BatchNormAct3d, ChannelwiseConv3d

    assert ms.get_context("device_target") == "CPU"
    net = build_model("x3d_xs", num_classes=400)
    cells = [cell for _, cell in net.cells_and_names()]
    assert net.spec.conv_impl == "custom"
    # One channelwise conv in the stem and one per block (XS: 3 + 5 + 11 + 7 blocks), none of them nn.Conv3d.
    assert sum(isinstance(cell, ChannelwiseConv3d) for cell in cells) == 1 + sum(net.spec.stage_depths) == 27
    assert not [cell for cell in cells if isinstance(cell, nn.Conv3d) and cell.group > 1]
    assert any(isinstance(cell, BatchNormAct3d) for cell in cells)
    # Asked for, MindSpore's own layers are still there, with the same parameter names.
    native = build_model("x3d_xs", num_classes=400, conv_impl="native")
    assert native.spec.conv_impl == "native" and native.stem.conv_t.group == 24
    assert sorted(p.name for p in native.get_parameters()) == sorted(p.name for p in net.get_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("order, warned", [("import x3d_exp; import mindspore", False),
                                           ("import mindspore; import x3d_exp", True)])
def test_importing_the_package_gives_the_process_set_up_and_says_when_mindspore_came_first(order, warned):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    code = f"{order}; import os; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "AVX2"
    assert ("import x3d_exp first, or export ONEDNN_MAX_CPU_ISA=AVX2" in done.stderr) == warned, done.stderr[-2000:]


_DROPOUT_MASKS = """
import hashlib, sys
import numpy as np
import x3d_exp
import mindspore as ms
from x3d_exp.models.x3d import SeededDropout
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
ms.set_seed(int(sys.argv[1]))
dropout = SeededDropout(0.5)
dropout.set_train()
x = ms.Tensor(np.ones((16, 2048), np.float32))
digest, kept = hashlib.sha1(), []
for _ in range(300):
    out = dropout(x).asnumpy()
    digest.update(out.tobytes())
    kept.append(float((out > 0).mean()))
values = set(np.unique(out).tolist())
print(digest.hexdigest(), round(float(np.mean(kept)), 3), sorted(values))
"""


@pytest.mark.slow
def test_dropout_masks_repeat_under_the_same_seed_in_separate_processes():
    """MindSpore's CPU Dropout op drew different masks in two processes seeded alike after some calls (which made
    seeded trainings drift apart); the head's dropout must repeat them exactly, and still depend on the seed."""
    import subprocess
    import sys

    def masks(seed):
        done = subprocess.run([sys.executable, "-c", _DROPOUT_MASKS, str(seed)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        digest, kept, values = done.stdout.strip().splitlines()[-1].split(" ", 2)
        return digest, float(kept), values

    first, again, other = masks(3), masks(3), masks(4)
    assert first[0] == again[0] != other[0]
    # Half the units kept on average, each kept one scaled by 1 / (1 - p).
    assert abs(first[1] - 0.5) < 0.01 and first[2] == "[0.0, 2.0]"
