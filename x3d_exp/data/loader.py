"""`build_loader`: annotation -> GeneratorDataset of decoded, augmented clips, batched.

Randomness never depends on which worker process handles a sample: every sample draws from a generator seeded
with (seed, epoch, video, attempt). The epoch reaches the workers inside the sample index itself: the training
sampler emits `epoch * num_videos + video`.

A video is decoded once per use: a training sample is the `data.train_clips_per_video` clips of one decode, and the
eval rows are ordered so that one worker process gets all the views of a video (MindSpore hands the rows to its
workers in turn, see `EvalSource`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore.dataset as ds
import numpy as np

from x3d_exp.data.datasets import VideoList, dataset_layout, load_split
from x3d_exp.data.badlog import BadVideoLog
from x3d_exp.data.config import valid_num_workers
from x3d_exp.data.decoders import DECODERS
from x3d_exp.data.transforms import normalise, test_crops, train_crop, view_crop
from x3d_exp.data.video import BadVideo, probe_size, read_clips, resize_frames, short_side_size
from x3d_exp.errors import DataError

# A training slot whose video is bad takes another video; this many bad draws in a row means the data is broken.
MAX_ATTEMPTS = 20
# data.num_workers=auto: one decoding process per core, at most PySlowFast's default DATA_LOADER.NUM_WORKERS.
MAX_AUTO_WORKERS = 8

log = logging.getLogger("x3d_exp.data")
_clamp_warned = set()


def usable_cores() -> int:
    """The cores this process may run on (MindSpore refuses more dataset workers than the machine has)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(os.cpu_count() or 1, affinity or 1))


def resolve_num_workers(setting) -> int:
    """`data.num_workers`: "auto" is one per usable core, at most 8; a number above the cores is clamped to them,
    with one warning line per process; 0 decodes in the training process."""
    if not valid_num_workers(setting):
        raise DataError(f"data.num_workers={setting!r}: must be auto or a whole number >= 0")
    cores = usable_cores()
    if setting == "auto":
        return min(cores, MAX_AUTO_WORKERS)
    if setting > cores:
        if setting not in _clamp_warned:
            _clamp_warned.add(setting)
            log.warning("data.num_workers=%d is more than this machine's %d cores: using %d", setting, cores, cores)
        return cores
    return setting


def _pipeline_message(text: str) -> str:
    """The user's exception out of MindSpore's multi-section dataset error (it puts it at the end of the Python
    stack it quotes), else the pipeline's own first message."""
    raised = re.findall(r"^(\w+(?:Error|Exception|Exit)\b:?.*)$", text, re.MULTILINE)
    if raised:
        return raised[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"-"}]
    return next((line for line in lines if line.startswith("[ERROR]")), lines[0] if lines else text)


@contextmanager
def pipeline_errors(what: str):
    """Turn a failure of MindSpore's dataset pipeline while `what` runs (building or iterating a loader) into one
    DataError line; a traceback of C++ and Python stacks tells a user nothing about their data."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as err:
        text = str(err)
        if not any(marker in text for marker in ("dataset", "Dataset", "num_parallel_workers")):
            raise
        message = _pipeline_message(text)
        if "num_parallel_workers" in text:
            message = f"data.num_workers: {message}"
        raise DataError(f"{what}: {message}") from None


@dataclass(frozen=True)
class ClipSpec:
    num_frames: int
    sampling_rate: int
    crop_size: int
    test_crop_size: int
    train_scale: Tuple[int, int]
    target_fps: float
    num_clips: int  # temporal clips per video (test split)
    num_crops: int  # spatial crops per clip (test split)
    train_flip: bool = True  # off where left and right are different classes (data.train_flip)
    decode_threads: int = 1  # ffmpeg threads per reader
    decoder: str = "decord"  # data.decoder: a key of x3d_exp.data.decoders.DECODERS


def train_clips(path: str, spec: ClipSpec, rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` independently augmented training clips [count, 3, T, crop, crop] float32 of one decode: each has its
    own window, short side in train_scale, crop and flip. Raises BadVideo.

    The reader resizes to the largest of the drawn sizes; each other clip's crop window is cut from it and scaled
    down to the crop (bilinear), which costs far less than opening and decoding the video again.
    """
    sides = [max(int(rng.integers(spec.train_scale[0], spec.train_scale[1] + 1)), spec.crop_size)
             for _ in range(count)]
    positions = [float(rng.random()) for _ in range(count)]
    clips = read_clips(path, max(sides), positions, num_frames=spec.num_frames, sampling_rate=spec.sampling_rate,
                       target_fps=spec.target_fps, num_threads=spec.decode_threads, decoder=spec.decoder)
    height, width = probe_size(path)
    windows = [train_crop(clip, spec.crop_size, rng, spec.train_flip, short_side_size(height, width, side))
               for clip, side in zip(clips, sides)]
    return normalise(np.stack([resize_frames(window, spec.crop_size, spec.crop_size) for window in windows]))


