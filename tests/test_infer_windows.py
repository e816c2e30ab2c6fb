"""task=infer infer.window_stride through the real CLI: a model trained here labels a generated long video whose
class changes at known times, a live MPEG-TS stream paced at real time through a pipe, and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from tests.cli_helpers import REPO, cli_env
from tests.data_helpers.long_videos import change_times, encode, switching_frames
from x3d_exp.data.synthetic import render
from x3d_exp.data.transforms import normalise
from x3d_exp.models import build_model

pytestmark = pytest.mark.slow

# Two classes a few hundred steps teach X3D-XS (depth factor 1) on 32x32 crops: a still square and a moving one.
CLASSES = ["standing_still", "moving_down"]
SIZE, FRAMES, RATE = 32, 4, 12  # X3D-XS's clip: 4 frames 12 apart at 30 fps, 1.6 s
MODEL = ["model=x3d_xs", "model.gamma_d=1.0", "data.test_crop_size=32", "data.num_classes=2", "infer.batch_size=4"]
# The class changes every 5 s; windows every 0.5 s.
SCHEDULE = [(CLASSES[i % 2], 5.0) for i in range(5)]
STRIDE = 0.5


def train_model(steps: int, seed: int = 0) -> nn.Cell:
    """X3D-XS at depth 1 trained on clips rendered on the fly (Adam, batch 8); 2 classes."""
    ms.set_seed(seed)
    rng = np.random.default_rng(seed)
    span = RATE * (FRAMES - 1) + 1
    network = build_model("x3d_xs", num_classes=2, conv_impl="native", gamma_d=1.0)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(network, loss), nn.Adam(network.trainable_params(), 3e-3))
    step.set_train(True)
    for _ in range(steps):
        labels = rng.integers(0, 2, 8)
        clips = []
        for label in labels:
            video = render(rng, CLASSES[label], span + 8, SIZE)
            start = int(rng.integers(0, 9))
            clips.append(video[start:start + span:RATE])
        step(ms.Tensor(normalise(np.stack(clips))), ms.Tensor(labels.astype(np.int32)))
    network.set_train(False)
    return network


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows_cli")
    ms.save_checkpoint(train_model(steps=150), str(root / "still_or_down.ckpt"))
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def infer_cmd(root: Path, run: str, *overrides: str) -> list:
    return [sys.executable, str(REPO / "run.py"), "task=infer", f"ckpt={root / 'still_or_down.ckpt'}", *MODEL,
            f"infer.labels={root / 'labels.txt'}", f"hydra.run.dir={root / run}", *overrides]


def run_infer(root: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(infer_cmd(root, run, *overrides), cwd=root, env=cli_env(root / "cache"),
                          capture_output=True, text=True, timeout=600)


def lines_of(stdout: str):
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    windows = [r for r in records if "start" in r]
    summaries = [r for r in records if "windows" in r]
    return windows, summaries, records[-1]


def test_windows_find_when_the_class_changes(model):
    video = model / "switching.mp4"
    encode(switching_frames(SCHEDULE, 48, seed=3), str(video))
    done = run_infer(model, "long", f"infer.inputs=['{video}']", f"infer.window_stride={STRIDE}")
    assert done.returncode == 0, done.stderr[-3000:]
    windows, (summary,), final = lines_of(done.stdout)
    assert final["task"] == "infer" and final["window_stride"] == STRIDE and final["failed"] == 0
    # Windows every 0.5 s whose 1.6 s fit in the 25 s.
    assert [w["start"] for w in windows] == [round(i * STRIDE, 3) for i in range(47)]
    assert all(w["end"] == pytest.approx(w["start"] + 1.6) for w in windows)
    assert all(w["top5"][0]["label"] in CLASSES and len(w["top5"]) == 2 for w in windows)
    assert summary["windows"] == 47 and summary["missing"] == 0 and summary["dropped"] == 0

    # The segments: one per part of the schedule, each boundary within one stride of the true change.
    with open(summary["segments_csv"]) as f:
        segments = list(csv.DictReader(f))
    assert [s["label"] for s in segments] == [label for label, _ in SCHEDULE], segments
    for segment, truth in zip(segments[1:], change_times(SCHEDULE)):
        assert abs(float(segment["start"]) - truth) <= STRIDE, (segment, truth)
    assert all(float(s["mean_prob"]) > 0.5 for s in segments)
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["start"]) for r in rows] == [w["start"] for w in windows]
    assert [r["label"] for r in rows] == [w["top5"][0]["label"] for w in windows]
    png = Path(summary["timeline"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_stretch_short_video_and_three_crops(model):
    """A stretch cut out of an MPEG-TS file: its windows are missing, with one warning, the rest labelled; a video
    shorter than one window gives one padded window."""
    whole = model / "whole.ts"
    encode(switching_frames(SCHEDULE[:2], 48, seed=4), str(whole), format="mpegts")
    data = whole.read_bytes()
    cut = len(data) // 188 * 188
    (model / "cut.ts").write_bytes(data[:cut * 2 // 5 // 188 * 188] + data[cut * 11 // 20 // 188 * 188:])
    encode(switching_frames([("moving_down", 0.5)], 48), str(model / "short.mp4"))
    inputs = [model / "cut.ts", model / "short.mp4"]
    done = run_infer(model, "bad", f"infer.inputs=[{','.join(repr(str(p)) for p in inputs)}]",
                     f"infer.window_stride={STRIDE}", "infer.window_crops=3")
    assert done.returncode == 0, done.stderr[-3000:]
    windows, (cut_summary, short_summary), final = lines_of(done.stdout)
    cut_windows = [w for w in windows if w["video"] == str(inputs[0])]
    missing = [w for w in cut_windows if w.get("missing")]
    assert 2 <= len(missing) <= len(cut_windows) // 2, missing
    assert all(3.0 <= w["end"] and w["start"] <= 6.5 for w in missing)  # the cut: about 4 s to 5.5 s
    assert cut_summary["missing"] == len(missing) and cut_summary["windows"] == len(cut_windows)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(inputs[0]) in warnings[0] and f"{len(missing)} of" in warnings[0]
    (short,) = [w for w in windows if w["video"] == str(inputs[1])]
    assert short["start"] == 0 and short["end"] == pytest.approx(0.5) and short["top5"]
    assert short_summary["padded"] is True and short_summary["windows"] == 1
    assert final["window_crops"] == 3


@pytest.mark.parametrize("source, reason", [("rtsp://127.0.0.1:9/live", "cannot open the stream"),
                                            ("/dev/video97", "")])
def test_an_unreachable_stream_or_missing_camera_is_one_error_line(model, source, reason):
    done = run_infer(model, "unreachable", f"infer.inputs=['{source}']", "infer.window_stride=1")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {source}: ") and reason in errors[0], done.stderr


WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.data_helpers.long_videos import encode, switching_frames

def paced(frames, fps=30):
    start = time.time()
    for number, frame in enumerate(frames):
        time.sleep(max(0.0, start + number / fps - time.time()))
        yield frame

encode(paced(switching_frames({schedule!r}, 48, seed=5)), "pipe:1", format="mpegts",
       options={{"preset": "ultrafast", "tune": "zerolatency"}})
"""


