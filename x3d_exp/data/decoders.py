"""The decoding seam: a random-access frame reader behind one protocol, from decord or PyAV (`data.decoder`).

    reader = open_decoder("decord", path, width, height, num_threads)
    len(reader), reader.fps, reader.get_batch([0, 12, 24])   # -> [3, height, width, 3] uint8

decord (the default) indexes every packet when it opens a file and seeks to the keyframe before a batch; PyAV
decodes forward from the start of the file and converts only the frames asked for, so it suits short clips and
files decord cannot index. Both scale in FFmpeg's scaler while converting to RGB. A new backend (a GPU decoder, say)
is one class with these three members and one entry in DECODERS. Sequential reading of long videos and of live
streams is x3d_exp.data.stream's, on PyAV.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import av
# MindSpore must be loaded before decord: the other order aborts the process inside MindSpore's import
# ("random_device could not be read", MindSpore 2.10 + decord 0.6.0).
import mindspore  # noqa: F401  isort: skip
import decord  # noqa: E402  isort: skip
import numpy as np

# decord otherwise prints ffmpeg's complaints about every bad file; the loader logs one line per bad file itself.
decord.logging.set_level(decord.logging.QUIET)


class FrameReader(Protocol):
    """Random access to the frames of one file, each scaled to the size the reader was opened with."""

    fps: float  # average frame rate; NaN when the container does not say

    def __len__(self) -> int: ...

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Frames [len(indices), h, w, 3] uint8 at these frame numbers (sorted, distinct)."""


class DecordReader:
    def __init__(self, path: str, width: int, height: int, num_threads: int):
        self._reader = decord.VideoReader(path, width=width, height=height, num_threads=num_threads)
        self.fps = float(self._reader.get_avg_fps())

    def __len__(self) -> int:
        return len(self._reader)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        return self._reader.get_batch(list(indices)).asnumpy()


def scaled_rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """One decoded frame as RGB [height, width, 3] uint8 (-1: native), converted and scaled in one swscale pass
    (bilinear, one thread: the decoding and the network already share the cores)."""
    return frame.reformat(width=width if width > 0 else None, height=height if height > 0 else None,
                          format="rgb24", interpolation="BILINEAR", threads=1).to_ndarray()


class PyAVReader:
    def __init__(self, path: str, width: int, height: int, num_threads: int):
        self.path, self.width, self.height, self.num_threads = path, width, height, num_threads
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else math.nan
            # The header's count when it has one (MP4, MKV with statistics); else the packets, demuxed (no decoding).
            self._frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)

    def __len__(self) -> int:
        return self._frames

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        wanted = {int(i): slot for slot, i in enumerate(indices)}
        out = [None] * len(wanted)
        last = max(wanted)
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_count = self.num_threads
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted:
                    out[wanted[number]] = scaled_rgb(frame, self.width, self.height)
                if number >= last:
                    break
        missing = [i for i, frame in zip(indices, out) if frame is None]
        if missing:
            raise IndexError(f"frame {missing[0]} is past the last decodable frame")
        return np.stack(out)


DECODERS = {"decord": DecordReader, "pyav": PyAVReader}


def open_decoder(decoder: str, path: str, width: int, height: int, num_threads: int) -> FrameReader:
    """A reader of `path` from backend `decoder` (a key of DECODERS; checked by the loader's configuration)."""
    return DECODERS[decoder](path, width, height, num_threads)