def eval_clips(path: str, spec: ClipSpec, num_clips: int) -> np.ndarray:
    """Clips [num_clips, T, h, w, 3] uint8, short side S (the test crop), spread uniformly over the video."""
    positions = [(i + 0.5) / num_clips for i in range(num_clips)]
    return read_clips(path, spec.test_crop_size, positions, num_frames=spec.num_frames,
                      sampling_rate=spec.sampling_rate, target_fps=spec.target_fps, num_threads=spec.decode_threads,
                      decoder=spec.decoder)


def eval_views(path: str, spec: ClipSpec, num_clips: int, num_crops: int) -> np.ndarray:
    """Views [num_clips * num_crops, 3, T, S, S] float32 (S = test crop): clips spread uniformly over the video,
    each cut into `num_crops` crops of the frame resized to short side S. Raises BadVideo."""
    return normalise(test_crops(eval_clips(path, spec, num_clips), spec.test_crop_size, num_crops))


class TrainSource:
    """Random-access source of (clip, label); index = epoch * num_videos + video.

    With `clips_per_video` K > 1 a sample is K clips of one decode, (clip [K, 3, T, crop, crop], label [K]), and
    `flatten_clips` turns the batch of videos into a batch of clips.
    """

    def __init__(self, videos: VideoList, spec: ClipSpec, seed: int, badlog: BadVideoLog, clips_per_video: int = 1):
        self.paths, self.labels = videos.paths, videos.labels
        self.spec, self.seed, self.badlog, self.clips_per_video = spec, seed, badlog, clips_per_video

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        epoch, video = divmod(int(index), len(self.paths))
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, epoch, video, attempt])
            # A bad video's slot is refilled by a video drawn from the same seeded generator, so the
            # replacement is the same in every run and whichever worker meets the bad file.
            candidate = video if attempt == 0 else int(rng.integers(len(self.paths)))
            path = self.paths[candidate]
            if path in self.badlog:
                continue
            try:
                clips = train_clips(path, self.spec, rng, self.clips_per_video)
            except BadVideo as bad:
                self.badlog.record(path, bad.reason)
                continue
            label = np.int32(self.labels[candidate])
            if self.clips_per_video == 1:
                return clips[0], label
            return clips, np.full(self.clips_per_video, label)
        raise DataError(f"{MAX_ATTEMPTS} bad videos in a row while filling training slot {video}; "
                        f"see {self.badlog.path}")


