"""task=infer infer.window_stride through the real CLI: a model trained here labels a generated long video whose
class changes at known times, a live MPEG-TS stream paced at real time through a pipe, and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from tests.cli_helpers import REPO, cli_env
from tests.data_helpers.long_videos import change_times, encode, switching_frames
from x3d_exp.data.transforms import normalise
from x3d_exp.kernels import resolve_conv_impl
from x3d_exp.models import build_model

pytestmark = pytest.mark.slow

# Two synthetic classes, each in its own shade (tests/data_helpers/long_videos.SHADES): the classifier a test can
# afford, a linear one on a random X3D-XS's features, tells them apart every time.
CLASSES = ["standing_still", "moving_down"]
SIZE, FRAMES, RATE = 32, 4, 12  # X3D-XS's clip: 4 frames 12 apart at 30 fps
MODEL = ["model=x3d_xs", "model.gamma_d=1.0", "data.test_crop_size=32", "data.num_classes=2", "infer.batch_size=4"]
# The class changes every 5 s; windows every 0.5 s.
SCHEDULE = [(CLASSES[i % 2], 5.0) for i in range(5)]
STRIDE = 0.5


def video_frames(schedule, size: int = 48, seed: int = 0):
    return switching_frames(schedule, size, seed=seed, shades=CLASSES)


def train_model(clips_per_class: int = 24, seed: int = 0) -> nn.Cell:
    """X3D-XS at depth 1 with random weights whose classifier is trained here: logistic regression (full-batch
    gradient descent) on the network's features of rendered clips of both classes."""
    ms.set_seed(seed)
    rng = np.random.default_rng(seed)
    span = RATE * (FRAMES - 1) + 1
    network = build_model("x3d_xs", num_classes=2, conv_impl=resolve_conv_impl("auto", "CPU"), gamma_d=1.0)
    network.set_train(False)
    head = network.head

    def features_of(clips):  # the head's input to its classifier (X3DHead.construct without proj)
        x = head.relu(head.bn(head.conv(network.stages(network.stem(ms.Tensor(normalise(clips)))))))
        return head.fc_relu(head.fc(head.mean(x, (2, 3, 4)))).asnumpy()

    labels = np.repeat([0, 1], clips_per_class)
    clips = np.stack([np.stack(list(video_frames([(CLASSES[label], span / 30)], SIZE, int(rng.integers(1 << 30)))))
                      for label in labels])[:, ::RATE]
    features = np.concatenate([features_of(clips[i:i + 8]) for i in range(0, len(clips), 8)]).astype(np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    standard = (features - mean) / std
    weight, bias = np.zeros((2, features.shape[1])), np.zeros(2)
    for _ in range(200):
        logits = standard @ weight.T + bias
        grad = np.exp(logits - logits.max(axis=1, keepdims=True))
        grad /= grad.sum(axis=1, keepdims=True)
        grad[np.arange(len(labels)), labels] -= 1
        weight -= 0.1 * grad.T @ standard / len(labels)
        bias -= 0.1 * grad.sum(axis=0) / len(labels)
    assert ((standard @ weight.T + bias).argmax(axis=1) == labels).all()
    # The standardisation folded into the classifier: w (x - mean) / std + b.
    weight, bias = weight / std, bias - (weight / std) @ mean
    head.proj.weight.set_data(ms.Tensor(weight.astype(np.float32)))
    head.proj.bias.set_data(ms.Tensor(bias.astype(np.float32)))
    return network


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows_cli")
    ms.save_checkpoint(train_model(), str(root / "still_or_down.ckpt"))
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
    encode(video_frames(SCHEDULE, seed=3), str(video))
    done = run_infer(model, "long", f"infer.inputs=['{video}']", f"infer.window_stride={STRIDE}")
    assert done.returncode == 0, done.stderr[-3000:]
    windows, (summary,), final = lines_of(done.stdout)
    assert final["task"] == "infer" and final["window_stride"] == STRIDE and final["failed"] == 0
    # Windows every 0.5 s whose frames are all in the 25 s: the last frame of window i is 30 i / 2 + 36 < 750.
    assert [w["start"] for w in windows] == [round(i * STRIDE, 3) for i in range(48)]
    assert all(w["end"] == pytest.approx(w["start"] + 37 / 30, abs=1e-3) for w in windows)  # frames 0, 12, 24, 36
    assert all(w["top5"][0]["label"] in CLASSES and len(w["top5"]) == 2 for w in windows)
    assert summary["windows"] == 48 and summary["missing"] == 0 and summary["dropped"] == 0

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
    encode(video_frames(SCHEDULE[:2], seed=4), str(whole), format="mpegts")
    data = whole.read_bytes()
    cut = len(data) // 188 * 188
    (model / "cut.ts").write_bytes(data[:cut * 2 // 5 // 188 * 188] + data[cut * 11 // 20 // 188 * 188:])
    encode(video_frames([("moving_down", 0.5)]), str(model / "short.mp4"))
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


def test_an_unreachable_stream_is_one_error_line(model):
    """(A missing camera takes the same path: tests/test_windows.py checks its DataError in process.)"""
    source = "rtsp://127.0.0.1:9/live"
    done = run_infer(model, "unreachable", f"infer.inputs=['{source}']", "infer.window_stride=1")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {source}: cannot open the stream"), done.stderr


WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.data_helpers.long_videos import encode, switching_frames

def paced(frames, fps=30):
    start = time.time()
    for number, frame in enumerate(frames):
        time.sleep(max(0.0, start + number / fps - time.time()))
        yield frame

encode(paced(switching_frames({schedule!r}, 48, seed=5, shades={classes!r})), "pipe:1", format="mpegts",
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
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), schedule=schedule, classes=CLASSES)],
                              stdout=write_fd)
    os.close(write_fd)
    return reader, writer


