"""Structured schema for the Hydra config, registered in Hydra's ConfigStore: every key and its default, once.

Types are checked by OmegaConf when the config is composed (so `model.gamma_d=abc`
fails naming the key); ranges are checked by `validate`, right after composition.

A new key is one line in its section's dataclass below (type, default, a comment saying what it does); the YAML
files (conf/) only hold what a group or preset changes. Code reads a key as an attribute (`cfg.prepare.short_side`)
and never repeats its default. A new section is a dataclass and one field of `Config`; a new task is one line in
`TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from x3d_exp.data.config import DataConfig, valid_num_workers
from x3d_exp.env import cache_root
from x3d_exp.errors import ConfigError

# X3D's six expansion factors: frames, frame rate, resolution, width, bottleneck, depth.
FACTORS = ("gamma_t", "gamma_tau", "gamma_s", "gamma_w", "gamma_b", "gamma_d")
# Sizes a model group may pin; null derives them from the factors (x3d_exp.models.x3d.X3DSpec).
CLIP_SIZES = ("num_frames", "sampling_rate", "crop_size", "test_crop_size", "train_scale")


@dataclass
class ModelConfig:
    # The values come from the model group (conf/model/*.yaml, equal to x3d_exp.models.VARIANTS by a test).
    name: str = MISSING
    gamma_t: float = MISSING
    gamma_tau: float = MISSING
    gamma_s: float = MISSING
    gamma_w: float = MISSING
    gamma_b: float = MISSING
    gamma_d: float = MISSING
    # Derived from the factors when null.
    num_frames: Optional[int] = None
    sampling_rate: Optional[int] = None
    crop_size: Optional[int] = None
    test_crop_size: Optional[int] = None
    train_scale: Optional[List[int]] = None
    dropout: float = 0.5
    # auto: the custom channelwise-conv kernels on the CPU when they build; native: nn.Conv3d.
    cpu_kernels: str = "auto"


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # Linear scaling: lr * (global batch / base_batch_size).
    scale_lr: bool = False
    base_batch_size: int = 256
    # Clip the gradients' global L2 norm to this (after the data-parallel mean); null: no clipping.
    clip_grad_norm: Optional[float] = None


@dataclass
class ScheduleConfig:
    name: str = "cosine_warmup"
    warmup_epochs: float = 2.0
    # null: a fixed fraction of optim.lr (1/10 and 1/1000), so switching optimizer or lr keeps the shape.
    warmup_start_lr: Optional[float] = None
    end_lr: Optional[float] = None
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class LauncherConfig:
    name: str = "local"
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    device: Optional[str] = None
    timeout: int = 3600


@dataclass
class TrainerConfig:
    # With 20 the synthetic default reaches 31 or 32 of its 32 test videos (96.9-100%, see README); real data wants
    # far more.
    epochs: int = 20
    eval_every: int = 1
    ckpt_every: int = 1
    keep_last: int = 2
    log_every: int = 10
    # PySlowFast's precise BN (its BN.USE_PRECISE_STATS; it uses 200): >0, before each validation and checkpoint the
    # BN running averages are replaced by the mean statistics of this many training batches under the current
    # weights (0: keep the running averages).
    precise_bn_batches: int = 0
    graph_mode: bool = True
    progress: str = "auto"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "x3d-exp"
    run_name: Optional[str] = None
    enabled: bool = True
    # MLflow's own CPU, memory, disk, network (and GPU where present) sampling, as system/* metrics, every
    # system_metrics_interval seconds.
    system_metrics: bool = False
    system_metrics_interval: float = 10.0
    # At the end of a job, how long to wait for the spool to reach an unreachable tracking server (docs/tracking.md).
    drain_timeout: float = 60.0
    # Register each train run's model as a new version of this registered model (null: do not register).
    registered_model: Optional[str] = None


@dataclass
class ConvertConfig:
    """task=convert: a PyTorch X3D checkpoint to a MindSpore .ckpt."""

    # the PyTorch checkpoint (.pyth, .pth, .pt)
    src: Optional[str] = None
    # null: src with the suffix .ckpt
    dst: Optional[str] = None
    # auto: told from the checkpoint's keys; else one of weights.CHECKPOINT_FORMATS
    format: str = "auto"


@dataclass
class InferConfig:
    """task=infer: classify video files with a trained checkpoint."""

    # the videos to classify: a list of paths, or one path
    inputs: Any = field(default_factory=list)
    # a file with one class name per line; null: the dataset annotation's names if readable, else indices only
    labels: Optional[str] = None
    # views per forward pass; null: data.eval_batch_size, else data.batch_size
    batch_size: Optional[int] = None
    # auto: a table when stdout is a terminal, JSON lines otherwise
    output: str = "auto"
    # seconds between windows labelled across each input (docs/inference.md); null: one label per video
    window_stride: Optional[float] = None
    # crops per window: 1 (centre) or 3 (the test protocol's)
    window_crops: int = 1
    # finished windows waiting for the network; null: two batches. A live input drops windows beyond it
    queue_size: Optional[int] = None


@dataclass
class ExportConfig:
    """task=export: the network with `ckpt`'s weights as a MINDIR or ONNX file, checked by running it."""

    # MINDIR or ONNX (any case)
    format: str = "MINDIR"
    # null: the ckpt's path without its suffix, else the model's name
    dst: Optional[str] = None
    # [N, 3, T, H, W]; null: one clip as the checkpoint was trained on it, [1, 3, T, crop, crop]
    input_shape: Optional[List[int]] = None
    # run the exported file and compare its outputs with the network's
    verify: bool = True
    # ONNX only: also log the file as an mlflow.onnx model of the checkpoint's run (else of a new run)
    log_model: bool = False


