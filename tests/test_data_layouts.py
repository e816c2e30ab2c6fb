"""The layouts added for issue 15: a folder of one's own videos (data=folder), HMDB51 and Something-Something v2,
on tiny real encoded videos (no mocks: real PyAV encoding, decord, MindSpore). Each group through the CLI with its
own defaults: tests/test_data.py::test_each_real_data_group_runs_through_the_cli_with_its_own_defaults."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import compose_config
from tests.data_helpers.layouts import SIZES, class_folders, data_cfg, hmdb51, ssv2, write_video
from x3d_exp.data import DataError, build_loader, resolve_num_classes
from x3d_exp.data.datasets import SPLITS, load_split

HMDB_SPLITS = "testTrainMulti_7030_splits"


def folder_cfg(root, **overrides):
    return data_cfg(root, **{"format": "folder", "num_classes": None, **overrides})


def hmdb_cfg(root, **overrides):
    return data_cfg(root, **{"format": "hmdb51", "annotation_dir": HMDB_SPLITS, **overrides})


def ssv2_cfg(root, **overrides):
    return data_cfg(root, **{"format": "ssv2", "annotation_dir": "labels", "video_dir": "20bn-something-something-v2",
                             "train_flip": False, **overrides})


def listed(cfg, root):
    """{split: [(path relative to root, label)]} as the reader returns them."""
    out = {}
    for split in SPLITS:
        videos = load_split(cfg, Path(root), split)
        out[split] = [(os.path.relpath(videos.paths[i], root), int(videos.labels[i])) for i in range(len(videos))]
    return out


def data_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "x3d_exp.data" and r.levelno == logging.WARNING]


# --- data=folder --------------------------------------------------------------------------------------------------


def test_folder_classes_are_alphabetical_and_each_class_is_split_by_the_fractions(tmp_path):
    root = tmp_path / "videos"
    paths = class_folders(root, {"zebra crossing": 10, "apple": 10, "mango": 5})
    (root / "notes").mkdir()  # a folder without videos is not a class
    (root / "README.txt").write_text("my videos")
    lists = listed(folder_cfg(root), root)
    assert load_split(folder_cfg(root), root, "train").class_names == ["apple", "mango", "zebra crossing"]
    for label, name in enumerate(["apple", "mango", "zebra crossing"]):
        per_split = [[p for p, lab in lists[s] if lab == label] for s in SPLITS]
        # Stratified: 10 videos -> 8/1/1; 5 -> 3/1/1 (at least one each); every video in exactly one split.
        assert [len(v) for v in per_split] == ([3, 1, 1] if name == "mango" else [8, 1, 1])
        assert sorted(sum(per_split, [])) == sorted(os.path.relpath(p, root) for p in paths[name])
    # .mp4, .avi, .mkv and .webm are all videos; labels follow the folder.
    assert {Path(p).suffix for p, _ in lists["train"]} == {".mp4", ".avi", ".mkv", ".webm"}
    assert all(p.startswith(["apple", "mango", "zebra crossing"][lab] + "/") for s in SPLITS for p, lab in lists[s])
    assert resolve_num_classes(folder_cfg(root)) == 3

    # The written lists are PySlowFast `path label` lines, relative to ROOT (paths with spaces too).
    train_csv = (root / "splits" / "train.csv").read_text().splitlines()
    assert train_csv == [f"{p} {lab}" for p, lab in lists["train"]]

    loader = build_loader(folder_cfg(root), "val", **SIZES)
    assert loader.class_names == ["apple", "mango", "zebra crossing"] and loader.num_videos == 3
    rows = list(loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert np.concatenate([b["label"] for b in rows]).tolist() == [0, 1, 2, 0]  # padded to whole batches


def test_folder_split_is_deterministic_and_a_class_split_depends_on_that_class_only(tmp_path):
    counts = {"apple": 10, "mango": 7}
    first, second, third = (tmp_path / n for n in ("first", "second", "third"))
    class_folders(first, counts)
    shutil.copytree(first, second)
    class_folders(third, {"banana": 4, **counts})
    one, two, three = (listed(folder_cfg(r), r) for r in (first, second, third))
    assert one == two
    for split in SPLITS:
        assert (first / "splits" / f"{split}.csv").read_bytes() == (second / "splits" / f"{split}.csv").read_bytes()
        # Another class in the folder shifts the ids but not which apple and mango videos go where.
        assert sorted(p for p, _ in one[split]) == sorted(p for p, _ in three[split] if not p.startswith("banana"))


def test_folder_split_is_written_once_and_a_changed_folder_keeps_it_with_one_warning(tmp_path, caplog):
    root = tmp_path / "videos"
    class_folders(root, {"apple": 6, "mango": 6})
    before = listed(folder_cfg(root), root)
    written = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (root / "splits").iterdir()}
    assert sorted(written) == ["split.json", "test.csv", "train.csv", "val.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["videos"]  # no staging folder left behind

    write_video(root / "mango" / "mango_new.mp4", 90)
    (root / "apple" / "apple_0.mp4").unlink()
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        for _ in range(3):
            assert listed(folder_cfg(root), root) == before
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (root / "splits").iterdir()} == written
    (warning,) = data_warnings(caplog)
    assert "the videos changed since" in warning and "12 then, 12 now" in warning
    assert "the written split is kept" in warning and f"delete {root / 'splits'} to split again" in warning

    # Other fractions for a written split: an error, never a silent re-split.
    with pytest.raises(DataError, match=r"data.split_fractions=\[0.6, 0.2, 0.2\]: .*splits was split with "
                                        r"\[0.8, 0.1, 0.1\]"):
        load_split(folder_cfg(root, split_fractions=[0.6, 0.2, 0.2]), root, "train")
    shutil.rmtree(root / "splits")
    resplit = listed(folder_cfg(root, split_fractions=[0.5, 0.25, 0.25]), root)
    assert [len(resplit[s]) for s in SPLITS] == [6, 3, 3]  # apple's 5 videos now: 3/1/1, mango's 7: 3/2/2
    for bad in ([0.5, 0.5], [0.9, 0.2, -0.1], [0.8, 0.1, 0.2]):
        with pytest.raises(DataError, match=r"data.split_fractions=.*must be three fractions > 0"):
            load_split(folder_cfg(root, split_fractions=bad), root, "train")


def test_folder_class_with_too_few_videos_trains_with_one_warning(tmp_path, caplog):
    root = tmp_path / "videos"
    class_folders(root, {"common": 8, "rare": 2, "unique": 1})
    cfg = folder_cfg(root)
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        assert resolve_num_classes(cfg) == 3
        loaders = {split: build_loader(cfg, split, **SIZES, batch_size=1) for split in SPLITS}
    lists = listed(cfg, root)
    assert sorted(lab for _, lab in lists["train"]) == [0] * 6 + [1, 1, 2]
    assert {lab for s in ("val", "test") for _, lab in lists[s]} == {0}
    assert loaders["train"].num_classes == 3
    rows = loaders["train"].dataset.create_dict_iterator(num_epochs=1, output_numpy=True)
    labels = np.concatenate([b["label"] for b in rows])
    assert sorted(labels.tolist()) == [0] * 6 + [1, 1, 2]
    assert data_warnings(caplog) == [f"{root}: class(es) with fewer videos than the 3 splits train on all of them "
                                     f"and are neither validated nor tested: rare (2 videos), unique (1 video)"]


def test_folder_num_classes_is_derived_and_a_given_one_that_disagrees_names_both(tmp_path):
    root = tmp_path / "videos"
    class_folders(root, {"apple": 3, "mango": 3, "plum": 3})
    cfg = compose_config("data=folder", f"data.root={root}")
    assert cfg.data.num_classes is None and list(cfg.data.split_fractions) == [0.8, 0.1, 0.1]
    assert resolve_num_classes(cfg.data) == 3
    assert resolve_num_classes(folder_cfg(root, num_classes=3)) == 3
    with pytest.raises(DataError, match=r"data.root=.*videos: 3 classes \(class folders\) but data.num_classes=5"):
        build_loader(folder_cfg(root, num_classes=5), "train", **SIZES)
    with pytest.raises(DataError, match=r"data.root=.*empty: no class folders with videos"):
        (tmp_path / "empty" / "nothing here").mkdir(parents=True)
        resolve_num_classes(folder_cfg(tmp_path / "empty"))


def test_folder_reads_the_users_own_lists_and_writes_to_a_given_splits_dir(tmp_path):
    root = tmp_path / "videos"
    class_folders(root, {"apple": 3, "mango": 3})
    mine = tmp_path / "my_lists"
    mine.mkdir()
    (mine / "train.csv").write_text("apple/apple_0.mp4 0\nmango/mango_0.mp4 1\nmango/mango_1.avi 1\n")
    (mine / "val.csv").write_text("apple/apple_1.avi 0\n")
    (mine / "test.csv").write_text(f"{root / 'mango' / 'mango_2.mkv'} 1\n")
    cfg = folder_cfg(root, splits_dir=str(mine))
    assert listed(cfg, root) == {"train": [("apple/apple_0.mp4", 0), ("mango/mango_0.mp4", 1),
                                           ("mango/mango_1.avi", 1)],
                                 "val": [("apple/apple_1.avi", 0)], "test": [("mango/mango_2.mkv", 1)]}
    # PySlowFast lists name classes by id, as data=k400 reads them; nothing is written.
    assert load_split(cfg, root, "val").class_names == ["0", "1"]
    assert sorted(p.name for p in mine.iterdir()) == ["test.csv", "train.csv", "val.csv"]
    assert not (root / "splits").exists()
    (mine / "val.csv").write_text("apple/apple_1.avi 0\nmango/mango_2.mkv two\n")
    with pytest.raises(DataError, match=r"my_lists/val\.csv:2: malformed line"):
        load_split(cfg, root, "val")

    elsewhere = tmp_path / "new" / "splits"
    listed(folder_cfg(root, splits_dir=str(elsewhere)), root)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["split.json", "test.csv", "train.csv", "val.csv"]
    assert not (root / "splits").exists()
    # A folder of something else is never written into.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"taken: exists and holds no train.csv"):
        load_split(folder_cfg(root, splits_dir=str(tmp_path / "taken")), root, "train")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


# --- HMDB51 -------------------------------------------------------------------------------------------------------


def test_hmdb51_classes_splits_and_val_reading_the_test_videos(tmp_path):
    marks = {"climb_stairs": [("c_s_1.avi", 1), ("c_s_2.avi", 2), ("c_s_3.avi", 0)],
             "climb": [("c_1.avi", 2), ("c_2.avi", 1)],
             "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 1), ("b_2.avi", 0), ("b_3.avi", 2)]}
    hmdb51(tmp_path, marks)
    # Split 2 marks other videos (the files of split 1 stay).
    hmdb51(tmp_path, {"climb_stairs": [("c_s_1.avi", 2), ("c_s_2.avi", 1), ("c_s_3.avi", 1)],
                      "climb": [("c_1.avi", 1), ("c_2.avi", 2)],
                      "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0), ("b_2.avi", 1),
                                     ("b_3.avi", 2)]}, folds=(2,))
    cfg = hmdb_cfg(tmp_path, num_classes=3)
    # Alphabetical class names (not the split files' order: climb_stairs_test... sorts before climb_test...).
    assert load_split(cfg, tmp_path, "train").class_names == ["brush_hair", "climb", "climb_stairs"]
    lists = listed(cfg, tmp_path)
    assert lists["train"] == [("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 0), ("climb/c_2.avi", 1),
                              ("climb_stairs/c_s_1.avi", 2)]
    assert lists["val"] == lists["test"] == [("brush_hair/b_3.avi", 0), ("climb/c_1.avi", 1),
                                             ("climb_stairs/c_s_2.avi", 2)]
    fold2 = listed(hmdb_cfg(tmp_path, num_classes=3, split=2), tmp_path)
    assert fold2["train"] == [("brush_hair/b_2.avi", 0), ("climb/c_1.avi", 1), ("climb_stairs/c_s_2.avi", 2),
                              ("climb_stairs/c_s_3.avi", 2)]
    rows = list(build_loader(cfg, "test", **SIZES).dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    index = np.concatenate([b["video_index"] for b in rows])
    assert index.tolist() == [0] * 6 + [1] * 6 + [2] * 6

    # The split files straight in ROOT, and the videos in a subfolder the group names.
    flat = tmp_path / "flat"
    hmdb51(flat, marks, annotation_dir=".")
    (flat / "videos").mkdir()
    for name in marks:
        shutil.move(str(flat / name), str(flat / "videos" / name))
    videos = load_split(hmdb_cfg(flat, num_classes=3, video_dir="videos"), flat, "test")
    assert os.path.relpath(videos.paths[1], flat) == "videos/climb/c_1.avi"


def test_hmdb51_annotation_errors_name_file_and_line(tmp_path):
    hmdb51(tmp_path, {"clap": [("c1.avi", 1), ("c2.avi", 2)], "hug": [("h1.avi", 1), ("h2.avi", 2)]})
    with pytest.raises(DataError, match=rf"{HMDB_SPLITS}/\*_test_split1\.txt: defines 2 classes but "
                                        r"data.num_classes=51 \(set data.num_classes=2"):
        load_split(hmdb_cfg(tmp_path, num_classes=51), tmp_path, "train")
    with pytest.raises(DataError, match=r"data.split=4: HMDB51 has train/test splits 1, 2 and 3"):
        load_split(hmdb_cfg(tmp_path, num_classes=2, split=4), tmp_path, "train")
    with pytest.raises(DataError, match=r"<class>_test_split3\.txt: no HMDB51 split files found"):
        load_split(hmdb_cfg(tmp_path, num_classes=2, split=3), tmp_path, "train")
    (tmp_path / HMDB_SPLITS / "hug_test_split1.txt").write_text("h1.avi 1 \nh2.avi 3 \n")
    with pytest.raises(DataError, match=r"hug_test_split1\.txt:2: malformed line 'h2.avi 3'"):
        load_split(hmdb_cfg(tmp_path, num_classes=2), tmp_path, "train")


# --- Something-Something v2 ---------------------------------------------------------------------------------------

LABELS = ["Pushing something from right to left", "Pushing something from left to right",
          "Putting something on a surface"]


def test_ssv2_template_without_brackets_is_the_class_and_val_test_read_validation(tmp_path):
    ssv2(tmp_path, LABELS, {"train": [("11", "Pushing [something] from left to right"),
                                      ("12", "Putting [something] on a surface"),
                                      ("13", "Pushing [something] from right to left")],
                            "validation": [("21", "Putting [something] on a surface")]})
    (tmp_path / "labels" / "test.json").write_text('[{"id": "31"}]')  # published without labels: never read
    cfg = ssv2_cfg(tmp_path, num_classes=3)
    assert load_split(cfg, tmp_path, "train").class_names == LABELS  # the ids of labels.json, not alphabetical
    lists = listed(cfg, tmp_path)
    videos = "20bn-something-something-v2"
    assert lists["train"] == [(f"{videos}/11.webm", 1), (f"{videos}/12.webm", 2), (f"{videos}/13.webm", 0)]
    assert lists["val"] == lists["test"] == [(f"{videos}/21.webm", 2)]
    rows = list(build_loader(cfg, "val", **SIZES).dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert rows[0]["video_index"].tolist() == [0, -1] and rows[0]["label"][0] == 2

    # The json files and the videos straight in ROOT.
    flat = tmp_path / "flat"
    ssv2(flat, LABELS, {"train": [("1", "Putting [something] on a surface")], "validation": []},
         annotation_dir=".", video_dir=".")
    videos = load_split(ssv2_cfg(flat, num_classes=3, video_dir=None), flat, "train")
    assert (videos.paths[0], videos.labels.tolist()) == (str(flat / "1.webm"), [2])
    with pytest.raises(DataError, match=r"validation\.json: expected a non-empty JSON object or array"):
        load_split(ssv2_cfg(flat, num_classes=3), flat, "val")


def test_ssv2_annotation_errors_name_file_and_line(tmp_path):
    ssv2(tmp_path, LABELS, {"train": [("11", "Pushing [something] from left to right")], "validation": []})
    labels = tmp_path / "labels"
    cfg = ssv2_cfg(tmp_path, num_classes=3)
    with pytest.raises(DataError, match=r"labels\.json: defines 3 classes but data.num_classes=174"):
        load_split(ssv2_cfg(tmp_path, num_classes=174), tmp_path, "train")
    (labels / "train.json").write_text('[\n {"id": "1", "template": "Pushing [something] from left to right"},\n'
                                       ' {"id": "2", "label": "pushing cup"},\n'
                                       ' {"id": "3", "template": "Pushing [something]"}\n]\n')
    with pytest.raises(DataError, match=r"train\.json:3: malformed entry: expected an object with \"id\" and "):
        load_split(cfg, tmp_path, "train")
    (labels / "train.json").write_text('[{"id": "1", "template": "Pushing [something] from left to right"}, '
                                       '{"id": "3", "template": "Pushing [something] to the side"}]')
    with pytest.raises(DataError, match=r"train\.json:1: unknown class 'Pushing something to the side'"):
        load_split(cfg, tmp_path, "train")
    (labels / "train.json").write_text('[\n {"id": "1", "template": "x"},\n {"id": "2" "template": "y"}\n]\n')
    with pytest.raises(DataError, match=r"train\.json:3: not valid JSON \(Expecting ','"):
        load_split(cfg, tmp_path, "train")
    (labels / "labels.json").write_text('{\n "Pushing something": "0",\n "Holding something": "0"\n}\n')
    with pytest.raises(DataError, match=r"labels\.json:3: class id 0 appears twice"):
        load_split(cfg, tmp_path, "train")


def test_ssv2_training_never_flips_and_the_other_groups_still_do(tmp_path):
    """Left and right are SSv2 classes: with data.train_flip false (the ssv2 group) every training clip keeps the
    video's left-to-right grey ramp, whatever the seed; with the default (true) some seeds mirror it."""
    ssv2(tmp_path, LABELS, {"train": [("1", "Pushing [something] from left to right"),
                                      ("2", "Pushing [something] from right to left")], "validation": []},
         ramp_to=250)

    def left_minus_right(train_flip):
        out = []
        for seed in range(6):
            loader = build_loader(ssv2_cfg(tmp_path, num_classes=3, train_flip=train_flip), "train", **SIZES,
                                  seed=seed, batch_size=1)
            for batch in loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
                clip = batch["clip"][0]  # [3, T, H, W]
                half = clip.shape[-1] // 2
                out.append(float(clip[..., :half].mean() - clip[..., half:].mean()))
        return np.array(out)

    assert compose_config("data=ssv2").data.train_flip is False
    assert compose_config("data=k400").data.train_flip is True
    kept = left_minus_right(False)
    assert len(kept) == 12 and (kept < -0.1).all(), kept
    flipped = left_minus_right(True)
    assert (flipped > 0.1).any() and (flipped < -0.1).any(), flipped


