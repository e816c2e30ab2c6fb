"""Speed of the public Python API as a library user meets it: `from x3d_exp import build_model`, defaults only.

    python -m x3d_exp.bench.api                       # X3D-XS, 400 classes, batch 8: eval forward and train step
    python -m x3d_exp.bench.api --variant x3d_m --batch 4 --repeats 5

No run.py, no Hydra: the package import is all the process set-up a library user gets, and `build_model` picks
the convolution backend itself. GRAPH mode, random clips at the variant's training size, medians of wall-clock
time per step after two untimed steps (the first compiles the graph). `python -m x3d_exp.bench.speed` compares
against PyTorch; this script checks that the documented entry point is the fast path.
"""

from __future__ import annotations

import argparse
import statistics
import time

from x3d_exp import build_model  # first, as the README shows: it sets oneDNN's ISA before MindSpore loads

WARMUP = 2


def median_seconds(step, repeats: int) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m x3d_exp.bench.api", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="x3d_xs", help="a published variant (default x3d_xs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (default 5)")
    args = parser.parse_args(argv)

    import numpy as np
    import mindspore as ms
    from mindspore import nn

    ms.set_context(mode=ms.GRAPH_MODE)
    net = build_model(args.variant, num_classes=400)
    spec = net.spec
    rng = np.random.default_rng(0)
    clips = ms.Tensor(rng.standard_normal((args.batch, *spec.input_shape)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 400, args.batch).astype(np.int32))
    print(f"{args.variant}: conv_impl={spec.conv_impl}, input {[args.batch, *spec.input_shape]}")

    net.set_train(False)
    forward = median_seconds(lambda: net(clips).asnumpy(), args.repeats)
    print(f"forward, batch {args.batch}: {forward * 1e3:.0f} ms ({args.batch / forward:.1f} clips/s)")

    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    train_step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.SGD(net.trainable_params(), 0.01, 0.9))
    net.set_train(True)
    train = median_seconds(lambda: train_step(clips, labels).asnumpy(), args.repeats)
    print(f"train step, batch {args.batch}: {train * 1e3:.0f} ms ({args.batch / train:.1f} clips/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
