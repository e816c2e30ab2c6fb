"""ONNX Runtime and OpenVINO on our own ONNX export (made by the MindSpore worker from its weights), run inside
their worker processes: the inference runtimes a deployment would pick instead of MindSpore."""

from __future__ import annotations

import os

import numpy as np

from x3d_exp.bench.speed.runner import StepRunner

# The runtimes get the machine's cores, as MindSpore's pool does by default (2 on the machine the figures are from).
THREADS = os.cpu_count() or 1


def bench_input(shape) -> np.ndarray:
    """The input every runner times on: the same draw as the MindSpore runner's, so outputs compare."""
    return np.random.default_rng(0).standard_normal(tuple(shape), np.float32)


class OnnxRuntimeRunner(StepRunner):
    """onnxruntime's CPU execution provider, all graph optimisations, THREADS intra-op threads. Inference cases only
    (the driver gives them no train step), on the export's own input shape."""

    name = "onnxruntime"

    def __init__(self):
        import onnxruntime

        self.ort = onnxruntime

    def setup(self, variant: str, case: str, onnx_path: str) -> dict:
        options = self.ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        session = self.ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        x = bench_input(feed.shape)
        self.step = lambda: session.run(None, {feed.name: x})[0]
        self.warm_up()
        return {"threads": THREADS, "input": list(feed.shape), "version": self.ort.__version__}


class OpenVinoRunner(StepRunner):
    """OpenVINO's CPU plugin with THREADS inference threads and the latency hint. `precision` None leaves the plugin
    its default (bfloat16 on CPUs it judges fit for it), "f32" asks for float32."""

    def __init__(self, precision=None):
        # x3d_exp caps oneDNN at AVX2 for MindSpore's convolutions (x3d_exp.env), and this process inherits the cap;
        # OpenVINO's own oneDNN picks its kernels by itself, and at the cap cannot compile bfloat16 at all ("object
        # is not initialized").
        os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
        import openvino

        self.ov = openvino
        self.core = openvino.Core()
        self.precision = precision
        self.name = "openvino" + (f"_{precision}" if precision else "")

    def setup(self, variant: str, case: str, onnx_path: str) -> dict:
        config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        compiled = self.core.compile_model(onnx_path, "CPU", config)
        request = compiled.create_infer_request()
        shape = [int(d) for d in compiled.input(0).get_shape()]
        x = bench_input(shape)
        self.step = lambda: request.infer({0: x})[compiled.output(0)]
        self.warm_up()
        return {"threads": THREADS, "input": shape, "version": self.ov.__version__,
                "precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}
