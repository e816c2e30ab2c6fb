"""Windows over a long video or a live stream: every frame decoded once, in order, and shared by the overlapping
windows that need it (PyAV); a decoding thread hands finished windows to the network through a bounded queue.

    plan = WindowPlan(fps=30, num_frames=16, sampling_rate=5, target_fps=30, stride=1.0)
    reader = WindowReader(open_source("talk.mp4"), plan, short_side=256, queue_size=8, live=False)
    for window in reader: ...                      # Window(index, start, end, clip [T, h, w, 3] uint8 or None)

Window i starts at i * stride seconds and holds the model's clip: T frames `sampling_rate * fps / target_fps`
source frames apart, the frame numbers of `clip_frame_indices` shifted to the window's start; it ends with its last
frame, so its centre is the centre of its frames.

What is decoded: a frame no window needs is never converted to RGB, and when its packet is not a reference
frame (nothing else is predicted from it) FFmpeg is told to skip it outright (`skip_frame=NONREF`, decided per
packet from its timestamp). The frames a window needs are scaled by swscale, in the same pass that converts them to
RGB, to the short side the crop needs. Memory holds the open windows' frames and the queue, whatever the length.

Live sources (`-` for stdin, rtsp/http/udp URLs, /dev/video*) never wait for the network: a window finished while
the queue is full is dropped and counted. Files wait instead, so every window of a file is labelled.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import av
import numpy as np

from x3d_exp.data.decoders import scaled_rgb
from x3d_exp.data.video import clip_frame_indices, short_side_size
from x3d_exp.errors import DataError

STDIN = "-"
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
# How much of a live stream FFmpeg reads to find its streams before the first frame (0.5 s, 64 KiB).
LIVE_PROBE = {"analyzeduration": "500000", "probesize": "32768"}
# Seconds to wait for a network stream to answer (to open it, then for each read).
NETWORK_TIMEOUT = (10.0, 10.0)


def is_live(source: str) -> bool:
    return source == STDIN or source.startswith(STREAM_PREFIXES) or source.startswith("/dev/")


@dataclass(frozen=True)
class WindowPlan:
    """Which source frames window i needs, and its times. `fps` is the source's frame rate."""

    fps: float
    num_frames: int
    sampling_rate: int
    target_fps: float
    stride: float  # seconds between window starts

    @property
    def step(self) -> float:
        return self.sampling_rate * self.fps / self.target_fps

    @property
    def span(self) -> float:
        """Seconds from a window's first frame to the end of its last one (the window's `end` is what a live
        window waits for)."""
        return (self.step * (self.num_frames - 1) + 1) / self.fps

    def indices(self, window: int) -> np.ndarray:
        # The small epsilon keeps 0.1 * 30 = 3.0000000004 and 2.9999999996 on the same frame.
        return np.floor(window * self.stride * self.fps + self.step * np.arange(self.num_frames) + 1e-6).astype(
            np.int64)

    def start(self, window: int) -> float:
        return window * self.stride

    def end(self, window: int) -> float:
        return self.start(window) + self.span

    def windows_at(self, frame: int) -> range:
        """The windows whose frame range [first, last] holds `frame`."""
        per_window = self.stride * self.fps
        last_offset = self.step * (self.num_frames - 1)
        # A range one window wider on each side than the arithmetic says, trimmed by the indices themselves, so
        # rounding can never disagree with `indices`.
        low = max(0, math.floor((frame - last_offset) / per_window) - 1)
        high = math.floor(frame / per_window) + 1
        while low <= high and self.indices(low)[-1] < frame:
            low += 1
        while high >= low and self.indices(high)[0] > frame:
            high -= 1
        return range(low, high + 1)

    def needs(self, frame: int) -> bool:
        return any(frame in self.indices(window) for window in self.windows_at(frame))


@dataclass
class Window:
    index: int
    start: float
    end: float
    clip: Optional[np.ndarray]  # [T, h, w, 3] uint8; None when frames of it could not be decoded
    padded: bool = False  # a source shorter than one window, looped as test clips are


@dataclass
class _Filling:
    indices: np.ndarray
    frames: List[Optional[np.ndarray]] = field(default_factory=list)
    missing: bool = False

    def __post_init__(self):
        self.frames = [None] * len(self.indices)


