"""Each shipped data group read through the public API only (`data=<group>` composed from conf/data/, then
x3d_exp.data.build_loader), on a tiny copy of its published layout (tests/data_helpers): the class list, the videos of
each split and the labels they carry. The layouts' details and faults are in test_data.py and test_data_layouts.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cli_helpers import compose_config
from tests.data_helpers.layouts import SIZES, kinetics_labels, tiny_copy
from x3d_exp.data import build_loader

def spread(classes: int, k: int) -> int:
    """The class of tiny_copy's k-th video (k = 0..7): spread over the whole class range."""
    return k * (classes - 1) // 7


def kinetics_val_label(classes: int) -> int:
    labels = kinetics_labels(classes)
    return sorted(labels).index(labels[spread(classes, 3)])  # class ids follow the alphabet


# group: (classes, training videos, the val video's label) of tests.data_helpers.layouts.tiny_copy's copy, whose
# videos are of the classes spread(classes, k), k = 0..7.
GROUPS = {
    "k400": (10, 10, kinetics_val_label(10)),
    "k600": (600, 8, spread(600, 3)),
    "ucf101": (101, 8, 2),  # its test list (= val) holds one Action002 video
    "hmdb51": (51, 8, spread(51, 3)),
    "ssv2": (174, 8, spread(174, 5)),
    "folder": (2, 10, 1),  # "few" (2 videos, both train) and "many" (8/1/1): alphabetical, "many" is 1
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_reads_its_classes_videos_and_labels_through_build_loader(group, tmp_path):
    classes, train_videos, val_label = GROUPS[group]
    tiny_copy(group, tmp_path, classes)
    cfg = compose_config(f"data={group}", f"data.root={tmp_path}", "data.num_workers=0", "data.batch_size=2",
                         *([] if group == "folder" else [f"data.num_classes={classes}"]),
                         # the official csvs of this copy are named for its class count: kinetics-10_train.csv
                         *(["data.annotation_prefix=kinetics-10"] if group == "k400" else []))
    train = build_loader(cfg.data, "train", bad_log_dir=str(tmp_path / "bad"), **SIZES)
    assert len(train.class_names) == classes and train.num_videos == train_videos
    if group in ("k400", "hmdb51", "folder"):  # named classes in alphabetical order (the others: as numbered)
        assert train.class_names == sorted(train.class_names)
    rows = list(train.dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    labels = np.concatenate([row["label"] for row in rows])
    assert rows[0]["clip"].shape == (2, 3, SIZES["num_frames"], SIZES["crop_size"], SIZES["crop_size"])
    assert len(labels) == train_videos and ((0 <= labels) & (labels < classes)).all()
    val = build_loader(cfg.data, "val", bad_log_dir=str(tmp_path / "bad"), **SIZES)
    (row,) = val.dataset.create_dict_iterator(num_epochs=1, output_numpy=True)
    assert val.num_videos == 1 and row["video_index"].tolist() == [0, -1] and int(row["label"][0]) == val_label
    assert not train.bad_videos() and not val.bad_videos()
