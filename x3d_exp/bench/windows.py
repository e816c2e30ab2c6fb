"""Windows over a long video: wall time, real-time factor and the ratio to decoding alone (prints figures).

    python -m x3d_exp.bench.windows                      # XS, S and M on a 5-minute 720p H.264 video
    python -m x3d_exp.bench.windows --models x3d_xs --minutes 1

The video is generated once into the cache (X3D_EXP_CACHE/bench): a 10 s 1280x720 clip of the synthetic set's
moving squares, encoded with x264 (medium preset, its B-frames), then remuxed end to end without re-encoding.
There is no real footage on the machine this was written on; flat synthetic content decodes faster than camera
footage, so treat the decode figures as a floor.

For each model: decoding alone, every frame scaled to the crop's short side, with decord (the anchor) and with PyAV;
the windowed reader alone (x3d_exp.data.stream, no network); and `label_windows` end to end with the folded
network (random weights: speed does not depend on them). The load average is printed with every figure: on a shared
machine the figures move with it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from x3d_exp.env import cache_root, prepare_process

CLIP_SECONDS = 10
FPS = 30
HEIGHT, WIDTH = 720, 1280


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def make_video(minutes: float) -> Path:
    """The looped 720p H.264 MP4 of `minutes`, made once."""
    import av
    import numpy as np

    from x3d_exp.data.synthetic import render

    folder = cache_root() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"looped_{minutes:g}min_720p_h264.mp4"
    if path.exists():
        return path
    clip = folder / "clip_10s_720p_h264.mp4"
    if not clip.exists():
        rng = np.random.default_rng(0)
        frames = render(rng, "moving_sideways", CLIP_SECONDS * FPS, HEIGHT)
        with av.open(str(clip) + ".part", "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=FPS, options={"preset": "medium", "crf": "23"})
            stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
            for frame in frames:
                wide = np.concatenate([frame, frame[:, ::-1][:, :WIDTH - HEIGHT]], axis=1)
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(wide), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        os.replace(str(clip) + ".part", clip)
    loops = max(1, round(minutes * 60 / CLIP_SECONDS))
    with av.open(str(clip)) as source, av.open(str(path) + ".part", "w", format="mp4") as out:
        in_stream = source.streams.video[0]
        stream = out.add_stream_from_template(in_stream)
        packets = [p for p in source.demux(in_stream) if p.size]
        period = max(p.pts for p in packets) - min(p.pts for p in packets) + packets[1].duration
        for loop in range(loops):
            for packet in packets:
                packet.pts += period if loop else 0
                packet.dts += period if loop else 0
                packet.stream = stream
                out.mux(packet)
    os.replace(str(path) + ".part", path)
    return path


def decord_every_frame(path: Path, height: int, width: int) -> float:
    import decord  # after MindSpore (x3d_exp.data.decoders)

    start = time.time()
    reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
    for first in range(0, len(reader), 64):
        reader.get_batch(list(range(first, min(first + 64, len(reader))))).asnumpy()
    return time.time() - start


def decord_window_frames(path: Path, height: int, width: int, plan) -> float:
    """decord given the frames the windows need, in order, 64 at a time (it decodes the frames between them
    without converting them; it has no way to skip non-reference frames)."""
    import decord
    import numpy as np

    start = time.time()
    reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
    indices, window = [], 0
    while plan.indices(window)[-1] < len(reader):
        indices.append(plan.indices(window))
        window += 1
    needed = np.unique(np.concatenate(indices))
    for first in range(0, len(needed), 64):
        reader.get_batch(needed[first:first + 64].tolist()).asnumpy()
    return time.time() - start


def pyav_every_frame(path: Path, height: int, width: int) -> float:
    import av

    from x3d_exp.data.decoders import scaled_rgb

    start = time.time()
    with av.open(str(path)) as container:
        container.streams.video[0].thread_count = 1
        for frame in container.decode(video=0):
            scaled_rgb(frame, width, height)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="x3d_xs,x3d_s,x3d_m")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--stride", type=float, default=1.0, help="seconds between windows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-only", action="store_true", help="the decoders' figures, no network")
    args = parser.parse_args()
    prepare_process()

    import mindspore as ms
    import numpy as np

    from x3d_exp.data import decoders  # noqa: F401  (MindSpore, then decord)
    from x3d_exp.data.stream import WindowPlan, WindowReader, open_source
    from x3d_exp.data.video import short_side_size
    from x3d_exp.kernels import resolve_conv_impl
    from x3d_exp.models import build_model
    from x3d_exp.models.fuse import inference_network
    from x3d_exp.tasks.windows import forward, label_windows

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    started = time.time()
    path = make_video(args.minutes)
    print(f"video {path} ({args.minutes:g} min, {WIDTH}x{HEIGHT} H.264, {FPS} fps), made or found in "
          f"{time.time() - started:.0f} s; {os.cpu_count()} cores, {load()}", flush=True)
    duration = args.minutes * 60
    conv_impl = resolve_conv_impl("auto", "CPU")
    anchors = {}  # decoding alone depends only on the size (X3D-XS and S share theirs)
    for name in args.models.split(","):
        model = build_model(name, num_classes=400, conv_impl=conv_impl)
        model.set_train(False)
        spec = model.spec
        crop = spec.test_crop_size
        height, width = short_side_size(HEIGHT, WIDTH, crop)
        if crop not in anchors:
            anchors[crop] = decord_every_frame(path, height, width)
            print(f"decode only, every frame to {width}x{height}: decord {anchors[crop]:.1f} s ({load()})",
                  flush=True)
            seconds = pyav_every_frame(path, height, width)
            print(f"decode only, every frame to {width}x{height}: PyAV {seconds:.1f} s ({load()})", flush=True)
        anchor = anchors[crop]
        plan = WindowPlan(FPS, spec.num_frames, spec.sampling_rate, 30.0, args.stride)
        start = time.time()
        reader = WindowReader(open_source(str(path)), plan, crop, queue_size=64, live=False, keep_first=False)
        count = sum(1 for _ in reader)
        seconds = time.time() - start
        print(f"{name}: windowed reader alone ({count} windows, {reader.frames} frames converted, "
              f"{reader.skipped} decoded unused, the rest skipped as non-reference): {seconds:.1f} s, "
              f"{seconds / anchor:.2f}x decord ({load()})", flush=True)
        seconds = decord_window_frames(path, height, width, plan)
        print(f"{name}: decord given the same windows' frames: {seconds:.1f} s, {seconds / anchor:.2f}x decord "
              f"every frame ({load()})", flush=True)
        if args.decode_only:
            continue
        network = inference_network(model)
        forward(network, np.zeros((1, 3, spec.num_frames, crop, crop), np.float32), args.batch_size)
        start = time.time()
        views = np.zeros((args.batch_size, 3, spec.num_frames, crop, crop), np.float32)
        forward(network, views, args.batch_size)
        per_batch = time.time() - start
        with tempfile.TemporaryDirectory() as folder:
            sizes = {"num_frames": spec.num_frames, "sampling_rate": spec.sampling_rate, "test_crop_size": crop}
            summary = label_windows(str(path), network, None, 400, sizes=sizes, stride=args.stride, crops=1,
                                    batch_size=args.batch_size, target_fps=30.0, decode_threads=1, queue_size=16,
                                    folder=Path(folder), name="bench", emit=lambda line: None)
        wall = summary["seconds"]
        print(f"{name}: windows end to end ({summary['windows']} windows of {spec.num_frames}x{crop}^2, batch "
              f"{args.batch_size}; network alone {per_batch * 1000:.0f} ms per batch): {wall:.1f} s wall, "
              f"real-time factor {duration / wall:.1f}, {wall / anchor:.2f}x decord decode-only ({load()})",
              flush=True)


if __name__ == "__main__":
    main()
