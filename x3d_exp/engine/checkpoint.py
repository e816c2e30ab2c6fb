"""Checkpoints written atomically, and resume: which run and checkpoint `resume=false|auto|PATH` means."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn
from omegaconf import OmegaConf

from x3d_exp.errors import DISK_FULL, NoSpace, UserError, WeightsError

EPOCH_CKPT = re.compile(r"^epoch(\d+)\.ckpt$")
BEST_CKPT = "best.ckpt"
# Metadata beside the weights: where training stands (a state saved mid-epoch also has the steps done in the next
# epoch, step_in_epoch), the training time so far (elapsed_s: a resumed run's clock goes on from it), and the clip it
# trains on (frames, crop side), which task=export takes as its default input.
META_KEYS = ("epoch", "step", "step_in_epoch", "best_top1", "clip_num_frames", "clip_crop_size", "elapsed_s")
# The state saved when a signal stopped the training (x3d_exp.engine.interrupt); removed by the next epoch checkpoint,
# so when present it is the newest state.
INTERRUPT_CKPT = "interrupted.ckpt"


@contextmanager
def disk_room(path: Path, *leftovers: Path, size: Optional[int] = None):
    """Writing `path` (`size` bytes, when known): a full disk becomes `NoSpace`, one line naming the file and what is
    free, after the write's `leftovers` (its temporary files) are removed, which gives the space back for the job to
    record its end.
    `NoSpace.run_dir` is the run dir when `path` is in its checkpoints/ folder, which makes the error resumable."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        for leftover in leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        in_run = path.parent.name == "checkpoints"
        needed = f"{size / 1e6:.0f} MB needed, " if size else ""
        raise NoSpace(f"no space left on the disk of {path.parent} to write {path.name} ({needed}{free / 1e6:.0f} MB "
                      f"free): free space there{' or lower trainer.keep_last' if in_run else ''}; the files "
                      f"written before are complete", run_dir=path.parent.parent if in_run else None) from None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with disk_room(path, tmp, size=len(text.encode())):
        tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint_atomic(train_network: nn.Cell, path: Path, extra: dict) -> Path:
    """Write the whole training state (weights, optimizer moments, its step counter that positions the lr) to a
    temporary name, then rename: a killed process never leaves a half-written checkpoint under a final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_checkpoint appends ".ckpt" to any other suffix, so the temporary name must end in .ckpt itself.
    tmp = path.with_name(f".{path.stem}.partial.ckpt")
    # MindSpore itself writes to the name with .tmp for .ckpt, and leaves that file behind when the disk is full.
    with disk_room(path, tmp, tmp.with_suffix(".tmp"), size=float32_bytes(train_network.get_parameters())):
        ms.save_checkpoint(train_network, str(tmp), append_dict=dict(extra))
    os.replace(tmp, path)
    return path


def float32_bytes(params) -> int:
    return 4 * sum(int(p.size) for p in params)


def checkpoint_bytes(network: nn.Cell) -> int:
    """The size of one task=train checkpoint of `network`: its float32 parameters (BatchNorm's statistics included)
    and two optimizer copies of each trainable one (SGD's accum and stat, AdamW's two moments)."""
    return float32_bytes(network.get_parameters()) + 2 * float32_bytes(network.trainable_params())


def disk_need(network: nn.Cell, keep_last: int) -> int:
    """The most a training's run dir holds at once: trainer.keep_last epoch checkpoints, the next one while it is
    written, best.ckpt, an interrupted.ckpt until the next epoch checkpoint replaces it, and at the end the trained
    model's weights with their staging copy."""
    return (int(keep_last) + 3) * checkpoint_bytes(network) + 2 * float32_bytes(network.get_parameters())


def epoch_checkpoints(ckpt_dir: Path) -> List[Path]:
    """Complete per-epoch checkpoints in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := EPOCH_CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def resumable_checkpoints(ckpt_dir: Path) -> List[Path]:
    """The states a resume can start from, oldest first: the epoch checkpoints, then an interrupted one."""
    interrupted = ckpt_dir / INTERRUPT_CKPT
    return epoch_checkpoints(ckpt_dir) + ([interrupted] if interrupted.is_file() else [])


def newest_unfinished_run(outputs: Path, exclude: Path) -> Optional[Tuple[Path, int, int]]:
    """(run dir, last saved epoch, planned epochs) of the most recently checkpointed run in Hydra's default layout
    `outputs/<date>/<time>/` whose checkpoints stop short of its trainer.epochs; None if there is none."""
    candidates = []
    for ckpt_dir in outputs.glob("*/*/checkpoints"):
        run = ckpt_dir.parent
        found = epoch_checkpoints(ckpt_dir)
        if run.resolve() == exclude.resolve() or not found:
            continue
        try:
            planned = int(OmegaConf.load(run / ".hydra" / "config.yaml").trainer.epochs)
        except Exception:  # not a run of ours, or its config is unreadable: not a candidate
            continue
        last = int(EPOCH_CKPT.match(found[-1].name).group(1))
        if last < planned:
            candidates.append((found[-1].stat().st_mtime, run, last, planned))
    return max(candidates, key=lambda c: c[0])[1:] if candidates else None


def resolve_resume(setting, run_dir: Path):
    """(directory the run writes to, checkpoint to resume from or None) for `resume=false|auto|PATH`.

    A resumed run keeps writing into the directory of the checkpoint it resumes, next to its MLflow run id.
    """
    if setting in (False, None, "false", "False"):
        return run_dir, None
    if setting == "auto":
        found = resumable_checkpoints(run_dir / "checkpoints")
        if not found:
            hint = ""
            unfinished = newest_unfinished_run(run_dir.parent.parent, exclude=run_dir)
            if unfinished:
                hint = (f"; the newest unfinished run next to it is {unfinished[0]} (epoch {unfinished[1]} of "
                        f"{unfinished[2]}): resume={unfinished[0]} continues that one")
            print(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch{hint}")
            return run_dir, None
        return run_dir, found[-1]
    path = Path(str(setting)).expanduser()
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = resumable_checkpoints(ckpt_dir)
        if not found:
            raise UserError(f"resume={setting}: no epochNNNN.ckpt or {INTERRUPT_CKPT} in {ckpt_dir}")
        path = found[-1]
    elif not path.is_file():
        raise UserError(f"resume={setting}: no such checkpoint or run directory")
    return path.resolve().parent.parent, path.resolve()


def restore_training_state(train_network: nn.Cell, path: Path) -> dict:
    """Load weights and optimizer state into the training cell; returns the saved epoch (the epochs completed), step,
    best top-1 and, for a state saved mid-epoch, the steps done in the next epoch (step_in_epoch)."""
    try:
        state = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as err:
        raise WeightsError(f"resume: {path} is not a readable checkpoint ({err})") from None
    missing = [k for k in ("epoch", "step") if k not in state]
    if missing:
        raise WeightsError(f"resume: {path} has no {', '.join(missing)} entry (not written by task=train)")
    meta = {k: state.pop(k).asnumpy().item() for k in META_KEYS if k in state}
    not_loaded, _ = ms.load_param_into_net(train_network, state)
    model_keys = [k for k in not_loaded if k.split(".", 1)[0] in ("stem", "stages", "head")]
    if model_keys:
        raise WeightsError(f"resume: {path} does not fit this model: {model_keys[0]} missing "
                           f"(+{len(model_keys) - 1} more); resume with the same model config")
    return meta


def trained_clip(params: Dict[str, np.ndarray]) -> Optional[Tuple[int, int]]:
    """(frames, crop side) of the clip a task=train checkpoint was trained on, None for other checkpoints."""
    if "clip_num_frames" not in params or "clip_crop_size" not in params:
        return None
    return int(np.asarray(params["clip_num_frames"]).item()), int(np.asarray(params["clip_crop_size"]).item())


def restore_best(network: nn.Cell, best_weights: Optional[Dict[str, np.ndarray]], ckpt_dir: Path) -> None:
    """The best validated weights: this session's copy in memory, else (a resumed run) best.ckpt, else the last."""
    if best_weights is not None:
        for param in network.get_parameters():
            param.set_data(ms.Tensor(best_weights[param.name]))
    elif (ckpt_dir / BEST_CKPT).is_file():
        ms.load_param_into_net(network, ms.load_checkpoint(str(ckpt_dir / BEST_CKPT)))
