"""One worker process per framework (their thread pools would fight inside one), driven over a pipe one call at a
time. The runners are imported in the worker, so the driver loads neither framework."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import traceback


# kind -> (module, class, constructor options, the packages it needs): the runners are imported in their worker only.
RUNNERS = {
    "mindspore": ("x3d_exp.bench.speed.mindspore_runner", "MindSporeRunner", {}, ("mindspore",)),
    "pytorch": ("x3d_exp.bench.speed.torch_runner", "TorchRunner", {}, ("torch", "pytorchvideo")),
    "onnxruntime": ("x3d_exp.bench.speed.onnx_runners", "OnnxRuntimeRunner", {}, ("onnx", "onnxruntime")),
    "openvino_f32": ("x3d_exp.bench.speed.onnx_runners", "OpenVinoRunner", {"precision": "f32"},
                     ("onnx", "openvino")),
    "openvino": ("x3d_exp.bench.speed.onnx_runners", "OpenVinoRunner", {}, ("onnx", "openvino")),
}
# The runners that time our ONNX export rather than a network of their own.
ONNX_KINDS = ("onnxruntime", "openvino_f32", "openvino")


def _worker(kind: str, options: dict, conn) -> None:
    # Framework chatter (profiler progress bars, deprecation notes) would
    # interleave with the table; errors still reach stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        module, name, defaults, _ = RUNNERS[kind]
        runner = getattr(importlib.import_module(module), name)(**defaults, **options)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        command, args = conn.recv()
        if command == "quit":
            return
        try:
            conn.send(("ok", getattr(runner, command)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    def __init__(self, kind: str, options: dict):
        self.kind = kind
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(kind, options, child))
        self.process.start()
        self._result()

    def _result(self):
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"{self.kind} worker failed:\n{value}")
        return value

    def call(self, command: str, *args):
        self.conn.send((command, args))
        return self._result()

    def close(self):
        try:
            self.conn.send(("quit", ()))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
