"""Everything `Model.train` needs before its first step: the device, the network, the lr schedule, the optimizer."""

from __future__ import annotations

import logging
import math
from typing import List

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.train import Model
from omegaconf import DictConfig

from x3d_exp.errors import UserError
from x3d_exp.kernels import resolve_conv_impl
from x3d_exp.models import build_from_config

log = logging.getLogger("x3d_exp.engine")


def device_available(target: str) -> bool:
    """Whether MindSpore can run on `target` in this process (its plugin loads and sees a device)."""
    if target == "CPU":
        return True
    try:
        return bool(ms.hal.is_available(target))
    except Exception:  # builds without the device's plugin raise instead of answering
        return False


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    return "GPU" if device_available("GPU") else "CPU"


def check_device(cfg: DictConfig) -> str:
    """The device the job runs on; a device MindSpore cannot use here is a one-line error naming the fix, raised
    before anything starts (MindSpore's own error is a multi-line RuntimeError, once per msrun rank)."""
    # A distributed launcher names its device (its collective library only exists there).
    device = resolve_device(cfg.launcher.device or cfg.device)
    if not device_available(device):
        fix = ("launcher=distributed_cpu" if cfg.launcher.device else "device=CPU (or device=auto)")
        key = f"launcher={cfg.launcher.name}" if cfg.launcher.device else f"device={cfg.device}"
        raise UserError(f"{key}: MindSpore cannot use a {device} in this process (no {device} found, or this "
                        f"MindSpore build has no working {device} plugin); use {fix}")
    return device


def setup_context(cfg: DictConfig) -> str:
    device = check_device(cfg)
    mode = ms.GRAPH_MODE if cfg.trainer.graph_mode else ms.PYNATIVE_MODE
    ms.set_context(mode=mode, device_target=device)
    ms.set_seed(int(cfg.seed))
    return device


def amp_level(cfg: DictConfig, device: str) -> str:
    if device == "CPU" and cfg.amp_level != "O0":
        log.warning("amp_level=%s ignored on the CPU (no float16 convolutions there); using O0", cfg.amp_level)
        return "O0"
    return str(cfg.amp_level)


def build_network(cfg: DictConfig, device: str):
    return build_from_config(cfg.model, int(cfg.data.num_classes), resolve_conv_impl(cfg.model.cpu_kernels, device))


def lr_per_step(cfg: DictConfig, steps_per_epoch: int, base_lr: float) -> List[float]:
    """One learning rate per iteration: linear warmup, then cosine (or step decay) to the end."""
    sched = cfg.schedule
    total = cfg.trainer.epochs * steps_per_epoch
    warmup = int(round(sched.warmup_epochs * steps_per_epoch))
    start_lr = base_lr / 10 if sched.warmup_start_lr is None else float(sched.warmup_start_lr)
    end_lr = base_lr / 1000 if sched.get("end_lr") is None else float(sched.end_lr)
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(start_lr + (base_lr - start_lr) * step / warmup)
        elif sched.name == "cosine_warmup":
            progress = (step - warmup) / max(1, total - warmup)
            rates.append(end_lr + (base_lr - end_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        else:
            passed = sum(1 for m in sched.milestones if step >= m * steps_per_epoch)
            rates.append(base_lr * sched.gamma ** passed)
    return rates


class ClippedTrainStep(nn.TrainOneStepCell):
    """One optimizer step on gradients whose global L2 norm is clipped to `max_norm` (after the data-parallel
    mean). Parameter names are those of the cell Model builds itself, so checkpoints are interchangeable."""

    def __init__(self, network_with_loss: nn.Cell, optimizer: nn.Optimizer, max_norm: float):
        super().__init__(network_with_loss, optimizer)
        self.max_norm = float(max_norm)

    def construct(self, *inputs):
        loss = self.network(*inputs)
        grads = self.grad_reducer(self.grad_no_sens(self.network, self.weights)(*inputs))
        return ops.depend(loss, self.optimizer(ops.clip_by_global_norm(grads, self.max_norm)))


def build_optimizer(cfg: DictConfig, network: nn.Cell, steps_per_epoch: int, world_size: int = 1):
    base_lr = float(cfg.optim.lr)
    if cfg.optim.scale_lr:
        base_lr *= cfg.data.batch_size * world_size / cfg.optim.base_batch_size
    rates = lr_per_step(cfg, steps_per_epoch, base_lr)
    params = network.trainable_params()
    # BN scales/shifts and biases carry no weight decay (PySlowFast's X3D recipe).
    no_decay = [p for p in params if p.name.endswith(("gamma", "beta", "bias"))]
    decay = [p for p in params if not p.name.endswith(("gamma", "beta", "bias"))]
    groups = [{"params": decay, "weight_decay": float(cfg.optim.weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    lr = ms.Tensor(np.asarray(rates, np.float32))
    if cfg.optim.name == "adamw":
        optimizer = nn.AdamWeightDecay(groups, learning_rate=lr, beta1=cfg.optim.betas[0], beta2=cfg.optim.betas[1])
    else:
        optimizer = nn.SGD(groups, learning_rate=lr, momentum=float(cfg.optim.momentum),
                           nesterov=bool(cfg.optim.nesterov))
    return optimizer, rates


def training_model(cfg: DictConfig, network: nn.Cell, optimizer: nn.Optimizer, device: str) -> Model:
    """`Model` with softmax cross-entropy, the AMP level and loss scaling, or the clipped step when asked for."""
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    if cfg.optim.clip_grad_norm:
        return Model(ClippedTrainStep(nn.WithLossCell(network, loss_fn), optimizer, cfg.optim.clip_grad_norm))
    level = amp_level(cfg, device)
    scale = ms.amp.DynamicLossScaleManager() if level in ("O2", "O3") else None
    return Model(network, loss_fn, optimizer, amp_level=level, loss_scale_manager=scale)
