"""Schema of the `data` config group."""

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class SyntheticConfig:
    """Sizes of the generated default dataset (see x3d_exp.data.synthetic)."""

    num_classes: int = 4
    train_per_class: int = 48
    val_per_class: int = 8
    test_per_class: int = 8
    # 160 frames: X3D-L's span (16 frames x stride 5) with gamma_t expanded once more.
    frames: int = 160
    # auto: the short side the clip needs (the largest training scale or test crop), rounded up to a multiple of
    # 32; each size is generated once into its own folder under data.root.
    size: Any = "auto"
    fps: int = 30
    seed: int = 0
    # Per video, drawn from these ranges: the square's side and its speed, as fractions of the frame (per frame).
    object_size: List[float] = field(default_factory=lambda: [0.5, 0.6])
    speed: List[float] = field(default_factory=lambda: [0.004, 0.0055])


@dataclass
class DataConfig:
    name: str = "synthetic"
    # The layout read (x3d_exp.data.datasets): kinetics (official CSV or the PySlowFast `path label` lists) | ucf101 |
    # hmdb51 | ssv2 | folder | synthetic (generated, read as kinetics) (docs/data.md)
    format: str = "synthetic"
    root: Optional[str] = None
    # Prefix of the official Kinetics CSVs: kinetics-400_{train,val,test}.csv
    annotation_prefix: str = "kinetics-400"
    # null: the annotation's own class count (data=folder: its class folders), filled in before the run starts.
    num_classes: Optional[int] = 400
    # Folders of the annotation files and of the videos (hmdb51, ssv2), relative to data.root or absolute; null:
    # data.root itself.
    annotation_dir: Optional[str] = None
    video_dir: Optional[str] = None
    # data=folder: train/val/test fractions of each class, and where the split lists are written (null: ROOT/splits).
    split_fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    splits_dir: Optional[str] = None
    split: int = 1
    # The annotation the test split reads: test, or val (what the X3D paper and the Kinetics results report). A copy
    # without a test annotation tests on val with one warning.
    test_split: str = "test"
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    # "auto": one decoding process per core, at most 8; a number above the cores is clamped (x3d_exp.data.loader).
    num_workers: Any = "auto"
    # ffmpeg threads per video reader, or "auto": the cores the decoding processes leave idle (all of them with 0 or
    # 1 worker, 1 when the workers fill the cores). 1: two threads measured no faster on 2 shared cores
    # (docs/performance.md).
    decode_threads: Any = 1
    # decord | pyav: the backend that decodes training and test clips (x3d_exp.data.decoders). decord seeks to the
    # keyframe before each clip; pyav decodes each file forward from its start.
    decoder: str = "decord"
    # K clips from one decode of a training video, each augmented on its own (PySlowFast's AUG.NUM_SAMPLE): an epoch
    # has K x videos clips; data.batch_size counts clips and must be a multiple of K.
    train_clips_per_video: int = 1
    prefetch: int = 2
    target_fps: int = 30
    test_num_clips: int = 10
    test_num_crops: int = 3
    max_bad_fraction: float = 0.05
    # The clip follows the model: frames, sampling rate and crops derive from its factors (x3d_exp.models.X3DSpec).
    # spatial_scale multiplies the derived crops and scale jitter (not a size given below), so a cheap proxy task
    # keeps the model's resolution ratios: 0.4 trains X3D-XS at 64 px and gamma_s=2 at 90 px.
    spatial_scale: float = 1.0
    # Random horizontal flip of training clips; off where left and right are different classes (ssv2).
    train_flip: bool = True
    # Optional overrides of the model's input sizes (null: take the model's own).
    num_frames: Optional[int] = None
    sampling_rate: Optional[int] = None
    crop_size: Optional[int] = None
    test_crop_size: Optional[int] = None
    train_scale: Optional[List[int]] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


def valid_num_workers(value, minimum: int = 0) -> bool:
    """`data.num_workers` is "auto" or a whole number >= 0, `data.decode_threads` "auto" or >= 1 (checked by
    config.validate and by the loader)."""
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum)
