"""The dataset layouts through their registry (x3d_exp.data.datasets), in process: each layout read from the files
tests/data_helpers writes, the one-line error for a missing annotation, the folder split writer's faults, a layout
added from outside the package, and data.test_split. The readers' published details (class order, CRLF, bad lines)
are in tests/test_data.py and tests/test_data_layouts.py."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.data_helpers.layouts import (SIZES, class_folders, data_cfg, hmdb51, kinetics_official, slowfast_lists, ssv2,
                                        ucf101, write_video)
from x3d_exp.data import DataError, build_loader
from x3d_exp.data.datasets import (LAYOUTS, SPLITS, VIDEO_EXTENSIONS, Layout, PathTable, VideoList, base,
                                   check_class_count, dataset_layout, load_split, read_lines, register_layout)
from x3d_exp.data.datasets.folder import SPLIT_RECORD
from x3d_exp.data.synthetic import CLASSES
from x3d_exp.data.prepare import prepare_dataset
from x3d_exp.data.video import probe_size

REPO = Path(__file__).resolve().parents[1]
HMDB_SPLITS = "testTrainMulti_7030_splits"
SSV2_VIDEOS = "20bn-something-something-v2"


def paths_of(videos: VideoList):
    return [videos.paths[i] for i in range(len(videos))]


def listed(cfg, root: Path, split: str):
    videos = dataset_layout(cfg).read(cfg, root, split)
    return [(os.path.relpath(path, root), int(label)) for path, label in zip(paths_of(videos), videos.labels)], videos


def data_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "x3d_exp.data" and r.levelno == logging.WARNING]


# Each layout: (builder writing a tiny copy into root, its data config, class names, {split: [(path, label)]}).


def _kinetics(root):
    kinetics_official(root, {"train": [("zumba", "z1"), ("archery", "a1")], "val": [("zumba", "vz")],
                             "test": [("archery", "ta")]}, split_column={"val": "validate"})
    return data_cfg(root, num_classes=2), ["archery", "zumba"], {
        "train": [("train/z1_000000_000010.mp4", 1), ("train/a1_000001_000011.mp4", 0)],
        "val": [("val/vz_000000_000010.mp4", 1)], "test": [("test/ta_000000_000010.mp4", 0)]}


def _slowfast(root):
    slowfast_lists(root, {"train": [("v/a.mp4", 0), ("v/b.mp4", 1)], "val": [("v/c.mp4", 1)],
                          "test": [("v/d.mp4", 0)]})
    return data_cfg(root, num_classes=2), ["0", "1"], {"train": [("v/a.mp4", 0), ("v/b.mp4", 1)],
                                                       "val": [("v/c.mp4", 1)], "test": [("v/d.mp4", 0)]}


def _ucf101(root):
    ucf101(root, ["Archery", "Bowling"], [("Bowling/v_Bowling_g01_c01.avi", 2), ("Archery/v_Archery_g01_c01.avi", 1)],
           ["Archery/v_Archery_g08_c01.avi"])
    test = [("UCF-101/Archery/v_Archery_g08_c01.avi", 0)]
    return data_cfg(root, format="ucf101", num_classes=2), ["Archery", "Bowling"], {
        "train": [("UCF-101/Bowling/v_Bowling_g01_c01.avi", 1), ("UCF-101/Archery/v_Archery_g01_c01.avi", 0)],
        "val": test, "test": test}


def _hmdb51(root):
    hmdb51(root, {"hug": [("h1.avi", 2), ("h2.avi", 1), ("h3.avi", 0)], "clap": [("c1.avi", 1), ("c2.avi", 2)]})
    test = [("clap/c2.avi", 0), ("hug/h1.avi", 1)]
    return data_cfg(root, format="hmdb51", annotation_dir=HMDB_SPLITS, num_classes=2), ["clap", "hug"], {
        "train": [("clap/c1.avi", 0), ("hug/h2.avi", 1)], "val": test, "test": test}


def _ssv2(root):
    ssv2(root, ["Pushing something", "Holding something"],
         {"train": [("1", "Holding [something]"), ("2", "Pushing [something]")],
          "validation": [("3", "Pushing [something]")]})
    test = [(f"{SSV2_VIDEOS}/3.webm", 0)]
    return (data_cfg(root, format="ssv2", annotation_dir="labels", video_dir=SSV2_VIDEOS, num_classes=2),
            ["Pushing something", "Holding something"],
            {"train": [(f"{SSV2_VIDEOS}/1.webm", 1), (f"{SSV2_VIDEOS}/2.webm", 0)], "val": test, "test": test})


def _folder(root):
    # Three videos a class: one in each split, which one drawn by the class's own seed (tests/test_data_layouts.py).
    paths = class_folders(root, {"mango": 3, "apple": 3})
    return data_cfg(root, format="folder", num_classes=None), ["apple", "mango"], {
        name: sorted(os.path.relpath(p, root) for p in videos) for name, videos in paths.items()}


LAYOUT_COPIES = {"kinetics": _kinetics, "slowfast-lists": _slowfast, "ucf101": _ucf101, "hmdb51": _hmdb51,
                 "ssv2": _ssv2, "folder": _folder}


@pytest.mark.parametrize("copy", LAYOUT_COPIES.values(), ids=LAYOUT_COPIES.keys())
def test_each_layout_reads_its_published_files_through_the_registry(copy, tmp_path):
    cfg, class_names, expected = copy(tmp_path)
    for split in SPLITS:
        videos, read = listed(cfg, tmp_path, split)
        assert isinstance(read, VideoList) and isinstance(read.paths, PathTable)
        # The annotation read: a file, or for HMDB51 the pattern of its per-class split files.
        assert read.class_names == class_names and glob.glob(read.annotation)
        assert all(Path(tmp_path, path).is_file() for path, _ in videos)
        if cfg.format == "folder":
            # One video of each class in each split, labelled by its folder.
            assert sorted(label for _, label in videos) == [0, 1]
            assert all(path in expected[class_names[label]] for path, label in videos)
        else:
            assert videos == expected[split], split
        assert load_split(cfg, tmp_path, split).annotation == read.annotation


def test_the_synthetic_layout_generates_its_root_and_reads_it_as_kinetics(tmp_path):
    cfg = data_cfg(tmp_path / "cache", name="mine", format="synthetic", annotation_prefix="synthetic", num_classes=4)
    cfg.synthetic.update(train_per_class=1, val_per_class=1, test_per_class=1, frames=4, size=16)
    layout = dataset_layout(cfg)
    assert isinstance(layout, LAYOUTS["kinetics"].__class__)  # the kinetics reader, on a generated root
    root = layout.root(cfg, 16)
    assert root.parent == tmp_path / "cache" and (root / "synthetic.json").is_file()
    for split in SPLITS:
        videos = load_split(cfg, root, split)
        assert videos.class_names == list(CLASSES) and sorted(videos.labels.tolist()) == [0, 1, 2, 3]
        assert videos.annotation == str(root / f"synthetic_{split}.csv")
    # task=infer looks for class names in data.root itself and in each generated set under it.
    assert layout.annotation_roots(tmp_path / "cache") == [tmp_path / "cache", root]
    assert LAYOUTS["kinetics"].annotation_roots(tmp_path / "cache") == [tmp_path / "cache"]


MISSING = {
    "kinetics": "{root}/kinetics-400_train.csv: annotation file not found (nor the PySlowFast list {root}/train.csv);"
                " check data.root and data.annotation_prefix",
    "ucf101": "{root}/ucfTrainTestlist/classInd.txt: annotation file not found",
    "hmdb51": f"{{root}}/{HMDB_SPLITS}/<class>_test_split1.txt: no HMDB51 split files found (nor in {{root}}); check "
              f"data.root and data.annotation_dir",
    "ssv2": "{root}/labels/labels.json: annotation file not found",
    "folder": "data.root={root}: no class folders with videos (expected ROOT/<class name>/<video> with extensions "
              + ", ".join(VIDEO_EXTENSIONS) + ")",
}


@pytest.mark.parametrize("layout", MISSING)
def test_a_missing_annotation_is_one_line_naming_the_file(layout, tmp_path):
    cfg = data_cfg(tmp_path, format=layout, annotation_dir={"hmdb51": HMDB_SPLITS, "ssv2": "labels"}.get(layout))
    with pytest.raises(DataError) as caught:
        load_split(cfg, tmp_path, "train")
    assert str(caught.value) == MISSING[layout].format(root=tmp_path)


@pytest.mark.parametrize("copy, removed, message", [
    (_ucf101, "ucfTrainTestlist/testlist01.txt", "{root}/ucfTrainTestlist/testlist01.txt: annotation file not found"),
    (_ssv2, "labels/validation.json", "{root}/labels/validation.json: annotation file not found"),
    (_slowfast, "val.csv", "{root}/kinetics-400_val.csv: annotation file not found (nor the PySlowFast list "
                           "{root}/val.csv); check data.root and data.annotation_prefix"),
], ids=["ucf101", "ssv2", "slowfast-lists"])
def test_a_missing_list_beside_a_good_class_file_is_one_line(copy, removed, message, tmp_path):
    cfg, _, _ = copy(tmp_path)
    (tmp_path / removed).unlink()
    with pytest.raises(DataError) as caught:
        load_split(cfg, tmp_path, "val")
    assert str(caught.value) == message.format(root=tmp_path)


def test_an_unknown_format_or_split_names_the_choices(tmp_path):
    with pytest.raises(DataError) as caught:
        load_split(data_cfg(tmp_path, format="kinetic"), tmp_path, "train")
    assert str(caught.value) == ("data.format='kinetic': must be one of kinetics, ucf101, hmdb51, ssv2, folder, "
                                 "synthetic")
    with pytest.raises(DataError, match=r"split='dev': must be one of train, val, test"):
        load_split(data_cfg(tmp_path), tmp_path, "dev")
    with pytest.raises(DataError, match=r"data.root=.*nowhere: directory not found"):
        load_split(data_cfg(tmp_path), tmp_path / "nowhere", "train")


def test_every_data_group_names_a_registered_layout():
    formats = {}
    for path in sorted((REPO / "conf" / "data").glob("*.yaml")):
        group = yaml.safe_load(path.read_text())
        parent = next((d for d in group.get("defaults", []) if d != "_self_"), None)
        formats[path.stem] = group.get("format") or formats.get(parent)
    assert formats == {"folder": "folder", "hmdb51": "hmdb51", "k400": "kinetics", "k600": "kinetics",
                       "ssv2": "ssv2", "synthetic": "synthetic", "synthetic_hard": "synthetic",
                       "ucf101": "ucf101"}
    assert set(formats.values()) == set(LAYOUTS)


# --- A layout added from outside the package ------------------------------------------------------------------------


def test_a_new_layout_is_one_registered_class(tmp_path, monkeypatch):
    """What docs/data.md's recipe writes: a `Layout` subclass registered under a name, then `data.format` picks it
    for the loader like any published layout."""
    monkeypatch.setattr(base, "LAYOUTS", dict(base.LAYOUTS))  # registered for this test only

    @register_layout("pairs")
    class Pairs(Layout):
        """ROOT/<split>.txt, one `<video> <class name>` per line; class ids: the train file's names, sorted."""

        def read(self, data_cfg, root, split):
            rows = [line.split() for line in read_lines(root / f"{split}.txt") if line.strip()]
            classes = sorted({name for _, name in (line.split() for line in read_lines(root / "train.txt"))})
            check_class_count(classes, data_cfg.num_classes, root / "train.txt")
            return VideoList(PathTable([str(root / video) for video, _ in rows]),
                             np.asarray([classes.index(name) for _, name in rows], np.int32), classes,
                             str(root / f"{split}.txt"))

    for k, name in enumerate(["b.mp4", "a.mp4", "c.mp4"]):
        write_video(tmp_path / name, 30 * k)
    (tmp_path / "train.txt").write_text("b.mp4 walk\na.mp4 run\n")
    (tmp_path / "val.txt").write_text("c.mp4 walk\n")
    loader = build_loader(data_cfg(tmp_path, format="pairs", num_classes=2), "val", **SIZES)
    assert loader.class_names == ["run", "walk"] and loader.annotation == str(tmp_path / "val.txt")
    labels = [int(b["label"][0]) for b in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True)]
    assert labels == [1]
    assert dataset_layout(data_cfg(tmp_path, format="pairs")).name == "pairs"
    with pytest.raises(ValueError, match="two dataset layouts named pairs"):
        register_layout("pairs")(Pairs)
    # Its missing test file falls back to val like any layout's (read_lines raises AnnotationNotFound).
    assert load_split(data_cfg(tmp_path, format="pairs", num_classes=2), tmp_path, "test").annotation == \
        str(tmp_path / "val.txt")


