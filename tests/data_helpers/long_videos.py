"""Long generated videos whose content changes at known times: the synthetic classes (x3d_exp.data.synthetic)
one after another, each for a given number of seconds."""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import av
import numpy as np

from x3d_exp.data.synthetic import render


# Per class, the frames' pixel range: the first class dark, the second bright. A model that a test can afford to
# train (a linear classifier on a random X3D's features) tells these apart; the motion alone it does not.
SHADES = ((0, 110), (145, 255))


def shade(frames: np.ndarray, index: int) -> np.ndarray:
    low, high = SHADES[index % len(SHADES)]
    return (low + frames.astype(np.float32) * ((high - low) / 255)).astype(np.uint8)


def switching_frames(schedule: Sequence[Tuple[str, float]], size: int, fps: int = 30, seed: int = 0,
                     shades: Sequence[str] = ()) -> Iterator[np.ndarray]:
    """Frames [size, size, 3] uint8 of each (class, seconds) of the schedule in turn, a new square per part; a class
    named in `shades` is drawn in the pixel range of its position there (SHADES)."""
    rng = np.random.default_rng(seed)
    for motion, seconds in schedule:
        frames = render(rng, motion, int(round(seconds * fps)), size)
        yield from shade(frames, list(shades).index(motion)) if motion in shades else frames


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