@dataclass
class PrepareConfig:
    """task=prepare: a dataset re-encoded to a smaller short side in a new root with the same layout."""

    # the dataset root to re-encode; null: data.root
    src: Optional[str] = None
    # the new root (same layout); null: <src>_<short_side>. Never equal to, inside or above src.
    dst: Optional[str] = None
    # videos with a larger short side are re-encoded to this (H.264, yuv420p); smaller ones and other files are copied
    short_side: int = 320
    # x264 quality (lower is better and larger) and speed preset
    crf: int = 23
    preset: str = "veryfast"
    # a keyframe at least every this many frames; null: x264's 250. 60 made a random X3D-XS training clip ~20%
    # cheaper to decode, the files 16% larger and a 10-clip test decode 7% slower (docs/performance.md).
    keyint: Optional[int] = None


@dataclass
class SyncConfig:
    """task=sync: deliver the MLflow records that jobs spooled while their tracking server was away."""

    # a run dir, or a folder whose run dirs (and sweep dirs) are all delivered; null: hydra.run.dir
    path: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    schedule: ScheduleConfig = MISSING
    launcher: LauncherConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    task: str = "train"
    seed: int = 0
    device: str = "auto"
    amp_level: str = "O0"
    ckpt: Optional[str] = None
    resume: Any = False
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    # A multirun's settings, free-form: the sweep presets (multirun_sweeps/sweep/*.yaml) bring their own keys, read
    # by the sweep callback (tracking.sweeps) and a search's sweeper (search.progressive.SearchSettings, which checks
    # them). Typed defaults here would add a dozen null sweep.* params to every single run's MLflow record.
    sweep: Any = field(default_factory=dict)
    sync: SyncConfig = field(default_factory=SyncConfig)


# task= -> "module:function" under x3d_exp.tasks, imported on use (x3d_exp.tasks.task_function), so
# `task=summary` loads no training code. Named as strings: this layer may not import the tasks.
TASKS = {"train": "train:task_train", "test": "train:task_test", "infer": "infer:task_infer",
         "summary": "model:task_summary", "convert": "model:task_convert", "export": "model:task_export",
         "prepare": "prepare:task_prepare", "sync": "sync:task_sync",
         "ui": "ui:task_ui"}
DEVICES = ("auto", "CPU", "GPU", "Ascend")
AMP_LEVELS = ("O0", "O1", "O2", "O3", "auto")


@dataclass(frozen=True)
class JobContext:
    """What Hydra knows about the running job, read once by the CLI (x3d_exp.cli) and passed down as plain values."""

    output_dir: Path = Path(".")
    task_overrides: Tuple[str, ...] = ()
    hydra_overrides: Tuple[str, ...] = ()
    config_name: str = "config"
    # Config directories given on the command line (--config-dir), which msrun's ranks must see too.
    config_dirs: Tuple[str, ...] = ()
    multirun: bool = False
    job_num: int = 0
    sweep_dir: Optional[Path] = None
    # The spool of the MLflow run an outer process opened for this job (the sweep job wrapper, the msrun
    # launcher); the job's Tracker logs into that run instead of creating its own.
    adopted_run: Optional[Path] = None


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)


# ${x3d_cache:synthetic}: a folder under the cache root the code uses too (x3d_exp.env.cache_root). Registered on
# import, so any process that reads our config (a Slurm job unpickling it, a test) can resolve it.
if not OmegaConf.has_resolver("x3d_cache"):
    OmegaConf.register_new_resolver("x3d_cache", lambda name: str(cache_root() / str(name)))
# ${x3d_or:${sweep.resume},<default>}: the value unless it is null (oc.select falls back only for a missing key).
if not OmegaConf.has_resolver("x3d_or"):
    OmegaConf.register_new_resolver("x3d_or", lambda value, default: default if value is None else value)


