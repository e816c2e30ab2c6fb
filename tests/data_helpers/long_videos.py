"""Long generated videos whose content changes at known times: the synthetic classes (x3d_exp.data.synthetic)
one after another, each for a given number of seconds."""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import av
import numpy as np

from x3d_exp.data.synthetic import render


def switching_frames(schedule: Sequence[Tuple[str, float]], size: int, fps: int = 30, seed: int = 0,
                     speed=(0.004, 0.0055)) -> Iterator[np.ndarray]:
    """Frames [size, size, 3] uint8 of each (class, seconds) of the schedule in turn, a new square per part."""
    rng = np.random.default_rng(seed)
    for motion, seconds in schedule:
        yield from render(rng, motion, int(round(seconds * fps)), size, speed=speed)


def change_times(schedule: Sequence[Tuple[str, float]]) -> List[float]:
    """Seconds at which the class changes."""
    times, now = [], 0.0
    for _, seconds in schedule[:-1]:
        now += seconds
        times.append(now)
    return times


def encode(frames, out, fps: int = 30, codec: str = "libx264", format: str = None, options: dict = None) -> None:
    """Encode frames (an iterable of [H, W, 3] uint8) to `out` (a path or a binary file object)."""
    with av.open(out, "w", format=format) as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps, options=options or {})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
