"""Pretrained weights: the restricted checkpoint reader, conversion against PyTorchVideo's own X3D, fine-tune
loading and export.

The equivalence tests need torch and pytorchvideo (test-only: `pip install -e ".[test,bench]"`); they are
skipped without them. pytorchvideo 0.1.5 imports torchvision for an RoIAlign its X3D never uses, and no
torchvision build matches our CPU torch, so a stub stands in for that one import while pytorchvideo.models.x3d
loads, and is removed again right after.
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

import pickle  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from tests.cli_helpers import compose_config  # noqa: E402
from x3d_exp.errors import UserError  # noqa: E402
from x3d_exp.tasks.model import task_convert, task_export  # noqa: E402
from x3d_exp.weights import (UnsafeCheckpointError, WeightsError, export_model, load_pretrained,  # noqa: E402
                             load_torch_checkpoint, verify_export)

REPO = Path(__file__).resolve().parents[1]
# shared/ lies beside the repository (in CI beside its clone).
REFERENCE = REPO.parent / "shared" / "reference"
TOLERANCE = 1e-4
BN_EPS = 1e-5


def compose(*overrides, **sections):
    cfg = compose_config(*overrides)
    # Set through open_dict so this works whether or not the config declares these keys.
    with open_dict(cfg):
        for section, values in sections.items():
            for key, value in values.items():
                cfg[section][key] = value
    return cfg


def ms_logits(cfg, ckpt, inputs):
    """Logits of the model `cfg` builds, with weights loaded by MindSpore's own checkpoint API."""
    import mindspore as ms

    from x3d_exp.models import build_from_config

    net = build_from_config(cfg.model, 400)
    net.set_train(False)
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(ckpt), strict_load=True)
    assert not not_loaded
    return net(ms.Tensor(inputs)).asnumpy()


# ---------------------------------------------------------------- restricted unpickler


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("layout", ["zip", "raw"])
def test_refuses_pickle_that_calls_os_system(tmp_path, layout):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model_state": _RunsShell(marker)}, protocol=2)
    path = tmp_path / "evil.pyth"
    if layout == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load posix\.system"):
        load_torch_checkpoint(str(path))
    cfg = compose(convert={"src": str(path), "dst": str(tmp_path / "out.ckpt")})
    with pytest.raises(UserError, match="refusing"):
        task_convert(cfg)
    assert not marker.exists()
    assert not (tmp_path / "out.ckpt").exists()


def _text(value):
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def test_refuses_pickle_that_rewrites_a_tensor(tmp_path):
    """A tensor of 4 floats whose stride a BUILD opcode then turns negative, to read memory before its storage."""
    storage = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + b"K\x04tQ"
    args = (b"(" + storage + b"K\x00" + b"K\x04\x85" + b"K\x01\x85" + b"\x89"
            + b"ccollections\nOrderedDict\n)Rt")
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"
               + b"}" + _text("stride") + b"J" + struct.pack("<i", -100000) + b"\x85s" + b"b.")
    path = tmp_path / "stretched.pyth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(UnsafeCheckpointError, match="overwrite"):
        load_torch_checkpoint(str(path))
    # The same file without the BUILD is a valid tensor.
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R.")
        archive.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(load_torch_checkpoint(str(path)), np.arange(4, dtype=np.float32))


def test_rejects_files_that_are_not_checkpoints(tmp_path):
    path = tmp_path / "notes.pyth"
    path.write_text("not a checkpoint\n")
    cfg = compose(convert={"src": str(path)})
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        task_convert(cfg)
    with pytest.raises(UserError, match="no such file"):
        task_convert(compose(convert={"src": str(tmp_path / "missing.pyth")}))