# --- Bad files in each new layout ---------------------------------------------------------------------------------


def _folder_with_bad_file(root):
    class_folders(root, {"apple": 5, "mango": 5})
    cfg = folder_cfg(root)
    first = load_split(cfg, root, "train").paths[0]
    Path(first).write_bytes(b"")
    return cfg, first, "empty file (0 bytes)"


def _hmdb_with_bad_file(root):
    hmdb51(root, {"clap": [(f"c{k}.avi", 1) for k in range(5)], "hug": [(f"h{k}.avi", 1) for k in range(5)]})
    bad = root / "hug" / "h2.avi"
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 3])
    return hmdb_cfg(root, num_classes=2), str(bad), ""


def _ssv2_with_bad_file(root):
    ssv2(root, LABELS, {"train": [(str(k), "Putting [something] on a surface") for k in range(10)],
                        "validation": []})
    bad = root / "20bn-something-something-v2" / "4.webm"
    bad.write_text("<html><body>404 Not Found</body></html>\n")
    return ssv2_cfg(root, num_classes=3), str(bad), "not a readable video"


@pytest.mark.parametrize("layout", [_folder_with_bad_file, _hmdb_with_bad_file, _ssv2_with_bad_file],
                         ids=["folder", "hmdb51", "ssv2"])