class WindowAssembler:
    """Frames in presentation order in, finished windows out (in window order).

    A frame number that never arrives (a corrupt stretch, a gap in a stream) marks the windows needing it missing.
    With `keep_first`, every frame is kept until window 0 is finished, so that a source shorter than one window still
    gives one window, looped like a test clip (`finish`).
    """

    def __init__(self, plan: WindowPlan, keep_first: bool):
        self.plan = plan
        self.next_window = 0
        self.filling: Dict[int, _Filling] = {}
        self.first: Optional[List[np.ndarray]] = [] if keep_first else None
        self.emitted = 0

    def wants(self, frame: int) -> bool:
        return self.first is not None or self.plan.needs(frame)

    def add(self, frame: int, rgb: Optional[np.ndarray]) -> List[Window]:
        plan = self.plan
        while plan.indices(self.next_window)[0] <= frame:
            self.filling[self.next_window] = _Filling(plan.indices(self.next_window))
            self.next_window += 1
        if self.first is not None and rgb is not None:
            self.first.append(rgb)
        done = []
        for index in sorted(self.filling):
            filling = self.filling[index]
            for slot, wanted in enumerate(filling.indices):
                if wanted == frame and rgb is not None:
                    filling.frames[slot] = rgb
                elif wanted <= frame and filling.frames[slot] is None:
                    filling.missing = True
            if filling.indices[-1] <= frame:
                del self.filling[index]
                clip = None if filling.missing else np.stack(filling.frames)
                done.append(Window(index, plan.start(index), plan.end(index), clip))
                if index == 0:
                    self.first = None
        self.emitted += len(done)
        return done

    def finish(self) -> List[Window]:
        """At the end of the source: one looped window if the source was shorter than one window, else nothing (the
        windows running past the end are left out)."""
        if self.emitted or not self.first:
            return []
        frames = np.stack(self.first)
        indices = clip_frame_indices(len(frames), self.plan.fps, self.plan.num_frames, self.plan.sampling_rate,
                                     self.plan.target_fps, 0.5)
        self.emitted = 1
        return [Window(0, 0.0, len(frames) / self.plan.fps, frames[indices], padded=True)]


def open_source(source: str) -> av.container.InputContainer:
    """A PyAV container of a file, stdin (`-`, MPEG-TS or Matroska), a URL or a V4L2 camera; DataError naming the
    source if it cannot be opened or has no video."""
    try:
        if source == STDIN:
            # FFmpeg's own pipe protocol reads fd 0 in C, without a Python file object in the path. Probing 5 s of
            # the stream (FFmpeg's default) would hold back the first windows by as much.
            container = av.open("pipe:0", options=LIVE_PROBE)
        elif source.startswith("/dev/"):
            if "v4l2" not in av.formats_available:
                raise DataError(f"{source}: this PyAV build has no v4l2 input (camera devices need FFmpeg's "
                                f"libavdevice with V4L2)")
            container = av.open(source, format="v4l2")
        elif source.startswith(STREAM_PREFIXES):
            options = {**LIVE_PROBE, "rtsp_transport": "tcp"} if source.startswith("rtsp://") else dict(LIVE_PROBE)
            container = av.open(source, options=options, timeout=NETWORK_TIMEOUT)
        else:
            container = av.open(source)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{source}: missing file" if not is_live(source) else f"{source}: no such device") from None
    except Exception as err:  # whatever FFmpeg calls it (refused, timed out, no such host, bad data)
        what = "cannot open the stream" if is_live(source) else "not a readable video"
        raise DataError(f"{source}: {what}: {str(err).strip().splitlines()[0] if str(err).strip() else err}") \
            from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{source}: no video stream")
    return container


def source_fps(container: av.container.InputContainer, fallback: float) -> float:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    return fps if math.isfinite(fps) and 0 < fps <= 1000 else fallback


def source_duration(container: av.container.InputContainer) -> Optional[float]:
    """Seconds, from the header; None for streams and files that do not say."""
    stream = container.streams.video[0]
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration else None


END = None


