"""The BatchNorm running statistics between steps: PySlowFast's precise BN, and their mean over the ranks.

Both run before each validation and checkpoint (engine.callbacks.BatchNormStatistics), precise BN first so that the
ranks average the precise statistics.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn

from x3d_exp.distributed import Dist
from x3d_exp.models.x3d import BN_MOMENTUM


def batchnorm_statistics(network) -> list:
    """Every BN running mean and variance of `network`, in a fixed (name) order."""
    return [p for _, p in sorted(network.parameters_and_names())
            if p.name.endswith(("moving_mean", "moving_variance"))]


def average_batchnorm_statistics(network, dist: Dist) -> None:
    """Make every rank's BN moving mean and variance the mean over ranks (one all-reduce for all layers).

    Each rank's BN layers track the statistics of their own batches, so without this the replicas would differ in
    those buffers and a checkpoint of rank 0 would not evaluate as the ranks did together. The mean of the
    per-rank variances is what is kept (the spread between rank means is left out), as in timm's distribute_bn.
    """
    if dist.world_size == 1:
        return
    params = batchnorm_statistics(network)
    if not params:
        return
    values = [p.asnumpy() for p in params]
    flat = dist.all_reduce_sum(np.concatenate([v.ravel() for v in values])) / dist.world_size
    offset = 0
    for param, value in zip(params, values):
        param.set_data(ms.Tensor(flat[offset:offset + value.size].reshape(value.shape).astype(value.dtype)))
        offset += value.size


def precise_batchnorm_statistics(network: nn.Cell, loader, num_batches: int) -> int:
    """PySlowFast's precise BN: set every BN's running mean and variance to the plain average of the statistics of
    up to `num_batches` training batches under the current weights; returns the number of batches used.

    The running averages trail the weights by many steps, which shows in the evaluation while the lr is high. The
    BN ops expose only their running averages, so each batch's own statistics are recovered from consecutive values,
    running_i = m * running_(i-1) + (1 - m) * batch_i, m being the BN momentum.
    """
    params = batchnorm_statistics(network)
    if not params or num_batches < 1:
        return 0
    network.set_train(True)
    previous = [p.asnumpy().astype(np.float64) for p in params]
    sums = [np.zeros_like(v) for v in previous]
    used = 0
    for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        if used == num_batches:
            break
        network(ms.Tensor(batch["clip"]))
        current = [p.asnumpy().astype(np.float64) for p in params]
        for total, now, before in zip(sums, current, previous):
            total += (now - BN_MOMENTUM * before) / (1 - BN_MOMENTUM)
        previous = current
        used += 1
    if used == 0:
        return 0
    for param, total in zip(params, sums):
        param.set_data(ms.Tensor((total / used).astype(np.float32)))
    return used