def _require(condition: bool, key: str, message: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {message}")


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express. Raises ConfigError naming the key."""
    _require(cfg.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", cfg.task)
    _require(cfg.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}", cfg.device)
    _require(cfg.amp_level in AMP_LEVELS, "amp_level", f"must be one of {', '.join(AMP_LEVELS)}", cfg.amp_level)
    for name in FACTORS:
        value = cfg.model[name]
        _require(value > 0, f"model.{name}", "must be > 0", value)
    for name in ("num_frames", "sampling_rate", "crop_size", "test_crop_size"):
        for group in ("model", "data"):
            value = cfg[group][name]
            _require(value is None or value >= 1, f"{group}.{name}", "must be >= 1", value)
    _require(cfg.data.spatial_scale > 0, "data.spatial_scale", "must be > 0", cfg.data.spatial_scale)
    _require(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)", cfg.model.dropout)
    _require(cfg.model.cpu_kernels in ("auto", "native", "custom"), "model.cpu_kernels",
             "must be auto, native or custom", cfg.model.cpu_kernels)
    _require(cfg.optim.lr > 0, "optim.lr", "must be > 0", cfg.optim.lr)
    _require(cfg.mlflow.drain_timeout >= 0, "mlflow.drain_timeout", "must be >= 0 (seconds)", cfg.mlflow.drain_timeout)
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0", cfg.optim.weight_decay)
    _require(cfg.optim.clip_grad_norm is None or cfg.optim.clip_grad_norm > 0, "optim.clip_grad_norm",
             "must be > 0 (or null: no clipping)", cfg.optim.clip_grad_norm)
    _require(cfg.optim.clip_grad_norm is None or cfg.amp_level in ("O0", "auto"), "optim.clip_grad_norm",
             "is not combined with amp_level O1-O3 (loss-scaled gradients) yet", cfg.optim.clip_grad_norm)
    _require(cfg.optim.name in ("sgd", "adamw"), "optim.name", "must be sgd or adamw", cfg.optim.name)
    _require(cfg.schedule.name in ("cosine_warmup", "multistep"), "schedule.name",
             "must be cosine_warmup or multistep", cfg.schedule.name)
    _require(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0", cfg.schedule.warmup_epochs)
    _require(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1", cfg.data.batch_size)
    _require(cfg.data.eval_batch_size is None or cfg.data.eval_batch_size >= 1, "data.eval_batch_size",
             "must be >= 1", cfg.data.eval_batch_size)
    _require(valid_num_workers(cfg.data.num_workers), "data.num_workers", "must be auto or a whole number >= 0",
             cfg.data.num_workers)
    _require(valid_num_workers(cfg.data.decode_threads, minimum=1), "data.decode_threads",
             "must be auto or a whole number >= 1", cfg.data.decode_threads)
    clips = cfg.data.train_clips_per_video
    _require(clips >= 1, "data.train_clips_per_video", "must be >= 1", clips)
    _require(cfg.data.batch_size % clips == 0, "data.train_clips_per_video",
             f"must divide data.batch_size={cfg.data.batch_size} (a batch holds the clips of whole videos)", clips)
    _require(cfg.data.num_classes is None or cfg.data.num_classes >= 1, "data.num_classes",
             "must be >= 1 (or null: the dataset's own count)", cfg.data.num_classes)
    _require(0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]",
             cfg.data.max_bad_fraction)
    _require(cfg.data.test_num_clips >= 1, "data.test_num_clips", "must be >= 1", cfg.data.test_num_clips)
    _require(cfg.data.test_num_crops in (1, 3), "data.test_num_crops", "must be 1 or 3", cfg.data.test_num_crops)
    _require(cfg.trainer.epochs >= 1, "trainer.epochs", "must be >= 1", cfg.trainer.epochs)
    for name in ("eval_every", "ckpt_every", "keep_last", "log_every"):
        _require(cfg.trainer[name] >= 1, f"trainer.{name}", "must be >= 1", cfg.trainer[name])
    _require(cfg.trainer.precise_bn_batches >= 0, "trainer.precise_bn_batches", "must be >= 0",
             cfg.trainer.precise_bn_batches)
    _require(cfg.launcher.nproc >= 1, "launcher.nproc", "must be >= 1", cfg.launcher.nproc)
    _require(cfg.task != "test" or bool(cfg.ckpt), "ckpt", "task=test needs ckpt=PATH (a .ckpt written by "
             "task=train or task=convert)", cfg.ckpt)


def input_sizes(cfg: DictConfig, spec) -> dict:
    """The clip the loader produces: the model's own sizes (`spec`, an X3DSpec), the spatial ones times
    data.spatial_scale, unless the data group sets them."""
    scale = float(cfg.data.spatial_scale)
    derived = {"num_frames": spec.num_frames, "sampling_rate": spec.sampling_rate,
               "crop_size": max(8, round(spec.crop_size * scale)),
               "test_crop_size": max(8, round(spec.test_crop_size * scale)),
               "train_scale": [max(8, round(side * scale)) for side in spec.train_scale]}
    sizes = {}
    for key in CLIP_SIZES:
        value = cfg.data[key] if cfg.data[key] is not None else derived[key]
        sizes[key] = [int(v) for v in value] if key == "train_scale" else int(value)
    return sizes


def train_clip(sizes: dict) -> list:
    """[C, T, H, W] of a training clip with these loader sizes."""
    return [3, sizes["num_frames"], sizes["crop_size"], sizes["crop_size"]]


def flatten(cfg: DictConfig) -> dict:
    """Resolved config as {"model.gamma_w": 1.0, ...}, lists kept as one value."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            out[prefix] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out
