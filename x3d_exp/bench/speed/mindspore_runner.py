"""Our X3D's steps, run inside its worker process (x3d_exp.bench.speed.workers)."""

from __future__ import annotations

import math

from x3d_exp.bench.speed.cases import CASES, LEARNING_RATE, MODEL_NAMES, MOMENTUM, NUM_CLASSES
from x3d_exp.bench.speed.runner import StepRunner
from x3d_exp.bench.speed.profile import profile_steps


class MindSporeRunner(StepRunner):
    """Our X3D in GRAPH mode: `nn.TrainOneStepCell` for training; for inference the eval-mode net, with its
    BatchNorms folded into the channelwise convs (`x3d_exp.models.fuse`) when `fuse` and the kernels are on."""

    name = "mindspore"

    def __init__(self, kernels: str, fuse: bool = True):
        from x3d_exp.env import prepare_process

        prepare_process()
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        from x3d_exp.kernels import resolve_conv_impl

        self.ms = ms
        self.conv_impl = resolve_conv_impl(kernels, "CPU")
        self.fuse = fuse and self.conv_impl != "native"
        self.variant = None
        self.net = None
        self.fused = None
        self.train_cell = None
        self.step = None

    def setup(self, variant: str, case: str) -> dict:
        import numpy as np
        from mindspore import Tensor, nn

        from x3d_exp.models import build_model

        batch, train = CASES[case]
        if variant != self.variant:
            self.net = self.fused = self.train_cell = None  # free the previous variant first
            self.net = build_model(MODEL_NAMES[variant], num_classes=NUM_CLASSES, conv_impl=self.conv_impl)
            self.variant = variant
        spec = self.net.spec
        rng = np.random.default_rng(0)
        x = Tensor(rng.standard_normal((batch, 3, spec.num_frames, spec.crop_size, spec.crop_size), np.float32))
        if train:
            if self.train_cell is None:
                loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
                optimizer = nn.SGD(self.net.trainable_params(), learning_rate=LEARNING_RATE, momentum=MOMENTUM)
                self.train_cell = nn.TrainOneStepCell(nn.WithLossCell(self.net, loss), optimizer)
            self.net.set_train(True)
            y = Tensor(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))
            self.step = lambda: self.train_cell(x, y).asnumpy()
        else:
            self.net.set_train(False)
            if self.fuse and self.fused is None:
                from x3d_exp.models.fuse import fuse_for_inference

                self.fused = fuse_for_inference(self.net)
            net = self.fused if self.fuse else self.net
            self.step = lambda: net(x).asnumpy()
        self.warm_up()
        params = int(sum(p.size for p in self.net.trainable_params()))
        shape = [batch, 3, spec.num_frames, spec.crop_size, spec.crop_size]
        return {"params": params, "conv_impl": self.conv_impl, "fused": self.fuse and not train, "input": shape}

    def export_onnx(self, case: str, folder: str) -> str:
        """The current variant's network, with these weights, as ONNX for the case's batch (the file the
        ONNX runtimes time); exported from a native-conv copy, as task=export does."""
        from mindspore import load_param_into_net

        from x3d_exp.models import build_model
        from x3d_exp.weights.export import export_model

        batch, _ = CASES[case]
        spec = self.net.spec
        native = build_model(MODEL_NAMES[self.variant], num_classes=NUM_CLASSES, conv_impl="native")
        missing, _ = load_param_into_net(native, self.net.parameters_dict(), strict_load=True)
        if missing:
            raise RuntimeError(f"the native-conv copy lacks weights for {missing[:3]}")
        path = f"{folder}/{self.variant}_{case}.onnx"
        return export_model(native, [batch, 3, spec.num_frames, spec.crop_size, spec.crop_size], path, "ONNX")

    def profile(self, steps: int = 2) -> dict:
        """Op time per step by op type and direction, from MindSpore's profiler on the current case."""
        return {**profile_steps(self.step, steps), "layers": self._channelwise_layers()}

    def _channelwise_layers(self) -> dict:
        """(input, output) element counts of every channelwise conv at this batch, by layer name."""
        from x3d_exp.models.summary import trace_network

        spec = self.net.spec
        count = trace_network(self.net, [3, spec.num_frames, spec.crop_size, spec.crop_size])
        return {layer.name: [math.prod(map(int, layer.in_shape)), math.prod(map(int, layer.out_shape)),
                             int(layer.params)]
                for layer in count.layers if layer.kind == "conv_channelwise"}