def flatten_clips(clips: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A batch of videos' clips [B/K, K, ...] and labels [B/K, K] as one batch of B clips (a view, no copy)."""
    return clips.reshape(-1, *clips.shape[2:]), labels.reshape(-1)


class EvalSource:
    """Random-access source of (clip, label, video_index), `views` rows per video, padded to full batches.

    MindSpore hands row r to worker r % workers, so the rows of `workers` videos are interleaved: row
    (g * views + view) * workers + w is view `view` of video slot g * workers + w, and each video's views all go to
    one worker, which decodes the video once and cuts every view from the cached clips. With one worker (or one view)
    this is the plain order, each video's views consecutive. Padding rows (including the missing videos of a last
    group) and the rows of bad videos carry video_index -1 and an all-zero clip.
    """

    def __init__(self, videos: VideoList, video_ids: np.ndarray, spec: ClipSpec, num_clips: int, num_crops: int,
                 batch_size: int, badlog: BadVideoLog, workers: int = 1):
        self.paths, self.labels, self.video_ids = videos.paths, videos.labels, video_ids
        self.spec, self.num_clips, self.num_crops = spec, num_clips, num_crops
        self.views, self.badlog = num_clips * num_crops, badlog
        self.group = max(1, workers) if self.views > 1 else 1
        rows = math.ceil(len(video_ids) / self.group) * self.group * self.views
        self.rows = math.ceil(rows / batch_size) * batch_size
        size = spec.test_crop_size
        self.blank = np.zeros((3, spec.num_frames, size, size), np.float32)
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)  # (video, its uint8 clips or None if bad)

    def __len__(self) -> int:
        return self.rows

    def row_view(self, row: int) -> Tuple[int, int]:
        """(video slot, view) of a row; slots past the last video are padding."""
        group, rest = divmod(row, self.group * self.views)
        view, member = divmod(rest, self.group)
        return group * self.group + member, view

    def _video_clips(self, video: int) -> Optional[np.ndarray]:
        if self._cached[0] != video:
            path = self.paths[video]
            clips = None
            if path not in self.badlog:
                try:
                    clips = eval_clips(path, self.spec, self.num_clips)
                except BadVideo as bad:
                    self.badlog.record(path, bad.reason)
            self._cached = (video, clips)
        return self._cached[1]

    def __getitem__(self, index):
        slot, view = self.row_view(int(index))
        if slot >= len(self.video_ids):
            return self.blank, np.int32(0), np.int32(-1)
        video = int(self.video_ids[slot])
        label = np.int32(self.labels[video])
        clips = self._video_clips(video)
        if clips is None:
            return self.blank, label, np.int32(-1)
        clip, crop = divmod(view, self.num_crops)
        return normalise(view_crop(clips[clip], self.spec.test_crop_size, self.num_crops, crop)), label, \
            np.int32(video)


class EpochSampler(ds.Sampler):
    """A fresh seeded permutation of all videos each epoch, cut into equal shards (wrapping to fill the last).

    With `skip`, every epoch leaves out its first `skip` samples: the rest of an epoch that a resumed run had partly
    trained. The order is the same from there on, so the remaining batches hold the same videos, with the same
    augmentation, as in an uninterrupted run. (MindSpore insists that every epoch yield `num_samples`, so a partial
    epoch needs a sampler, and a pipeline, of its own.)
    """

    def __init__(self, num_videos: int, seed: int, shard_id: int, num_shards: int, skip: int = 0):
        self.per_shard = math.ceil(num_videos / num_shards)
        super().__init__(num_samples=self.per_shard - skip)
        self.num_videos, self.seed, self.shard_id, self.num_shards = num_videos, seed, shard_id, num_shards
        self.epoch = 0
        self.skip = skip

    def __deepcopy__(self, memo):
        # MindSpore deep-copies the pipeline for every iterator; sharing the sampler keeps the epoch count going
        # when the engine makes a new iterator per epoch.
        return self

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_videos)
        order = np.resize(order, self.per_shard * self.num_shards)[self.shard_id::self.num_shards]
        return iter((order[self.skip:] + epoch * self.num_videos).tolist())


class Loader:
    """What the engine gets from `build_loader`; see x3d_exp.data for the contract."""

    def __init__(self, dataset, split: str, num_videos: int, class_names: List[str], badlog: BadVideoLog,
                 max_bad_fraction: float, sampler: Optional[EpochSampler] = None, annotation: str = "",
                 root: str = "", paths: Sequence[str] = ()):
        self.dataset = dataset
        self.split = split
        self.annotation = annotation  # the file this split's video list came from
        self.root = root  # the folder its paths are resolved in
        self.paths = paths  # every video of the split, in annotation order (a PathTable)
        self.num_videos = num_videos
        self.class_names = class_names
        self.max_bad_fraction = max_bad_fraction
        self.steps_per_epoch = dataset.get_dataset_size()
        self._badlog = badlog
        self._sampler = sampler

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def bad_log_path(self) -> str:
        return self._badlog.path

    def bad_videos(self) -> Dict[str, str]:
        """{path: reason} of the distinct bad files met so far by any worker of this split and shard."""
        return self._badlog.read()

    def check_bad_fraction(self) -> None:
        bad = self.bad_videos()
        if len(bad) > self.max_bad_fraction * self.num_videos:
            path, reason = next(iter(bad.items()))
            raise DataError(f"{len(bad)} of {self.num_videos} {self.split} videos are bad, more than "
                            f"data.max_bad_fraction={self.max_bad_fraction}: e.g. {path} ({reason}); "
                            f"all listed in {self.bad_log_path}")

    def set_epoch(self, epoch: int) -> None:
        """Continue the training order and augmentation at `epoch` (for resuming); eval splits ignore it."""
        if self._sampler is not None:
            self._sampler.epoch = epoch


