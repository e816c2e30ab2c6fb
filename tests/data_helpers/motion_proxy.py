"""Train a small 3D CNN on the synthetic dataset through `build_loader`; print the best val accuracy as JSON.

    python tests/data_helpers/motion_proxy.py ROOT NUM_FRAMES EPOCHS    # ROOT: data.root (the set is made there)

A stand-in for X3D that compiles in seconds: if it learns the classes from 4-frame clips and stays at chance from
single frames, the dataset carries its label in the motion only. Run in its own process so graph mode and the
seed stay out of the test session.
"""

import json
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from x3d_exp.data import build_loader  # noqa: E402
from x3d_exp.data.config import DataConfig  # noqa: E402


class Proxy(nn.Cell):
    def __init__(self, num_classes: int):
        super().__init__()
        layers = []
        for c_in, c_out, kernel in ((3, 16, (3, 5, 5)), (16, 32, 3), (32, 64, 3)):
            layers += [nn.Conv3d(c_in, c_out, kernel, stride=(1, 2, 2), pad_mode="same"), nn.BatchNorm3d(c_out),
                       nn.ReLU()]
        self.features = nn.SequentialCell(layers)
        self.fc = nn.Dense(64, num_classes)

    def construct(self, x):
        return self.fc(self.features(x).mean(axis=(2, 3, 4)))


def main(root: str, num_frames: int, epochs: int) -> float:
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    cfg = OmegaConf.structured(DataConfig(name="synthetic", root=root, annotation_prefix="synthetic", num_classes=4,
                                          num_workers=1))
    # The default set but 64 frames long (XS's clips span 48), which makes it quicker to generate.
    cfg.synthetic.frames = 64
    # X3D-XS's clip on the default data (data.spatial_scale 0.4).
    sizes = dict(num_frames=num_frames, sampling_rate=12, crop_size=64, test_crop_size=73, train_scale=[73, 91])
    train, val = build_loader(cfg, "train", **sizes), build_loader(cfg, "val", **sizes)
    net = Proxy(4)
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), nn.Adam(net.trainable_params(), learning_rate=3e-3))
    batches = train.dataset.create_tuple_iterator(num_epochs=epochs)
    best = 0.0
    for _ in range(epochs):
        net.set_train(True)
        for clip, label in batches:
            step(clip, label)
        net.set_train(False)
        correct = total = 0
        for clip, label, index in val.dataset.create_tuple_iterator(num_epochs=1):
            keep = index.asnumpy() >= 0
            pred = net(clip).asnumpy().argmax(1)
            correct += int((pred[keep] == label.asnumpy()[keep]).sum())
            total += int(keep.sum())
        best = max(best, correct / total)
    return best


if __name__ == "__main__":
    print(json.dumps({"val_top1": main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))}))
