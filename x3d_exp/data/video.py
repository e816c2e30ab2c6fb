"""Clips from video files: only the frames a clip needs, already resized by the decoder (decord or PyAV, behind
x3d_exp.data.decoders, chosen by `data.decoder`).

Resizing inside the decoder (`VideoReader(width=, height=)`, ffmpeg's scaler on each returned frame) measured faster
than decoding at full size and resizing in numpy (figures in docs/data.md), but it needs the frame size before the
reader is opened; a PyAV header probe gives it for ~3 ms and is cached per process. The codec itself still decodes
at full resolution: H.264 has no reduced-resolution decoding (ffmpeg's `lowres` covers only MPEG-1/2/4 part 2 and
MJPEG, and decord does not expose it), so what the resize saves is the RGB conversion of full-size frames.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Optional, Sequence, Tuple

import av
import mindspore.dataset.vision as vision
import numpy as np

from x3d_exp.data.decoders import FrameReader, open_decoder

# decord 0.6.0 fails ("DECORDArrayCopyFromTo: The size must exactly match") on frames of exactly these widths,
# resized or native (found by trying every width up to 1300): such frames are decoded one column wider instead.
_DECORD_BAD_WIDTHS = frozenset({2, 3, 4, 6, 8, 12, 16, 24, 48, 72})


class BadVideo(Exception):
    """A file that cannot give a clip; `reason` is a short human explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _first_line(err: BaseException) -> str:
    """The gist of a decoder error: its first line, without decord's `[12:00:00] /src/file.cc:83: ` prefix."""
    text = (getattr(err, "strerror", None) or str(err)).strip()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0] if text else "")
    return text[:200] or type(err).__name__


@functools.lru_cache(maxsize=1 << 17)
def probe_size(path: str) -> Tuple[int, int]:
    """(height, width) of the first video stream, from the container header."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadVideo("missing file") from None
    except OSError as err:
        raise BadVideo(f"cannot stat: {_first_line(err)}") from None
    if size == 0:
        raise BadVideo("empty file (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadVideo("no video stream (zero frames)")
            codec = container.streams.video[0].codec_context
            height, width = codec.height, codec.width
    except BadVideo:
        raise
    except Exception as err:  # any container failure means the file is unusable, whatever ffmpeg calls it
        raise BadVideo(f"not a readable video: {_first_line(err)}") from None
    if height <= 0 or width <= 0:
        raise BadVideo(f"invalid frame size {width}x{height}")
    return height, width


def short_side_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(h, w) with the shorter side equal to `short_side` and the aspect ratio kept."""
    if height <= width:
        return short_side, max(short_side, int(round(width * short_side / height)))
    return max(short_side, int(round(height * short_side / width))), short_side


def clip_frame_indices(video_frames: int, video_fps: float, num_frames: int, sampling_rate: int,
                       target_fps: float, position: float) -> np.ndarray:
    """Frame indices of one clip, PySlowFast style.

    A clip covers `num_frames * sampling_rate` frames of a `target_fps` video, so in this video the step is
    `sampling_rate * video_fps / target_fps` frames. `position` in [0, 1] places the window between the first
    and the last possible start. A video shorter than the window loops.
    """
    step = sampling_rate * video_fps / target_fps
    delta = max(video_frames - step * num_frames, 0.0)
    start = delta * position
    return np.floor(start + step * np.arange(num_frames)).astype(np.int64) % video_frames


def open_reader(path: str, width: int, height: int, num_threads: int, decoder: str = "decord") -> FrameReader:
    """The one place a clip reader is opened (a decord open indexes every packet of the file, ~5 ms for a 10 s clip;
    the tests count the calls to prove a video is opened once for all of its clips)."""
    return open_decoder(decoder, path, width, height, num_threads)


def count_frames(path: str) -> int:
    """The number of frames decord indexes in the file (no frame is decoded). Raises BadVideo."""
    probe_size(path)
    try:
        return len(open_reader(path, -1, -1, 1))
    except Exception as err:  # decord raises RuntimeError / DECORDError for broken streams
        raise BadVideo(f"decode failed: {_first_line(err)}") from None


@functools.lru_cache(maxsize=64)
def _bilinear(height: int, width: int) -> vision.Resize:
    return vision.Resize((height, width), vision.Inter.BILINEAR)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames [N, H, W, 3] uint8 resized to [N, height, width, 3], bilinear (no antialiasing, like PySlowFast's
    torch interpolation). MindSpore's eager image op: 2.5 ms for 16 windows of 249x249 to 224x224, against 18 ms for
    ffmpeg's bilinear scaler on packed RGB through PyAV."""
    if frames.shape[1:3] == (height, width):
        return frames
    resize = _bilinear(height, width)
    return np.stack([resize(np.ascontiguousarray(frame)) for frame in frames])


def read_clips(path: str, short_side: Optional[int], positions: Sequence[float], *, num_frames: int,
               sampling_rate: int, target_fps: float, num_threads: int = 1, decoder: str = "decord") -> np.ndarray:
    """Clips [len(positions), T, h, w, 3] uint8 of one video, short side resized to `short_side` (None: native).

    All clips come from one reader and one `get_batch` of the distinct frames they need (sorted, so the decoder
    decodes forward from each keyframe once). `num_threads` are ffmpeg's decoding threads. Raises BadVideo.
    """
    height, width = probe_size(path)
    out_h, out_w = short_side_size(height, width, short_side) if short_side else (height, width)
    decode_w = out_w
    while decoder == "decord" and decode_w in _DECORD_BAD_WIDTHS:
        decode_w += 1
    resize = (out_h, decode_w) != (height, width)
    try:
        reader = open_reader(path, decode_w if resize else -1, out_h if resize else -1, num_threads, decoder)
        video_frames = len(reader)
        if video_frames <= 0:
            raise BadVideo("zero frames")
        fps = reader.fps
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            fps = target_fps
        indices = np.concatenate([clip_frame_indices(video_frames, fps, num_frames, sampling_rate, target_fps, p)
                                  for p in positions])
        wanted, inverse = np.unique(indices, return_inverse=True)
        frames = reader.get_batch(wanted.tolist())
    except BadVideo:
        raise
    except Exception as err:  # decord raises RuntimeError / DECORDError, PyAV FFmpegError, both IndexError
        raise BadVideo(f"decode failed: {_first_line(err)}") from None
    if frames.shape != (len(wanted), out_h, decode_w, 3):
        raise BadVideo(f"decoder returned frames {frames.shape}, expected {(len(wanted), out_h, decode_w, 3)}")
    frames = frames[inverse, :, :out_w]
    return frames.reshape(len(positions), num_frames, *frames.shape[1:])