def resolve_root(data_cfg, min_size: int = 0) -> Path:
    """The dataset folder; a generated layout (synthetic) makes its videos here, at a short side >= `min_size`."""
    return dataset_layout(data_cfg).root(data_cfg, min_size)


def resolve_num_classes(data_cfg) -> int:
    """`data.num_classes`, or when it is null the class count of the dataset's annotation (data=folder: of its
    class folders, whose split this writes if it is not written yet)."""
    if data_cfg.num_classes is not None:
        return int(data_cfg.num_classes)
    return len(load_split(data_cfg, resolve_root(data_cfg), "train").class_names)


def _default_bad_log_dir() -> str:
    path = tempfile.mkdtemp(prefix="x3d_exp_bad_videos_")
    owner = os.getpid()

    def remove():
        # Only the process that made the folder removes it, should a forked worker ever run atexit hooks.
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def _clips_per_video(data_cfg, batch_size: int) -> int:
    """`data.train_clips_per_video` (K): a training batch of B clips holds B/K videos, so K must divide B."""
    count = int(data_cfg.train_clips_per_video)
    if count < 1:
        raise DataError(f"data.train_clips_per_video={count}: must be >= 1")
    if batch_size % count:
        raise DataError(f"data.train_clips_per_video={count} must divide data.batch_size={batch_size} "
                        f"(a batch holds the clips of whole videos)")
    return count