class WindowReader:
    """Iterate the finished windows of an open source; the decoding runs in a daemon thread.

    Counters for the summary: `dropped` (live sources: windows finished while the queue was full), `corrupt` (packets
    the decoder rejected), `frames` (decoded frames given to the windows). `anchor` maps stream time to wall time:
    the earliest `arrival - frame time` seen, i.e. when second 0 of the stream was (or would have been) live.
    """

    def __init__(self, container, plan: WindowPlan, short_side: int, queue_size: int, live: bool,
                 decode_threads: int = 1, keep_first: bool = True):
        self.container, self.plan, self.live = container, plan, live
        stream = container.streams.video[0]
        stream.thread_count = decode_threads
        height, width = stream.codec_context.height, stream.codec_context.width
        self.size = short_side_size(height, width, short_side) if height > 0 and width > 0 else (-1, -1)
        self.assembler = WindowAssembler(plan, keep_first)
        # One slot more than the windows it may hold, so that the end marker always fits.
        self.queue_size = max(1, queue_size)
        self.queue: "queue.Queue" = queue.Queue(maxsize=self.queue_size + 1)
        self.dropped = self.corrupt = self.frames = self.skipped = 0
        self.anchor = math.inf
        self.error: Optional[BaseException] = None  # a failure before any window: the consumer raises it
        self.read_error: Optional[str] = None  # a read failure after some windows: the source ended there
        self._base = None  # the first frame's timestamp: frame numbers count from it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._decode, name="window-decoder", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Window]:
        while True:
            window = self.queue.get()
            if window is END:
                if self.error is not None:
                    raise self.error
                return
            yield window

    def pending(self) -> List[Window]:
        """The windows already waiting, without blocking (END is put back for the iterator)."""
        out = []
        while True:
            try:
                window = self.queue.get_nowait()
            except queue.Empty:
                return out
            if window is END:
                self.queue.put(END)
                return out
            out.append(window)

    def close(self) -> None:
        """Stop decoding (Ctrl+C, or the consumer gave up); the thread ends at its next packet."""
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a file reader waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
            if self.live:
                return  # a live read may block in FFmpeg until the next packet; the thread is a daemon
        self.container.close()

    def _put(self, window: Window) -> None:
        if self.live:
            # Only this thread puts, so the backlog can only shrink between the check and the put.
            if self.queue.qsize() >= self.queue_size:
                self.dropped += 1
            else:
                self.queue.put_nowait(window)
            return
        while not self._stop.is_set():
            try:
                self.queue.put(window, timeout=0.1)
                return
            except queue.Full:
                continue

    def _frame_number(self, pts, time_base) -> Optional[int]:
        if pts is None or self._base is None:
            return None
        return int(round(float((pts - self._base) * time_base) * self.plan.fps))

    def _decode(self) -> None:
        stream = self.container.streams.video[0]
        codec = stream.codec_context
        time_base = stream.time_base
        last = -1
        try:
            for packet in self.container.demux(stream):
                if self._stop.is_set():
                    break
                number = self._frame_number(packet.pts, time_base)
                # Skip a non-reference packet whose frame no window needs; reference frames are decoded anyway.
                skip = number is not None and not self.assembler.wants(number)
                codec.skip_frame = "NONREF" if skip else "DEFAULT"
                try:
                    frames = stream.decode(packet)
                except (av.error.InvalidDataError, av.error.UndefinedError, ValueError):
                    self.corrupt += 1
                    continue
                last = self._take(frames, time_base, last)
            # demux() ends with an empty packet, which drained the decoder above.
            if not self._stop.is_set():
                for window in self.assembler.finish():
                    self._put(window)
        except Exception as err:  # a read error ends the source; before any window it is the consumer's error
            if self.assembler.emitted:
                self.read_error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            else:
                self.error = err
        finally:
            self.queue.put(END)

    def _take(self, frames, time_base, last: int) -> int:
        for frame in frames:
            if frame.is_corrupt:
                # Concealed garbage: left out, so the windows that need this frame are marked missing.
                self.corrupt += 1
                continue
            if self._base is None and frame.pts is not None:
                self._base = frame.pts
            number = self._frame_number(frame.pts, time_base)
            number = last + 1 if number is None else number
            if number <= last:
                continue  # a repeated timestamp
            last = number
            self.anchor = min(self.anchor, time.time() - number / self.plan.fps)
            rgb = None
            if self.assembler.wants(number):
                rgb = scaled_rgb(frame, self.size[1], self.size[0])
                self.frames += 1
            else:
                self.skipped += 1
            for window in self.assembler.add(number, rgb):
                self._put(window)
        return last