@pytest.mark.slow
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_tensors_like_torch(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=gen)
    obj = {
        "model_state": {"t": base.t(), "slice": base[2:4, 1:], "half": base.half(), "bf16": base.bfloat16(),
                        "long": torch.arange(5), "flag": torch.tensor([True, False]), "scalar": torch.tensor(3.5)},
        "epoch": 7, "cfg": "TRAIN:\n  ENABLE: True\n", "nested": [base[0], (base[1],)],
        "best": np.float64(0.625),
    }
    path = tmp_path / "mixed.pyth"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    got = load_torch_checkpoint(str(path))
    for key, tensor in obj["model_state"].items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert got["model_state"][key].shape == expected.shape, key
        np.testing.assert_array_equal(got["model_state"][key], expected, err_msg=key)
    assert got["epoch"] == 7 and got["cfg"] == obj["cfg"] and got["best"] == 0.625
    np.testing.assert_array_equal(got["nested"][1][0], base[1].numpy())


# ---------------------------------------------------------------- PyTorchVideo's X3D as the reference


@pytest.fixture(scope="session")
def create_x3d():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    stub = types.ModuleType("torchvision")
    stub.ops = types.ModuleType("torchvision.ops")
    stub.ops.RoIAlign = None
    installed = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
    sys.modules.update({"torchvision": stub, "torchvision.ops": stub.ops})
    try:
        x3d = pytest.importorskip("pytorchvideo.models.x3d")
    finally:
        for name, module in installed.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    return x3d.create_x3d


