"""PyTorchVideo's X3D with the same factors, the reference, run inside its worker process."""

from __future__ import annotations

from x3d_exp.bench.speed.cases import CASES, LEARNING_RATE, MODEL_NAMES, MOMENTUM, NUM_CLASSES
from x3d_exp.bench.speed.runner import StepRunner
from x3d_exp.bench.speed.torchvision_stub import import_create_x3d
from x3d_exp.models.x3d import VARIANTS, X3DSpec


class TorchRunner(StepRunner):
    """PyTorchVideo's `create_x3d` with the same factors, logits out (no softmax), CPU, default threads."""

    name = "pytorch"

    def __init__(self):
        import torch

        self.torch = torch
        self.create_x3d = import_create_x3d()
        self.variant = None
        self.model = None
        self.step = None

    def setup(self, variant: str, case: str) -> dict:
        torch = self.torch
        batch, train = CASES[case]
        spec = X3DSpec(**VARIANTS[MODEL_NAMES[variant]])
        if variant != self.variant:
            self.model = self.optimizer = None  # free the previous variant first
            self.model = self.create_x3d(input_clip_length=spec.num_frames, input_crop_size=spec.crop_size,
                                         model_num_class=NUM_CLASSES, depth_factor=spec.gamma_d,
                                         head_activation=None)
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
            self.variant = variant
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, spec.num_frames, spec.crop_size, spec.crop_size, generator=generator)
        if train:
            y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
            self.model.train()

            def step():
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
                self.optimizer.step()
                return loss.item()
        else:
            self.model.eval()

            def step():
                with torch.inference_mode():
                    return self.model(x)
        self.step = step
        self.warm_up()
        params = int(sum(p.numel() for p in self.model.parameters()))
        return {"params": params, "threads": torch.get_num_threads()}