def test_a_live_stream_on_stdin_is_labelled_as_it_comes(model):
    reader, writer = start_live(model, "live", 10.0, f"infer.window_stride={STRIDE}")
    lines = []
    for line in reader.stdout:  # with whether the writer was still writing when the line came
        lines.append((writer.poll() is None, line))
    assert writer.wait(timeout=60) == 0
    assert reader.wait(timeout=120) == 0, reader.stderr.read()[-3000:]
    windows = [(live, json.loads(line)) for live, line in lines if '"start"' in line]
    (summary,) = [json.loads(line) for _, line in lines if '"windows"' in line]
    # Windows every 0.5 s whose frames are all in the 10 s, each printed while the stream still ran (the last
    # one or two finish with it).
    assert summary["windows"] == len(windows) == 18 and summary["dropped"] == 0 and summary["missing"] == 0
    assert sum(live for live, _ in windows) >= len(windows) - 2, [live for live, _ in windows]
    # The model keeps up with real time: from a window's last frame to its line, well under a second on average.
    assert summary["latency"]["mean"] < 1.0 and summary["latency"]["max"] < 3.0, summary["latency"]
    assert [w["top5"][0]["label"] for _, w in windows[:6]] == [CLASSES[0]] * 6  # 0 to 5 s


def test_ctrl_c_ends_a_live_stream_cleanly_with_the_summary(model):
    reader, writer = start_live(model, "interrupted", 30.0, "infer.window_stride=1")
    first = reader.stdout.readline()
    while first.startswith("["):  # log lines before the first window (a first use compiles the C++ kernels)
        first = reader.stdout.readline()
    assert '"start"' in first
    reader.send_signal(signal.SIGINT)
    out, err = reader.communicate(timeout=60)
    writer.kill()
    writer.wait()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert reader.returncode == 0, err[-3000:]
    assert records[-2]["interrupted"] is True and records[-2]["windows"] >= 1
    assert records[-1]["task"] == "infer" and records[-1]["interrupted"] is True
    assert Path(records[-2]["csv"]).is_file() and Path(records[-2]["timeline"]).is_file()