def test_a_bad_file_in_each_new_layout_is_skipped_counted_and_logged_once(layout, tmp_path, caplog):
    cfg, bad, reason = layout(tmp_path / "data")
    cfg.max_bad_fraction = 0.2
    loader = build_loader(cfg, "train", **SIZES, bad_log_dir=tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        iterator = loader.dataset.create_dict_iterator(num_epochs=2, output_numpy=True)
        for _ in range(2):
            rows = list(iterator)
            # Every slot is filled: the bad video's is refilled by another.
            assert len(rows) == loader.steps_per_epoch == loader.num_videos // 2
            assert all(np.isfinite(b["clip"]).all() for b in rows)
    assert list(loader.bad_videos()) == [bad] and reason in loader.bad_videos()[bad]
    assert [w for w in data_warnings(caplog) if bad in w] == [f"bad video skipped: {bad} ({loader.bad_videos()[bad]})"]
    loader.check_bad_fraction()
    cfg.max_bad_fraction = 0.05
    strict = build_loader(cfg, "train", **SIZES, bad_log_dir=tmp_path / "bad")
    with pytest.raises(DataError, match=r"1 of \d+ train videos are bad, more than data.max_bad_fraction=0.05"):
        strict.check_bad_fraction()


def test_the_new_groups_compose_with_their_counts_and_folders():
    hmdb, something, own = (compose_config(f"data={g}").data for g in ("hmdb51", "ssv2", "folder"))
    assert (hmdb.format, hmdb.num_classes, hmdb.annotation_dir, hmdb.video_dir, hmdb.split) == (
        "hmdb51", 51, HMDB_SPLITS, None, 1)
    assert (something.format, something.num_classes, something.annotation_dir, something.video_dir) == (
        "ssv2", 174, "labels", "20bn-something-something-v2")
    assert (own.format, own.num_classes, own.splits_dir) == ("folder", None, None)
    for group in (hmdb, something, own):
        assert (group.batch_size, group.num_workers, group.test_num_clips, group.test_num_crops) == (8, "auto", 10, 3)
