"""Data-parallel training inside the processes that msrun starts (x3d_exp.distributed.msrun is the launching side).

A process is a rank when msrun set `MS_ROLE=MS_WORKER` in its environment. msrun also runs the same script once
as its scheduler (`MS_ROLE=MS_SCHED`): `init()` serves the cluster there and ends the process when the workers are
done, so the scheduler never gets past `join`.

Every collective here is one float32 AllReduce (the only AllReduce type MindSpore's CPU backend, mccl, accepts;
float64 and int32 are refused). Each rank fills its own slots of a zero array and the sum is the gathered whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from x3d_exp.env import under_msrun

log = logging.getLogger("x3d_exp.distributed")

# MindSpore's name for each device's collective library; the scheduler always uses mccl.
BACKENDS = {"CPU": "mccl", "GPU": "nccl", "Ascend": "hccl"}
# Rank 0 leaves its task's result here for the launcher, which prints it as the run's result.
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks, as float32."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        if self.world_size == 1:
            return array
        import mindspore as ms
        from mindspore import ops

        return ops.AllReduce()(ms.Tensor(array)).asnumpy()


SINGLE = Dist()


def join(device: str) -> Dist:
    """Join msrun's cluster when started by it (data parallel with mean gradients), else the single process.

    Must run before the network is built: MindSpore fixes the parallel mode when it creates the first parameter.
    """
    if not under_msrun():
        return SINGLE
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init(BACKENDS[device])
    world_size = get_group_size()
    # Model's TrainOneStepCell reads this context to insert the gradient all-reduce; its announced successor
    # (mindspore.parallel.auto_parallel.AutoParallel) wraps jit-compiled networks for sharded modes, not Model.
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    dist = Dist(rank=get_rank(), world_size=world_size)
    if not dist.is_main:
        # Other ranks write only to their msrun log (<run dir>/msrun_logs/worker_<rank>.log, which gets their
        # console output), not into rank 0's run.log.
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    log.info("rank %d of %d joined (%s)", dist.rank, world_size, BACKENDS[device])
    return dist


def merge_video_scores(prob_sum: Dict[int, np.ndarray], labels: Dict[int, int], loss_sum: float, views: int,
                       shard_videos: int, num_classes: int, dist: Dist) -> Tuple[dict, dict, float, int]:
    """Every rank's per-video summed softmax, on every rank: the whole split's scores from the sharded ones.

    The eval shards take every world_size-th video, so each video is scored on exactly one rank, under its index in
    the whole split: rows of a zero [videos, classes] matrix filled by one rank each sum to exactly that rank's
    float32 scores. A last row carries the loss sum and view count.
    """
    if dist.world_size == 1:
        return prob_sum, labels, loss_sum, views
    total = int(round(dist.all_reduce_sum(np.array([shard_videos]))[0]))
    # Columns: class scores, label, 1 if scored here.
    table = np.zeros((total + 1, num_classes + 2), np.float32)
    for video, probs in prob_sum.items():
        table[video, :num_classes] = probs
        table[video, num_classes] = labels[video]
        table[video, num_classes + 1] = 1
    table[total, :2] = (loss_sum, views)
    table = dist.all_reduce_sum(table)
    scored = np.flatnonzero(table[:total, num_classes + 1] > 0)
    merged_probs = {int(v): table[v, :num_classes] for v in scored}
    merged_labels = {int(v): int(round(table[v, num_classes])) for v in scored}
    return merged_probs, merged_labels, float(table[total, 0]), int(round(table[total, 1]))


def parameter_digest(cell) -> str:
    """sha256 over the names, shapes and bytes of a cell's parameters (weights, BN buffers, optimizer state)."""
    digest = hashlib.sha256()
    for name, param in sorted(cell.parameters_and_names(), key=lambda item: item[0]):
        value = np.ascontiguousarray(param.asnumpy())
        digest.update(f"{name}:{value.dtype}:{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def check_replicas(cell, dist: Dist, out_dir: Path) -> str:
    """Write this rank's parameter digest to `out_dir/ranks/rank<N>.json` and fail unless all ranks agree.

    Returns the digest ('' in a single process, which has nothing to compare).

    Data parallelism keeps replicas identical only if every rank starts from the same weights, applies the same
    averaged gradients and the BN buffers are averaged; a mismatch means the run's result is not one model's.
    """
    if dist.world_size == 1:
        return ""
    digest = parameter_digest(cell)
    path = Path(out_dir) / "ranks" / f"rank{dist.rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": dist.rank, "world_size": dist.world_size, "params_sha256": digest}))
    table = np.zeros((dist.world_size, 32), np.float32)
    table[dist.rank] = np.frombuffer(bytes.fromhex(digest), np.uint8)
    table = dist.all_reduce_sum(table).astype(np.uint8)
    digests = [row.tobytes().hex() for row in table]
    differing = [rank for rank, other in enumerate(digests) if other != digest]
    if differing:
        raise RuntimeError(f"rank {dist.rank}: parameters differ from rank(s) {differing} after training "
                           f"(sha256 {digest[:12]} vs {digests[differing[0]][:12]}); the replicas diverged")
    return digest
