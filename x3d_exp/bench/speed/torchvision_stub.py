"""PyTorchVideo's create_x3d without a working torchvision."""

from __future__ import annotations

import sys
import types


def import_create_x3d():
    """`pytorchvideo.models.x3d.create_x3d`, importable without torchvision.

    pytorchvideo 0.1.5 imports `torchvision.ops.RoIAlign` at import time for a
    detection head X3D never uses, and PyPI's torchvision does not load beside
    a CPU-only torch of another release. When torchvision is absent or broken,
    a placeholder stands in for that one name, for this process only.
    """
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # ImportError, or a torchvision built against another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        stub_ops = types.ModuleType("torchvision.ops")

        class RoIAlign:  # never instantiated by X3D
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not installed; RoIAlign is unavailable in this benchmark")

        stub_ops.RoIAlign = RoIAlign
        stub.ops = stub_ops
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.ops"] = stub_ops
    from pytorchvideo.models.x3d import create_x3d

    return create_x3d