# --- The folder split writer's faults ---------------------------------------------------------------------------------


def test_the_folder_split_of_a_concurrent_writer_that_came_first_stays(tmp_path):
    """Ranks that start together each write a split; the rename of the first wins and the others' are dropped."""
    from x3d_exp.data.datasets.folder import _write_folder_split

    root = tmp_path / "videos"
    class_folders(root, {"apple": 3, "mango": 3})
    splits = root / "splits"
    _write_folder_split(root, splits, [0.8, 0.1, 0.1])
    first = {p.name: p.read_bytes() for p in splits.iterdir()}
    write_video(root / "apple" / "apple_new.mp4", 90)  # a later writer would split otherwise
    _write_folder_split(root, splits, [0.8, 0.1, 0.1])
    assert {p.name: p.read_bytes() for p in splits.iterdir()} == first
    assert sorted(p.name for p in root.iterdir()) == ["apple", "mango", "splits"]  # no staging folder left


def test_an_unwritable_splits_dir_or_a_foreign_record_is_one_line(tmp_path):
    root = tmp_path / "videos"
    class_folders(root, {"apple": 3, "mango": 3})
    (tmp_path / "a_file").write_text("not a folder")
    blocked = tmp_path / "a_file" / "splits"
    with pytest.raises(DataError) as caught:
        load_split(data_cfg(root, format="folder", num_classes=None, splits_dir=str(blocked)), root, "train")
    assert str(caught.value) == (f"{blocked}: cannot write the split lists (File exists): set data.splits_dir "
                                 f"to a writable folder")

    cfg = data_cfg(root, format="folder", num_classes=None)
    load_split(cfg, root, "train")
    (root / "splits" / SPLIT_RECORD).write_text('{"classes": ["apple"]}')
    with pytest.raises(DataError) as caught:
        load_split(cfg, root, "train")
    assert str(caught.value) == (f"{root / 'splits' / SPLIT_RECORD}: not a split record this program wrote "
                                 f"('train_only'); delete {root / 'splits'} to split again")


