"""Windows over long videos and streams, in process: the window arithmetic, the assembly of windows from frames in
order (gaps, short sources), segment merging, the decoding thread's queue and drops, NONREF skipping, and the
decoding seam (decord and PyAV give the same clips)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mindspore import nn, ops

from tests.data_helpers.long_videos import encode, switching_frames
from x3d_exp.data.stream import Window, WindowAssembler, WindowPlan, WindowReader, open_source
from x3d_exp.data.video import clip_frame_indices, read_clips
from x3d_exp.errors import DataError
from x3d_exp.tasks.windows import VideoWindows, WindowBatches, merge_segments, output_name

# X3D-XS's clip (4 frames, 12 apart at 30 fps) over a 25 fps source, a window every 0.3 s: nothing is a whole
# number of frames, so rounding errors would show.
PLAN = WindowPlan(fps=25.0, num_frames=4, sampling_rate=12, target_fps=30.0, stride=0.3)


def test_window_plan_matches_the_test_clip_and_knows_which_frames_are_needed():
    assert PLAN.step == pytest.approx(10.0)
    assert PLAN.span == pytest.approx(1.24)  # from frame 0 to the end of frame 30
    # Window 0 is the test clip of a video exactly one window long.
    np.testing.assert_array_equal(PLAN.indices(0), clip_frame_indices(40, 25.0, 4, 12, 30.0, 0.5))
    np.testing.assert_array_equal(PLAN.indices(3), [22, 32, 42, 52])  # starts at 0.9 s = frame 22.5
    assert (PLAN.start(3), PLAN.end(3)) == (pytest.approx(0.9), pytest.approx(2.14))
    needed = {int(i) for w in range(80) for i in PLAN.indices(w)}
    for frame in range(500):
        brute = [w for w in range(80) if PLAN.indices(w)[0] <= frame <= PLAN.indices(w)[-1]]
        assert list(PLAN.windows_at(frame)) == brute, frame
        assert PLAN.needs(frame) == (frame in needed), frame


def frames_in(assembler: WindowAssembler, numbers):
    """Feed frames whose pixels hold their own number; returns the finished windows."""
    out = []
    for n in numbers:
        rgb = np.full((2, 2, 3), n % 256, np.uint8) if assembler.wants(n) else None
        out.extend(assembler.add(n, rgb))
    return out + assembler.finish()


def test_windows_come_out_in_order_with_their_frames_and_gaps_mark_them_missing():
    windows = frames_in(WindowAssembler(PLAN, keep_first=False), range(250))  # 10 s
    assert [w.index for w in windows] == list(range(len(windows)))
    # Every window whose frames are all in the 250 frames, and only those.
    assert PLAN.indices(len(windows) - 1)[-1] < 250 <= PLAN.indices(len(windows))[-1]
    for w in windows:
        np.testing.assert_array_equal(w.clip[:, 0, 0, 0], PLAN.indices(w.index) % 256)
    # Frames 100..119 never arrive (a corrupt stretch): exactly the windows needing one of them are missing.
    windows = frames_in(WindowAssembler(PLAN, keep_first=False), [n for n in range(250) if not 100 <= n < 120])
    missing = {w.index for w in windows if w.clip is None}
    assert missing == {w for w in range(len(windows)) if any(100 <= i < 120 for i in PLAN.indices(w))}
    assert len(missing) < len(windows) // 2


def test_a_source_shorter_than_one_window_gives_one_looped_window():
    windows = frames_in(WindowAssembler(PLAN, keep_first=True), range(17))
    assert len(windows) == 1 and windows[0].padded
    np.testing.assert_array_equal(windows[0].clip[:, 0, 0, 0], clip_frame_indices(17, 25.0, 4, 12, 30.0, 0.5))
    assert windows[0].end == pytest.approx(17 / 25)
    # Long enough: the first frames are no longer kept once window 0 is done, and no extra window appears.
    assembler = WindowAssembler(PLAN, keep_first=True)
    windows = frames_in(assembler, range(60))
    assert assembler.first is None and not any(w.padded for w in windows)


def test_segments_merge_runs_of_one_top1_and_missing_windows_break_them():
    starts = np.arange(8) * 0.5
    ends = starts + 1.0
    top1 = np.array([2, 2, 2, 0, -1, 0, 0, 1])
    prob = np.array([0.9, 0.7, 0.8, 0.6, np.nan, 0.5, 0.7, 0.9])
    segments = merge_segments(starts, ends, top1, prob, 0.5)
    assert [(s["index"], s["windows"]) for s in segments] == [(2, 3), (0, 1), (0, 2), (1, 1)]
    assert (segments[0]["start"], segments[0]["end"]) == (0.25, 1.75)  # centres 0.5..1.5, +- half a stride
    assert segments[0]["mean_prob"] == pytest.approx(0.8)
    assert segments[2]["mean_prob"] == pytest.approx(0.6)


def test_output_names_are_unique_and_safe():
    taken = set()
    assert [output_name(s, taken) for s in ["/a/talk.mp4", "/b/talk.mkv", "-", "rtsp://cam:554/live?x=1"]] == \
        ["talk", "talk-2", "stdin", "cam_554_live_x_1"]


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("windows")
    schedule = [("moving_down", 2.0), ("standing_still", 2.0)]
    # x264 with B-frames (its default): about half the frames are non-reference and can be skipped.
    encode(switching_frames(schedule, 64), str(folder / "b_frames.mp4"))
    encode(switching_frames(schedule, 64), str(folder / "stream.ts"), format="mpegts")
    return folder


def test_frames_no_window_needs_are_skipped_and_the_needed_ones_are_exact(clips_dir):
    path = str(clips_dir / "b_frames.mp4")
    plan = WindowPlan(fps=30.0, num_frames=4, sampling_rate=12, target_fps=30.0, stride=1.0)
    reader = WindowReader(open_source(path), plan, short_side=64, queue_size=4, live=False, keep_first=False)
    windows = list(reader)
    assert [w.index for w in windows] == [0, 1, 2]  # windows of 1.23 s every second in 4 s
    with __import__("av").open(path) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    for w in windows:
        np.testing.assert_array_equal(w.clip, every[plan.indices(w.index)])
    # 15 of 120 frames are needed (window 3's last frame is past the end, so it never finishes); the rest are
    # either skipped by FFmpeg (non-reference) or decoded but never converted.
    assert reader.frames == len({int(i) for w in range(4) for i in plan.indices(w) if i < 120}) == 15
    assert reader.skipped + reader.frames < 120 - 30, (reader.skipped, reader.frames)


def test_a_live_source_drops_windows_when_the_queue_is_full_and_counts_them(clips_dir):
    plan = WindowPlan(fps=30.0, num_frames=4, sampling_rate=2, target_fps=30.0, stride=0.25)
    # Nobody takes windows until the source is read: a queue of 2 keeps the first 2, the others are dropped.
    reader = WindowReader(open_source(str(clips_dir / "stream.ts")), plan, short_side=32, queue_size=2, live=True)
    reader._thread.join(timeout=60)
    windows = list(reader)
    assert [w.index for w in windows] == [0, 1]
    assert reader.dropped == 16 - 2  # windows every 7.5 frames whose last frame (start + 6) is in the 120
    assert windows[0].clip.shape == (4, 32, 32, 3)


def test_unreadable_sources_raise_one_data_error(tmp_path):
    with pytest.raises(DataError, match=r"missing.mp4: missing file"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(DataError, match=r"rtsp://127.0.0.1:9/none: cannot open the stream"):
        open_source("rtsp://127.0.0.1:9/none")
    with pytest.raises(DataError, match=r"/dev/video97: "):
        open_source("/dev/video97")


@pytest.mark.parametrize("short_side", [None, 40])
def test_decord_and_pyav_give_the_same_clips(clips_dir, short_side):
    args = dict(num_frames=4, sampling_rate=6, target_fps=30.0)
    path = str(clips_dir / "b_frames.mp4")
    decord_clips = read_clips(path, short_side, [0.1, 0.5, 0.9], decoder="decord", **args)
    pyav_clips = read_clips(path, short_side, [0.1, 0.5, 0.9], decoder="pyav", **args)
    assert decord_clips.shape == pyav_clips.shape == (3, 4, short_side or 64, short_side or 64, 3)
    # The same frames; the RGB conversion and scaler settings of the two builds of FFmpeg may differ slightly.
    assert np.abs(decord_clips.astype(int) - pyav_clips).mean() < 2.0


class Brightness(nn.Cell):
    """A real two-class network: logits (mean - 0.5, 0.5 - mean) * 20 of the normalised clip; counts its batches."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def construct(self, x):
        self.batches.append(x.shape[0])
        mean = ops.mean(x, axis=(1, 2, 3, 4), keep_dims=False).reshape(-1, 1)
        return ops.concat([mean, -mean], axis=1) * 20


def test_windows_are_batched_and_printed_in_order_with_the_missing_ones_in_place():
    lines = []
    network = Brightness()
    results = VideoWindows("v.mp4", ["bright", "dark"], 2)
    batches = WindowBatches(network, results, size=4, crops=3, per_batch=2, live=False, emit=lines.append,
                            wall_time=lambda end: 0.0)
    shade = [255, 0, None, 255, 0]  # window 2 is missing
    windows = [Window(i, i * 0.5, i * 0.5 + 1, None if s is None else np.full((2, 4, 6, 3), s, np.uint8))
               for i, s in enumerate(shade)]
    batches.push(windows[:1], final=False)
    assert lines == []  # a file waits for a full batch
    batches.push(windows[1:], final=False)
    batches.push([], final=True)
    records = [json.loads(line) for line in lines]
    assert [r["start"] for r in records] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert records[2] == {"video": "v.mp4", "start": 1.0, "end": 2.0, "missing": True}
    assert [r["top5"][0]["label"] for i, r in enumerate(records) if i != 2] == ["bright", "dark", "bright", "dark"]
    # Batches of 2 windows x 3 crops, the last one padded to the same shape.
    assert network.batches == [6, 6]
    assert len(batches.latencies) == 0