def start_live(model: Path, run: str, seconds: float, *overrides: str):
    """run.py reading stdin, and once it says it reads, a writer process feeding it MPEG-TS at real time."""
    read_fd, write_fd = os.pipe()
    reader = subprocess.Popen(infer_cmd(model, run, "infer.inputs=[-]", *overrides), cwd=model,
                              env=cli_env(model / "cache"), stdin=read_fd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    os.close(read_fd)
    for line in reader.stderr:  # the network is built and compiled before this line
        if "reading a live source" in line:
            break
    schedule = [(CLASSES[i % 2], seconds / 2) for i in range(2)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), schedule=schedule)],
                              stdout=write_fd)
    os.close(write_fd)
    return reader, writer


def test_a_live_stream_on_stdin_is_labelled_as_it_comes(model):
    reader, writer = start_live(model, "live", 10.0, f"infer.window_stride={STRIDE}")
    started = time.time()
    lines = []
    for line in reader.stdout:  # each window's line arrives while the stream still runs
        lines.append((time.time() - started, line))
    assert writer.wait(timeout=60) == 0
    assert reader.wait(timeout=120) == 0, reader.stderr.read()[-3000:]
    windows = [(t, json.loads(line)) for t, line in lines if '"start"' in line]
    (summary,) = [json.loads(line) for _, line in lines if '"windows"' in line]
    # 10 s at real time: the first windows were printed long before the stream ended.
    assert windows[0][0] < 6 and windows[-1][0] > 8
    assert summary["dropped"] == 0 and summary["windows"] == len(windows) == 17
    assert summary["latency"]["mean"] < 1.5 and summary["latency"]["max"] < 3.0, summary["latency"]


def test_ctrl_c_ends_a_live_stream_cleanly_with_the_summary(model):
    reader, writer = start_live(model, "interrupted", 30.0, "infer.window_stride=1")
    first = reader.stdout.readline()
    assert '"start"' in first
    reader.send_signal(signal.SIGINT)
    out, err = reader.communicate(timeout=60)
    writer.kill()
    writer.wait()
    records = [json.loads(line) for line in out.splitlines()]
    assert reader.returncode == 0, err[-3000:]
    assert records[-2]["interrupted"] is True and records[-2]["windows"] >= 1
    assert records[-1]["task"] == "infer" and records[-1]["interrupted"] is True
    assert Path(records[-2]["csv"]).is_file() and Path(records[-2]["timeline"]).is_file()