# --- data.test_split ------------------------------------------------------------------------------------------------


def _train_and_val_only(root):
    """The official Kinetics layout as most downloads have it: train and val csvs, no test csv."""
    kinetics_official(root, {"train": [("zumba", "z1"), ("archery", "a1"), ("zumba", "z2")],
                             "val": [("zumba", "vz"), ("archery", "va")]}, split_column={"val": "validate"})


def test_without_a_test_annotation_the_test_runs_on_val_with_one_warning(tmp_path, caplog):
    _train_and_val_only(tmp_path)
    cfg = data_cfg(tmp_path, num_classes=2)
    assert cfg.test_split == "test"
    val = load_split(cfg, tmp_path, "val")
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        tests = [load_split(cfg, tmp_path, "test") for _ in range(2)]
        loader = build_loader(cfg, "test", **SIZES)
    for videos in tests:
        assert paths_of(videos) == paths_of(val)
        assert videos.labels.tolist() == val.labels.tolist() == [1, 0] and videos.annotation == val.annotation
    # The test loader keeps the test protocol (test_num_clips x test_num_crops views a video) on the val videos.
    assert (loader.split, loader.num_videos, loader.annotation) == ("test", 2, str(tmp_path / "kinetics-400_val.csv"))
    rows = list(loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert sum(len(b["label"]) for b in rows) == 2 * 2 * 3
    assert data_warnings(caplog) == [
        f"{tmp_path / 'kinetics-400_test.csv'}: not found, so the test runs on the val split "
        f"({tmp_path / 'kinetics-400_val.csv'}), as the X3D paper reports Kinetics; data.test_split=val chooses that "
        f"without this warning"]


def test_data_test_split_val_reads_val_without_a_warning_and_a_missing_val_keeps_the_test_error(tmp_path, caplog):
    _train_and_val_only(tmp_path)
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        videos = load_split(data_cfg(tmp_path, num_classes=2, test_split="val"), tmp_path, "test")
    assert videos.annotation == str(tmp_path / "kinetics-400_val.csv") and data_warnings(caplog) == []
    # A test csv present is read, whatever val holds.
    kinetics_official(tmp_path, {"test": [("archery", "ta")]})
    assert load_split(data_cfg(tmp_path, num_classes=2), tmp_path, "test").annotation == \
        str(tmp_path / "kinetics-400_test.csv")
    assert load_split(data_cfg(tmp_path, num_classes=2, test_split="val"), tmp_path, "test").annotation == \
        str(tmp_path / "kinetics-400_val.csv")
    with pytest.raises(DataError, match=r"data.test_split='dev': must be one of train, val, test"):
        load_split(data_cfg(tmp_path, num_classes=2, test_split="dev"), tmp_path, "test")

    # Neither test nor val: the error is the test split's own.
    only_train = tmp_path / "train_only"
    kinetics_official(only_train, {"train": [("zumba", "z1"), ("archery", "a1")]})
    with pytest.raises(DataError) as caught:
        load_split(data_cfg(only_train, num_classes=2), only_train, "test")
    assert str(caught.value).startswith(f"{only_train / 'kinetics-400_test.csv'}: annotation file not found")
    # No test csv and a broken val csv: the val csv's own error, not the test's.
    (tmp_path / "kinetics-400_test.csv").unlink()
    (tmp_path / "kinetics-400_val.csv").write_text("label,youtube_id,time_start,time_end,split\nzumba,vz,0,train\n")
    with pytest.raises(DataError, match=r"kinetics-400_val\.csv:2: malformed line"):
        load_split(data_cfg(tmp_path, num_classes=2), tmp_path, "test")


# --- One definition of a video file ---------------------------------------------------------------------------------


def test_task_prepare_and_data_folder_take_the_same_files_for_videos(tmp_path):
    """Both read VIDEO_EXTENSIONS: an MPEG-TS (.ts) class video is a video to data=folder and re-encoded by
    task=prepare into a file the loader reads."""
    root = tmp_path / "videos"
    class_folders(root, {"apple": 3})
    write_video(root / "mango" / "broadcast.ts", 40, width=64, height=48)
    write_video(root / "mango" / "b.mp4", 50)
    write_video(root / "mango" / "c.mp4", 60)
    (root / "mango" / "notes.txt").write_text("not a video")
    cfg = data_cfg(root, format="folder", num_classes=None)
    listed_videos = sorted(Path(path).name for split in SPLITS for path in paths_of(load_split(cfg, root, split)))
    assert listed_videos == ["apple_0.mp4", "apple_1.avi", "apple_2.mkv", "b.mp4", "broadcast.ts", "c.mp4"]

    counts = prepare_dataset(root, tmp_path / "small", 24)
    assert (counts.encoded, counts.bad) == (1, {})  # the .ts file, the only one larger than 24 px
    assert probe_size(str(tmp_path / "small" / "mango" / "broadcast.ts")) == (24, 32)
    assert (tmp_path / "small" / "mango" / "notes.txt").read_text() == "not a video"