def reference_model(create_x3d, seed, clip_length, crop_size):
    """PyTorchVideo's X3D (XS/S/M differ only in clip size) with random weights and BN statistics,
    the classifier widened so logits are O(1); pre-softmax logits (head_activation=None) in eval mode."""
    import torch

    torch.manual_seed(seed)
    model = create_x3d(input_clip_length=clip_length, input_crop_size=crop_size, model_num_class=400,
                       depth_factor=2.2, head_activation=None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        head = model.blocks[-1]
        head.proj.weight.normal_(0, 0.05, generator=gen)
        head.proj.bias.normal_(0, 0.1, generator=gen)
    model.eval()
    inputs = torch.randn(1, 3, clip_length, crop_size, crop_size, generator=gen)
    with torch.no_grad():
        logits = model(inputs).numpy()
    return model.state_dict(), inputs.numpy(), logits


@pytest.fixture(scope="session")
def x3d_xs(create_x3d, tmp_path_factory):
    """X3D-XS at its training clip, 4x160x160, saved the way PyTorchVideo's hub checkpoints are."""
    import torch

    state, inputs, logits = reference_model(create_x3d, seed=0, clip_length=4, crop_size=160)
    path = tmp_path_factory.mktemp("ptv") / "X3D_XS.pyth"
    torch.save({"model_state": state}, path)
    return state, inputs, logits, path


def convert(tmp_path, src, model="x3d_xs", **convert_options):
    dst = tmp_path / (Path(src).stem + ".ckpt")
    cfg = compose(f"model={model}", convert={"src": str(src), "dst": str(dst), **convert_options})
    return cfg, task_convert(cfg)


@pytest.mark.slow
def test_pytorchvideo_xs_logits_match(x3d_xs, tmp_path):
    _, inputs, logits, path = x3d_xs
    cfg, result = convert(tmp_path, path)
    assert result["format"] == "pytorchvideo" and result["num_classes"] == 400
    # The missing shortcut BN of PyTorchVideo's first stage is filled with an exact identity.
    assert result["identity_bn"] == [f"stages.0.blocks.0.shortcut_bn.bn2d.{leaf}"
                                     for leaf in ("moving_mean", "moving_variance", "gamma", "beta")]
    diff = np.abs(ms_logits(cfg, result["dst"], inputs) - logits).max()
    print(f"X3D-XS (PyTorchVideo keys) max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_pytorchvideo_m_logits_match(create_x3d, tmp_path):
    """X3D-M on an 8x128x128 clip (its own is 16x224x224), PyTorchVideo built for that clip, to save CPU time."""
    import torch

    state, inputs, logits = reference_model(create_x3d, seed=10, clip_length=8, crop_size=128)
    path = tmp_path / "X3D_M.pyth"
    torch.save({"model_state": state}, path)
    cfg, result = convert(tmp_path, path, model="x3d_m")
    diff = np.abs(ms_logits(cfg, result["dst"], inputs) - logits).max()
    print(f"X3D-M (PyTorchVideo keys) max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE


# The documented key correspondence (shared/reference/README.md), written out independently of the converter.
_PTV_BLOCK = re.compile(r"blocks\.([1-4])\.res_blocks\.(\d+)\.(.+)")
_SLOWFAST_PARTS = [("branch1_conv.", "branch1."), ("branch1_norm.", "branch1_bn."), ("branch2.conv_a.", "branch2.a."),
                   ("branch2.norm_a.", "branch2.a_bn."), ("branch2.conv_b.", "branch2.b."),
                   ("branch2.norm_b.0.", "branch2.b_bn."), ("branch2.norm_b.1.block.0.", "branch2.se.fc1."),
                   ("branch2.norm_b.1.block.2.", "branch2.se.fc2."), ("branch2.conv_c.", "branch2.c."),
                   ("branch2.norm_c.", "branch2.c_bn.")]
_SLOWFAST_FIXED = {"blocks.0.conv.conv_t.": "s1.pathway0_stem.conv_xy.",
                   "blocks.0.conv.conv_xy.": "s1.pathway0_stem.conv.", "blocks.0.norm.": "s1.pathway0_stem.bn.",
                   "blocks.5.pool.pre_conv.": "head.conv_5.",
                   "blocks.5.pool.pre_norm.": "head.conv_5_bn.", "blocks.5.pool.post_conv.": "head.lin_5.",
                   "blocks.5.proj.": "head.projection."}
_MMACTION_PARTS = [("branch1_conv.", "downsample.conv."), ("branch1_norm.", "downsample.bn."),
                   ("branch2.conv_a.", "conv1.conv."), ("branch2.norm_a.", "conv1.bn."),
                   ("branch2.conv_b.", "conv2.conv."), ("branch2.norm_b.0.", "conv2.bn."),
                   ("branch2.norm_b.1.block.0.", "se_module.fc1."), ("branch2.norm_b.1.block.2.", "se_module.fc2."),
                   ("branch2.conv_c.", "conv3.conv."), ("branch2.norm_c.", "conv3.bn.")]
_MMACTION_FIXED = {"blocks.0.conv.conv_t.": "backbone.conv1_s.conv.",
                   "blocks.0.conv.conv_xy.": "backbone.conv1_t.conv.", "blocks.0.norm.": "backbone.conv1_t.bn.",
                   "blocks.5.pool.pre_conv.": "backbone.conv5.conv.",
                   "blocks.5.pool.pre_norm.": "backbone.conv5.bn.", "blocks.5.pool.post_conv.": "cls_head.fc1.",
                   "blocks.5.proj.": "cls_head.fc2."}


def rename(state, fixed, parts, block_prefix, first_shortcut_bn):
    """A PyTorchVideo state dict under another code base's names, with the first-stage shortcut BN it lacks
    added as an identity (variance 1 - eps), so that the logits stay PyTorchVideo's."""
    import torch

    out = {}
    for key, value in state.items():
        match = _PTV_BLOCK.match(key)
        if match:
            rest = match.group(3)
            old, new = next((o, n) for o, n in parts if rest.startswith(o))
            out[block_prefix(int(match.group(1)), match.group(2)) + new + rest[len(old):]] = value
        else:
            old = next(o for o in fixed if key.startswith(o))
            out[fixed[old] + key[len(old):]] = value
    width = state["blocks.1.res_blocks.0.branch1_conv.weight"].shape[0]
    out.update({f"{first_shortcut_bn}weight": torch.ones(width), f"{first_shortcut_bn}bias": torch.zeros(width),
                f"{first_shortcut_bn}running_mean": torch.zeros(width),
                f"{first_shortcut_bn}running_var": torch.full((width,), 1 - BN_EPS),
                f"{first_shortcut_bn}num_batches_tracked": torch.tensor(0)})
    return out


@pytest.mark.slow
def test_slowfast_keys_logits_match(x3d_xs, tmp_path):
    import torch

    state, inputs, logits, _ = x3d_xs
    renamed = rename(state, _SLOWFAST_FIXED, _SLOWFAST_PARTS, lambda s, b: f"s{s + 1}.pathway0_res{b}.",
                     "s2.pathway0_res0.branch1_bn.")
    reference_keys = REFERENCE / "x3d_m_keys_pyslowfast.txt"
    if reference_keys.exists():  # X3D-XS and X3D-M have the same parameters
        assert sorted(renamed) == sorted(line.split("\t")[0] for line in reference_keys.read_text().splitlines())
    path = tmp_path / "x3d_xs.pyth"
    # PySlowFast's layout, in torch's legacy (pre-zip) serialization as its 2020 checkpoints are.
    torch.save({"epoch": 300, "model_state": renamed, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: x3d\n"}, path,
               _use_new_zipfile_serialization=False)
    cfg, result = convert(tmp_path, path)
    assert result["format"] == "slowfast" and not result["identity_bn"]
    diff = np.abs(ms_logits(cfg, result["dst"], inputs) - logits).max()
    print(f"X3D-XS (PySlowFast keys) max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_mmaction2_keys_logits_match(x3d_xs, tmp_path):
    import torch

    state, inputs, logits, _ = x3d_xs
    renamed = rename(state, _MMACTION_FIXED, _MMACTION_PARTS, lambda s, b: f"backbone.layer{s}.{b}.",
                     "backbone.layer1.0.downsample.bn.")
    renamed["cls_head.fc1.weight"] = renamed["cls_head.fc1.weight"].flatten(1)  # MMAction2's fc1 is a Linear
    path = tmp_path / "x3d_xs_mmaction2.pth"
    torch.save({"meta": {"epoch": 300, "best_score": np.float64(0.6)}, "state_dict": renamed}, path)
    cfg, result = convert(tmp_path, path)
    assert result["format"] == "mmaction2"
    diff = np.abs(ms_logits(cfg, result["dst"], inputs) - logits).max()
    print(f"X3D-XS (MMAction2 keys) max abs logit diff {diff:.3g}")
    assert diff <= TOLERANCE


# ---------------------------------------------------------------- errors that name the key


def _save_state(tmp_path, state, name="edited.pyth"):
    import torch

    path = tmp_path / name
    torch.save({"model_state": state}, path)
    return path


@pytest.mark.slow
def test_other_variant_fails_naming_a_key(x3d_xs, tmp_path):
    # X3D-L is deeper (gamma_d 5.0): blocks missing from an X3D-XS checkpoint.
    with pytest.raises(UserError, match=r"missing: blocks\.1\.res_blocks\.3\.branch2\.conv_a\.weight"):
        convert(tmp_path, x3d_xs[3], model="x3d_l")


@pytest.mark.slow
def test_edited_checkpoints_fail_naming_the_key(x3d_xs, tmp_path):
    import torch

    state = dict(x3d_xs[0])
    state["blocks.2.res_blocks.0.branch2.conv_b.weight"] = torch.zeros(3, 1, 3, 3, 3)
    state["blocks.9.extra.weight"] = torch.zeros(1)
    del state["blocks.3.res_blocks.1.branch2.norm_c.running_var"]
    with pytest.raises(UserError) as err:
        convert(tmp_path, _save_state(tmp_path, state))
    message = str(err.value)
    assert "missing: blocks.3.res_blocks.1.branch2.norm_c.running_var" in message
    assert "unexpected: blocks.9.extra.weight" in message
    assert "blocks.2.res_blocks.0.branch2.conv_b.weight [3, 1, 3, 3, 3]" in message
    with pytest.raises(UserError, match="cannot tell the checkpoint format"):
        convert(tmp_path, _save_state(tmp_path, {"fc.weight": torch.zeros(2, 2)}, "other.pyth"))


@pytest.mark.slow
def test_load_pretrained_skips_a_head_of_another_class_count(x3d_xs, tmp_path):
    import mindspore as ms

    from x3d_exp.models import build_model

    _, result = convert(tmp_path, x3d_xs[3])
    net = build_model("x3d_xs", num_classes=101)
    fresh_proj = net.head.proj.weight.asnumpy().copy()
    assert load_pretrained(net, result["dst"]) == ["head.proj.weight", "head.proj.bias"]
    saved = ms.load_checkpoint(result["dst"])
    np.testing.assert_array_equal(net.head.fc.weight.asnumpy(), saved["head.fc.weight"].asnumpy())
    np.testing.assert_array_equal(net.stem.conv_t.weight.asnumpy(), saved["stem.conv_t.weight"].asnumpy())
    np.testing.assert_array_equal(net.head.proj.weight.asnumpy(), fresh_proj)
    with pytest.raises(WeightsError, match=r"missing: stages\.0\.blocks\.3"):
        load_pretrained(build_model("x3d_l", num_classes=400), result["dst"])


# ---------------------------------------------------------------- export

TINY = dict(stem_width=8, stage_widths=[8, 16], inner_widths=[16, 32], stage_depths=[1, 2], head_inner_width=32,
            head_width=64, num_frames=2, crop_size=32)


@pytest.mark.slow
def test_export_mindir_round_trip(tmp_path):
    from mindspore import nn

    from x3d_exp.models import build_model

    net = build_model("custom", num_classes=5, conv_impl="native", **TINY)
    params = [(p.name, id(p)) for p in net.get_parameters()]
    inputs = np.random.default_rng(0).standard_normal((2, 3, 2, 32, 32)).astype(np.float32)
    path = export_model(net, inputs.shape, str(tmp_path / "tiny"), "MINDIR")
    assert path.endswith("tiny.mindir") and os.listdir(tmp_path) == ["tiny.mindir"]
    # Export swaps the channelwise convs for Conv2d taps; the network comes back as it was.
    assert isinstance(net.stem.conv_t, nn.Conv3d) and [(p.name, id(p)) for p in net.get_parameters()] == params
    diff, scale = verify_export(net, path, inputs)
    assert diff <= TOLERANCE and scale > 0


@pytest.mark.slow
def test_export_onnx_round_trip(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from x3d_exp.models import build_model

    net = build_model("custom", num_classes=5, conv_impl="native", **TINY)
    inputs = np.random.default_rng(1).standard_normal((1, 3, 2, 32, 32)).astype(np.float32)
    path = export_model(net, inputs.shape, str(tmp_path / "tiny.onnx"), "ONNX")
    diff, _ = verify_export(net, path, inputs)
    assert diff <= TOLERANCE


@pytest.mark.slow
def test_the_runtime_benchmark_times_our_onnx_export_on_onnx_runtime_and_openvino_computing_what_ours_does():
    """`python -m x3d_exp.bench.speed --against ...` (one step each): ONNX Runtime and OpenVINO run the export of the
    very weights ours runs, so their logits must be ours (bf16 within its precision)."""
    from x3d_exp.bench.speed.driver import run

    result = run(["xs"], ["fwd1"], 1, ["onnxruntime", "openvino_f32", "openvino"], "auto", profile=False,
                 log=lambda line: None)
    (row,) = result["rows"]
    assert set(row["ms"]) == {"mindspore", "onnxruntime", "openvino_f32", "openvino"}
    assert all(ms > 0 for ms in row["ms"].values())
    scale = row["logit_scale"]
    assert scale > 0
    assert row["max_diff"]["onnxruntime"] <= 1e-4 * scale and row["max_diff"]["openvino_f32"] <= 1e-4 * scale
    assert row["max_diff"]["openvino"] <= 2e-2 * scale
    assert row["info"]["openvino_f32"]["precision"] == "f32" and row["info"]["openvino"]["precision"] in ("bf16",
                                                                                                         "f32")


@pytest.mark.slow
def test_task_export_from_converted_checkpoint(tmp_path):
    """task=export loads `ckpt`, takes its class count, exports and checks the file."""
    import mindspore as ms

    from x3d_exp.models import build_from_config

    small = ["model.gamma_w=0.25", "model.gamma_b=1", "model.gamma_d=0.5", "model.num_frames=2", "model.crop_size=32"]
    cfg = compose(*small)
    net = build_from_config(cfg.model, 7)
    ckpt = tmp_path / "small.ckpt"
    ms.save_checkpoint(net, str(ckpt))
    cfg = compose(*small, export={"format": "MINDIR", "dst": str(tmp_path / "out" / "small")})
    with open_dict(cfg):
        cfg.ckpt = str(ckpt)
    result = task_export(cfg)
    assert result["dst"] == str(tmp_path / "out" / "small.mindir") and result["num_classes"] == 7
    assert result["input_shape"] == [1, 3, 2, 32, 32] and result["max_abs_diff"] <= TOLERANCE
    with pytest.raises(UserError, match="export.format=PNG"):
        task_export(compose(*small, export={"format": "PNG"}))


def test_task_export_defaults_to_the_clip_a_training_checkpoint_records(tmp_path):
    """A task=train checkpoint records its clip (engine.checkpoint.META_KEYS): the export's default input is that,
    not the model's own 4x160x160-style clip."""
    from mindspore import nn

    from x3d_exp.engine.checkpoint import save_checkpoint_atomic
    from x3d_exp.models import build_from_config

    small = ["model.gamma_w=0.25", "model.gamma_b=1", "model.gamma_d=0.5", "model.num_frames=2", "model.crop_size=32"]
    cfg = compose(*small)
    net = build_from_config(cfg.model, 3)
    ckpt = save_checkpoint_atomic(nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits()), tmp_path / "best.ckpt",
                                  {"epoch": 1, "step": 4, "best_top1": 0.5, "clip_num_frames": 3,
                                   "clip_crop_size": 24})
    cfg = compose(*small, export={"format": "MINDIR", "verify": False})
    with open_dict(cfg):
        cfg.ckpt = str(ckpt)
    assert task_export(cfg)["input_shape"] == [1, 3, 3, 24, 24]
    with pytest.raises(UserError, match="export.log_model=true logs an ONNX model"):
        task_export(compose(*small, export={"format": "MINDIR", "log_model": True}))


def test_onnx_export_without_onnxruntime_names_the_extra_before_building_anything(monkeypatch):
    import x3d_exp.tasks.model as model_task

    # None in sys.modules makes the import fail, as a missing package does; building the network would be the work.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(model_task, "_build", lambda *a: pytest.fail("the network was built before the check"))
    with pytest.raises(UserError) as raised:
        task_export(compose(export={"format": "ONNX"}))
    assert str(raised.value) == 'export.format=ONNX needs onnxruntime: pip install -e ".[onnx]"'
    # Without verifying or logging, onnx alone is needed.
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match=r'needs onnx: pip install -e "\.\[onnx\]"'):
        task_export(compose(export={"format": "ONNX", "verify": False}))


@pytest.mark.slow
def test_exporting_a_network_on_the_cpu_kernels_says_how_to_export_it(tmp_path):
    from x3d_exp.models import build_model

    net = build_model("custom", num_classes=5, conv_impl="custom", **TINY)
    with pytest.raises(WeightsError, match="build it with conv_impl='native' to export"):
        export_model(net, (1, 3, 2, 32, 32), str(tmp_path / "tiny"), "MINDIR")
    assert os.listdir(tmp_path) == []