def decode_threads(setting, workers: int) -> int:
    """`data.decode_threads`: ffmpeg threads per reader; "auto" is the cores the decoding processes leave idle
    (0 workers decode in a thread of the main process, so that counts as one process)."""
    if not valid_num_workers(setting, minimum=1):
        raise DataError(f"data.decode_threads={setting!r}: must be auto or a whole number >= 1")
    return max(1, usable_cores() // max(1, workers)) if setting == "auto" else setting


def checked_decoder(name) -> str:
    """`data.decoder`: one of x3d_exp.data.decoders.DECODERS."""
    if name not in DECODERS:
        raise DataError(f"data.decoder={name}: must be one of {', '.join(DECODERS)}")
    return name


def _check_sizes(num_frames, sampling_rate, crop_size, test_crop_size, train_scale) -> Tuple[int, int]:
    for key, value in (("num_frames", num_frames), ("sampling_rate", sampling_rate), ("crop_size", crop_size),
                       ("test_crop_size", test_crop_size)):
        if int(value) < 1:
            raise DataError(f"data.{key}={value}: must be >= 1")
    scale = [int(s) for s in train_scale]
    if len(scale) != 2 or not 1 <= scale[0] <= scale[1]:
        raise DataError(f"data.train_scale={scale}: must be [min, max] short-side sizes with min <= max")
    return scale[0], scale[1]


def build_loader(data_cfg, split: str, *, num_frames: int, sampling_rate: int, crop_size: int,
                 test_crop_size: int, train_scale: Sequence[int], seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1, bad_log_dir: Optional[str] = None, batch_size: Optional[int] = None,
                 drop_remainder: Optional[bool] = None, skip_batches: int = 0) -> Loader:
    """The batched dataset of one split. Raises DataError for any problem with the data's location or annotation.

    train: ("clip" [B,3,T,crop,crop] float32, "label" [B] int32), a new seeded order and augmentation per epoch.
    val:   ("clip" [B,3,T,S,S], "label", "video_index" [B] int32), the centre clip's centre crop, S = test crop.
    test:  the same columns, one row per view: test_num_clips x test_num_crops consecutive rows per video.
    Eval splits are padded to whole batches; padding and bad videos have video_index -1.
    `skip_batches` (train): each epoch without its first batches, for the rest of an epoch a resumed run had partly
    trained (EpochSampler).
    """
    if not 0 <= shard_id < num_shards:
        raise DataError(f"shard_id={shard_id}: must be in [0, num_shards={num_shards})")
    scale = _check_sizes(num_frames, sampling_rate, crop_size, test_crop_size, train_scale)
    root = resolve_root(data_cfg, max(scale[1], int(test_crop_size)))
    videos = load_split(data_cfg, root, split)
    training = split == "train"
    if batch_size is None:
        batch_size = data_cfg.batch_size if training else (data_cfg.eval_batch_size or data_cfg.batch_size)
    batch_size = int(batch_size)
    clips_per_video = _clips_per_video(data_cfg, batch_size) if training else 1
    workers = resolve_num_workers(data_cfg.num_workers)
    spec = ClipSpec(int(num_frames), int(sampling_rate), int(crop_size), int(test_crop_size), scale,
                    float(data_cfg.target_fps), int(data_cfg.test_num_clips), int(data_cfg.test_num_crops),
                    train_flip=bool(data_cfg.train_flip),
                    decode_threads=decode_threads(data_cfg.decode_threads, workers),
                    decoder=checked_decoder(data_cfg.get("decoder", "decord")))
    if drop_remainder is None:
        drop_remainder = training
    if bad_log_dir:
        os.makedirs(bad_log_dir, exist_ok=True)
    log_dir = str(bad_log_dir) if bad_log_dir else _default_bad_log_dir()
    badlog = BadVideoLog(os.path.join(log_dir, f"bad_videos_{split}_shard{shard_id}of{num_shards}.jsonl"))

    sampler = None
    if training:
        sampler = EpochSampler(len(videos), seed, shard_id, num_shards, skip_batches * batch_size // clips_per_video)
        num_videos = sampler.per_shard
        if drop_remainder and num_videos * clips_per_video < batch_size:
            raise DataError(f"{videos.annotation}: {num_videos} training videos per shard x "
                            f"data.train_clips_per_video={clips_per_video} clips, fewer than "
                            f"data.batch_size={batch_size}")
        source = TrainSource(videos, spec, seed, badlog, clips_per_video)
        columns = ["clip", "label"]
    else:
        video_ids = np.arange(shard_id, len(videos), num_shards, dtype=np.int64)
        num_videos = len(video_ids)
        num_clips, num_crops = (spec.num_clips, spec.num_crops) if split == "test" else (1, 1)
        source = EvalSource(videos, video_ids, spec, num_clips, num_crops, batch_size, badlog, max(1, workers))
        columns = ["clip", "label", "video_index"]

    # Rows buffered ahead between pipeline stages (a global MindSpore setting: the last loader built sets it); a
    # training row holds K clips.
    ds.config.set_prefetch_size(max(1, max(1, int(data_cfg.prefetch)) * batch_size // clips_per_video))
    with pipeline_errors(f"the {split} loader of {videos.annotation}"):
        dataset = ds.GeneratorDataset(source, column_names=columns, sampler=sampler,
                                      shuffle=None if training else False, num_parallel_workers=max(1, workers),
                                      python_multiprocessing=workers > 0)
        if clips_per_video > 1:
            # A row is one video's K clips: batch B/K videos, then hand the model B clips.
            dataset = dataset.batch(batch_size // clips_per_video, drop_remainder=bool(drop_remainder))
            dataset = dataset.map(flatten_clips, input_columns=columns)
        else:
            dataset = dataset.batch(batch_size, drop_remainder=bool(drop_remainder))
    return Loader(dataset, split, num_videos, videos.class_names, badlog, float(data_cfg.max_bad_fraction), sampler,
                  videos.annotation, str(root), videos.paths)


def load_video_views(path, *, num_frames: int, sampling_rate: int, test_crop_size: int, num_clips: int,
                     num_crops: int, target_fps: float = 30, decoder: str = "decord") -> np.ndarray:
    """All test views [num_clips * num_crops, 3, T, S, S] float32 of one file (task=infer). Raises DataError."""
    spec = ClipSpec(int(num_frames), int(sampling_rate), int(test_crop_size), int(test_crop_size),
                    (int(test_crop_size), int(test_crop_size)), float(target_fps), int(num_clips), int(num_crops),
                    decoder=checked_decoder(decoder))
    try:
        return eval_views(str(path), spec, spec.num_clips, spec.num_crops)
    except BadVideo as bad:
        raise DataError(f"{path}: {bad.reason}") from None
