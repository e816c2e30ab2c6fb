"""Data tests on tiny real videos in each published layout (no mocks: real PyAV encoding, decord, MindSpore)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data_helpers.layouts import (SIZES, data_cfg, kinetics_labels, kinetics_official, slowfast_lists, tiny_copy,
                                        ucf101, write_video)
from x3d_exp.data import DataError, build_loader, ensure_synthetic, load_video_views
from x3d_exp.data.synthetic import CLASSES, render
from x3d_exp.data.video import clip_frame_indices

T, CROP, TEST_CROP = SIZES["num_frames"], SIZES["crop_size"], SIZES["test_crop_size"]


def batches(loader):
    return list(loader.dataset.create_dict_iterator(num_epochs=1, output_numpy=True))


def column(rows, name):
    return np.concatenate([b[name] for b in rows])


def grey_levels(clip):
    """Mean pixel value of each frame of a normalised clip [3, T, H, W], back on the 0-255 scale."""
    return ((clip * 0.225 + 0.45) * 255).mean(axis=(0, 2, 3))


@pytest.fixture(scope="session")
def kinetics_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("k400")
    # Train lists classes out of alphabetical order: ids must still follow the alphabet.
    rows = {"train": [("zumba", "z1"), ("archery", "a1"), ("juggling balls", "j1"),
                      ("zumba", "z2"), ("archery", "a2"), ("juggling balls", "j2")],
            "val": [("juggling balls", "vj"), ("zumba", "vz"), ("archery", "va")],
            "test": [("zumba", "tz"), ("archery", "ta")]}
    # The official val csv may call its split `validate`; its videos live in ROOT/val.
    paths = kinetics_official(root, rows, split_column={"val": "validate"})
    return root, paths


def test_kinetics_classes_are_alphabetical_and_val_labels_follow(kinetics_root):
    root, _ = kinetics_root
    loader = build_loader(data_cfg(root), "val", **SIZES)
    assert loader.class_names == ["archery", "juggling balls", "zumba"]
    assert loader.num_classes == 3 and loader.num_videos == 3
    rows = batches(loader)
    index, label = column(rows, "video_index"), column(rows, "label")
    # 3 videos padded to whole batches of 2: the padding row has video_index -1.
    assert index.tolist() == [0, 1, 2, -1]
    assert label[:3].tolist() == [1, 2, 0]
    assert loader.bad_videos() == {}


def test_clip_shapes_and_frame_sampling(kinetics_root):
    root, _ = kinetics_root
    cfg = data_cfg(root)
    train = build_loader(cfg, "train", **SIZES)
    rows = batches(train)
    assert train.steps_per_epoch == 3 == len(rows)
    assert rows[0]["clip"].shape == (2, 3, T, CROP, CROP) and rows[0]["clip"].dtype == np.float32
    assert rows[0]["label"].dtype == np.int32
    assert sorted(column(rows, "label").tolist()) == [0, 0, 1, 1, 2, 2]

    val = batches(build_loader(cfg, "val", **SIZES))
    assert val[0]["clip"].shape == (2, 3, T, TEST_CROP, TEST_CROP)
    # Video k has grey level 10k + t in frame t. 16 frames, step 2 at 30 fps, window of 8: the centre clip
    # starts at frame 4.
    np.testing.assert_allclose(grey_levels(val[0]["clip"][1]), 10 + np.array([4, 6, 8, 10]), atol=1.5)

    test = build_loader(cfg, "test", **SIZES)
    rows = batches(test)
    clips, index = column(rows, "clip"), column(rows, "video_index")
    assert clips.shape == (2 * 2 * 3, 3, T, TEST_CROP, TEST_CROP)
    assert index.tolist() == [0] * 6 + [1] * 6
    # Two clips spread uniformly (starts 2 and 6), three crops each, clip-major.
    for view, start in enumerate([2, 2, 2, 6, 6, 6]):
        np.testing.assert_allclose(grey_levels(clips[6 + view]), 10 + start + 2 * np.arange(T), atol=1.5)


def test_frame_indices_follow_the_target_fps_and_loop_short_videos():
    # 60 fps video, sampling rate 2 at 30 fps -> every 4th frame.
    assert clip_frame_indices(100, 60.0, 4, 2, 30, 0.0).tolist() == [0, 4, 8, 12]
    assert clip_frame_indices(100, 60.0, 4, 2, 30, 1.0).tolist() == [84, 88, 92, 96]
    assert clip_frame_indices(5, 30.0, 4, 2, 30, 0.5).tolist() == [0, 2, 4, 1]


def test_three_test_crops_cover_left_centre_right(tmp_path):
    video = tmp_path / "wide.mp4"
    # Grey level rises left to right: the three crops must have increasing means.
    ramp = np.linspace(0, 240, 64).astype(np.uint8)
    import av

    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.options = {"crf": "0"}
        for _ in range(8):
            image = np.repeat(np.repeat(ramp[None, :, None], 32, 0), 3, 2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    views = load_video_views(video, num_frames=2, sampling_rate=1, test_crop_size=32, num_clips=1, num_crops=3)
    assert views.shape == (3, 3, 2, 32, 32)
    means = [grey_levels(v).mean() for v in views]
    assert means[0] + 30 < means[1] < means[2] - 30


def test_load_video_views_names_the_bad_path(tmp_path):
    with pytest.raises(DataError, match="missing.mp4: missing file"):
        load_video_views(tmp_path / "missing.mp4", num_frames=2, sampling_rate=1, test_crop_size=16,
                         num_clips=1, num_crops=1)
    page = tmp_path / "page.mp4"
    page.write_text("<html><body>404 Not Found</body></html>\n")
    with pytest.raises(DataError, match="page.mp4: not a readable video"):
        load_video_views(page, num_frames=2, sampling_rate=1, test_crop_size=16, num_clips=1, num_crops=1)


def test_widths_decord_cannot_copy_are_decoded(tmp_path):
    # decord 0.6.0 cannot hand back frames 48 or 72 pixels wide, native or resized; the reader works around it.
    write_video(tmp_path / "w72.mp4", 50, width=72, height=40)
    write_video(tmp_path / "w48.mp4", 50, width=48, height=64)
    for name, short_side in (("w72.mp4", 40), ("w48.mp4", 48), ("w48.mp4", 72)):
        views = load_video_views(tmp_path / name, num_frames=2, sampling_rate=1, test_crop_size=short_side,
                                 num_clips=1, num_crops=1)
        assert views.shape == (1, 3, 2, short_side, short_side)
        # The centre clip of 16 frames: frames 7 and 8.
        np.testing.assert_allclose(grey_levels(views[0]), [57, 58], atol=1.5)


def test_slowfast_lists_relative_and_absolute(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "x.mp4"
    root = tmp_path / "root"
    root.mkdir()
    slowfast_lists(root, {"train": [("videos/a.mp4", 0), ("videos/b.mp4", 1), (str(elsewhere), 2),
                                    ("videos/c.mp4", 2)],
                          "val": [("videos/v.mp4", 2), (str(elsewhere), 1)]})
    loader = build_loader(data_cfg(root), "val", **SIZES)
    assert loader.class_names == ["0", "1", "2"]
    rows = batches(loader)
    assert column(rows, "label").tolist() == [2, 1]
    assert column(rows, "video_index").tolist() == [0, 1]
    assert len(batches(build_loader(data_cfg(root), "train", **SIZES))) == 2


def test_ucf101_crlf_lists_labels_from_classind_and_folders(tmp_path):
    classes = ["ApplyEyeMakeup", "Basketball", "HandstandPushups"]
    # As published, file names and folders disagree in case for HandstandPushups.
    train = [("Basketball/v_Basketball_g01_c01.avi", 2), ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 1),
             ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 3), ("Basketball/v_Basketball_g02_c01.avi", 2)]
    test = ["HandstandPushups/v_HandStandPushups_g05_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g05_c01.avi"]
    ucf101(tmp_path, classes, train, test)
    assert b"\r\n" in (tmp_path / "ucfTrainTestlist" / "testlist01.txt").read_bytes()
    cfg = data_cfg(tmp_path, format="ucf101", num_classes=3, split=1)
    test_loader = build_loader(cfg, "test", **SIZES)
    assert test_loader.class_names == classes
    rows = batches(test_loader)
    assert column(rows, "label").tolist() == [2] * 6 + [0] * 6
    assert column(rows, "clip").shape == (12, 3, T, TEST_CROP, TEST_CROP)
    assert test_loader.bad_videos() == {}
    train_labels = column(batches(build_loader(cfg, "train", **SIZES, seed=3)), "label")
    assert sorted(train_labels.tolist()) == [0, 1, 1, 2]
    with pytest.raises(DataError, match=r"data.split=4"):
        build_loader(data_cfg(tmp_path, format="ucf101", num_classes=3, split=4), "train", **SIZES)


@pytest.fixture()
def bad_root(tmp_path):
    """Ten training videos, five of them broken in each of the ways real downloads break."""
    root = tmp_path / "k"
    labels = ["a", "b"] * 5
    paths = kinetics_official(root, {"train": [(lab, f"v{i}") for i, lab in enumerate(labels)],
                                     "val": [(lab, f"w{i}") for i, lab in enumerate(labels[:4])]})
    train, val = paths["train"], paths["val"]
    train[0].unlink()  # missing
    train[1].write_bytes(b"")  # empty
    data = train[2].read_bytes()
    train[2].write_bytes(data[:len(data) // 2])  # truncated
    train[3].write_text("<html><head><title>404</title></head><body>Not Found</body></html>\n")  # not a video
    import av

    with av.open(str(train[4]), "w") as container:  # a container with no frames
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        container.start_encoding()
    val[1].write_bytes(b"")
    return root, {str(p) for p in train[:5]}, str(val[1])


def test_bad_files_are_skipped_counted_and_logged_once(bad_root, caplog):
    root, bad, _ = bad_root
    loader = build_loader(data_cfg(root, num_classes=2, max_bad_fraction=0.6), "train", **SIZES)
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        for _ in range(2):
            rows = batches(loader)
            # Every slot is filled (bad videos replaced), so training never sees a hole.
            assert len(rows) == loader.steps_per_epoch == 5
            assert all(np.isfinite(b["clip"]).all() and b["clip"].shape == (2, 3, T, CROP, CROP) for b in rows)
    found = loader.bad_videos()
    assert set(found) == bad
    reasons = " ".join(found.values())
    assert "missing file" in reasons and "empty file (0 bytes)" in reasons and "no video stream" in reasons
    warned = [r.getMessage() for r in caplog.records if r.name == "x3d_exp.data"]
    assert sorted(len([w for w in warned if path in w]) for path in bad) == [1] * 5
    loader.check_bad_fraction()
    strict = build_loader(data_cfg(root, num_classes=2, max_bad_fraction=0.05), "train", **SIZES,
                          bad_log_dir=Path(loader.bad_log_path).parent)
    with pytest.raises(DataError, match=r"5 of 10 train videos are bad.*max_bad_fraction=0.05"):
        strict.check_bad_fraction()


def test_bad_files_counted_once_across_worker_processes(bad_root, tmp_path):
    root, bad, bad_val = bad_root
    logs = tmp_path / "bad_logs"
    cfg = data_cfg(root, num_classes=2, num_workers=2)
    train = build_loader(cfg, "train", **SIZES, bad_log_dir=logs)
    iterator = train.dataset.create_dict_iterator(num_epochs=2, output_numpy=True)
    for _ in range(2):
        assert sum(1 for _ in iterator) == 5
    assert set(train.bad_videos()) == bad
    assert len((logs / "bad_videos_train_shard0of1.jsonl").read_text().splitlines()) == 5
    val = build_loader(cfg, "val", **SIZES, bad_log_dir=logs)
    rows = batches(val)
    # The empty val video gives its row video_index -1, the engine ignores it.
    assert column(rows, "video_index").tolist() == [0, -1, 2, 3]
    assert set(val.bad_videos()) == {bad_val}


def test_training_order_is_seeded_changes_per_epoch_and_shards_split_it(kinetics_root):
    root, _ = kinetics_root
    cfg = data_cfg(root)

    def two_epochs(seed, **shard):
        loader = build_loader(cfg, "train", **SIZES, seed=seed, batch_size=1, **shard)
        iterator = loader.dataset.create_dict_iterator(num_epochs=2, output_numpy=True)
        return [np.stack([b["clip"][0] for b in iterator]) for _ in range(2)]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], other[0])

    loaders = [build_loader(cfg, "val", **SIZES, shard_id=i, num_shards=2) for i in range(2)]
    indices = [set(column(batches(ld), "video_index").tolist()) - {-1} for ld in loaders]
    assert indices[0].isdisjoint(indices[1]) and indices[0] | indices[1] == {0, 1, 2}
    assert [ld.num_videos for ld in loaders] == [2, 1]
    train_shards = [build_loader(cfg, "train", **SIZES, shard_id=i, num_shards=2, batch_size=1) for i in range(2)]
    assert [ld.num_videos for ld in train_shards] == [3, 3]
    labels = [sorted(column(batches(ld), "label").tolist()) for ld in train_shards]
    assert sorted(labels[0] + labels[1]) == [0, 0, 1, 1, 2, 2]


def write_csv(root: Path, name: str, lines):
    (root / name).write_text("\n".join(lines) + "\n")


def test_annotation_errors_name_file_and_line(kinetics_root, tmp_path):
    good, _ = kinetics_root
    header = "label,youtube_id,time_start,time_end,split"
    write_csv(tmp_path, "kinetics-400_train.csv", [header, "archery,a1,0,10,train", "archery,a2,0,train",
                                                   "zumba,z1,0,10,train"])
    with pytest.raises(DataError, match=r"kinetics-400_train\.csv:3: malformed line"):
        build_loader(data_cfg(tmp_path, num_classes=2), "train", **SIZES)

    write_csv(tmp_path, "kinetics-400_train.csv", [header, "archery,a1,0,10,train", "zumba,z1,0,10,train"])
    write_csv(tmp_path, "kinetics-400_val.csv", [header, "archery,a1,0,10,val", "bowling,b1,0,10,val"])
    with pytest.raises(DataError, match=r"kinetics-400_val\.csv:3: unknown class 'bowling'"):
        build_loader(data_cfg(tmp_path, num_classes=2), "val", **SIZES)

    with pytest.raises(DataError, match=r"kinetics-400_train\.csv: defines 3 classes but data.num_classes=400"):
        build_loader(data_cfg(good, num_classes=400), "train", **SIZES)

    lists = tmp_path / "lists"
    lists.mkdir()
    write_csv(lists, "train.csv", ["a.mp4 0", "b.mp4 one"])
    with pytest.raises(DataError, match=r"train\.csv:2: malformed line"):
        build_loader(data_cfg(lists), "train", **SIZES)

    with pytest.raises(DataError, match=r"kinetics-400_test\.csv: annotation file not found"):
        build_loader(data_cfg(lists), "test", **SIZES)
    with pytest.raises(DataError, match=r"data.root=.*nowhere: directory not found"):
        build_loader(data_cfg(tmp_path / "nowhere"), "train", **SIZES)
    with pytest.raises(DataError, match=r"data.root is not set"):
        build_loader(data_cfg(None), "train", **SIZES)

    ucf = tmp_path / "ucf"
    (ucf / "ucfTrainTestlist").mkdir(parents=True)
    (ucf / "ucfTrainTestlist" / "classInd.txt").write_bytes(b"1 Archery\r\n2 Bowling\r\nthree Cycling\r\n")
    with pytest.raises(DataError, match=r"classInd\.txt:3: malformed line"):
        build_loader(data_cfg(ucf, format="ucf101", num_classes=3), "train", **SIZES)


def motion_per_frame(video):
    """The (dy, dx) shift that best maps frame 0 onto frame 1 where the frames differ (the static background
    would otherwise favour no shift); (0, 0) when nothing changed."""
    a, b = video[0].astype(np.int16), video[1].astype(np.int16)
    changed = np.any(a != b, axis=-1)
    if not changed.any():
        return 0, 0
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    errors = [np.abs(np.roll(a, s, axis=(0, 1)) - b)[changed].mean() for s in shifts]
    return shifts[int(np.argmin(errors))]


def test_synthetic_classes_differ_only_in_motion():
    directions = {"moving_down": set(), "moving_sideways": set(), "moving_up": set(), "standing_still": set()}
    for seed in range(6):
        for motion in CLASSES:
            # Faster than the default (0.4-0.55% of the frame per frame) so that two frames of 32 px differ.
            dy, dx = motion_per_frame(render(np.random.default_rng(seed), motion, 2, 32, speed=(0.05, 0.06)))
            directions[motion].add((int(np.sign(dy)), int(np.sign(dx))))
    assert directions == {"moving_down": {(1, 0)}, "moving_sideways": {(0, 1), (0, -1)},
                          "moving_up": {(-1, 0)}, "standing_still": {(0, 0)}}


def synthetic_cfg(root, seed=0):
    cfg = data_cfg(root, name="synthetic", format="synthetic", annotation_prefix="synthetic", num_classes=4)
    cfg.synthetic.update(train_per_class=2, val_per_class=1, test_per_class=1, frames=12, size=32, seed=seed)
    return cfg


def test_synthetic_is_deterministic_atomic_and_reused(tmp_path):
    one, two, other = (ensure_synthetic(synthetic_cfg(tmp_path / n, seed=s))
                       for n, s in (("one", 0), ("two", 0), ("other", 1)))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".mp4"]) == 16
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (one / "train/train000000_000000_000001.mp4").read_bytes() != \
        (other / "train/train000000_000000_000001.mp4").read_bytes()
    # Nothing but the dataset is left next to it (no staging folder), in a folder named for its size and parameters.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "other", "two"]
    assert [p.name for p in (tmp_path / "one").iterdir()] == [one.name] and one.name.startswith("32px-")
    assert one.name == two.name != other.name
    stamp = (one / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(synthetic_cfg(tmp_path / "one")) == one
    assert (one / "synthetic.json").stat().st_mtime_ns == stamp

    loader = build_loader(synthetic_cfg(tmp_path / "one"), "val", num_frames=4, sampling_rate=2, crop_size=32,
                          test_crop_size=32, train_scale=[32, 40])
    assert loader.class_names == list(CLASSES)
    rows = batches(loader)
    assert column(rows, "label").tolist() == [0, 1, 2, 3]
    assert rows[0]["clip"].shape == (2, 3, 4, 32, 32)

    # Another set of parameters gets its own folder: the first set is not replaced.
    bigger = synthetic_cfg(tmp_path / "one")
    bigger.synthetic.size = "auto"
    assert ensure_synthetic(bigger, min_size=70).name.startswith("96px-")
    assert (one / "synthetic.json").stat().st_mtime_ns == stamp

    # A folder of that name that is not a generated dataset is never overwritten.
    user = tmp_path / "user" / one.name
    user.mkdir(parents=True)
    (user / "precious.txt").write_text("mine")
    with pytest.raises(DataError, match="not a generated synthetic dataset"):
        ensure_synthetic(synthetic_cfg(tmp_path / "user"))
    assert (user / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_synthetic_label_is_in_the_motion_not_in_a_frame(tmp_path):
    """A small 3D CNN learns the default synthetic set from X3D-XS's clips (4 frames 12 apart) and stays near chance
    from one frame."""
    root = tmp_path / "synthetic"
    repo = Path(__file__).resolve().parents[1]

    def proxy(num_frames, epochs):
        env = dict(os.environ, PYTHONPATH=str(repo))
        done = subprocess.run([sys.executable, str(repo / "tests" / "data_helpers" / "motion_proxy.py"), str(root),
                               str(num_frames), str(epochs)], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])["val_top1"]

    assert proxy(4, 5) >= 0.9
    assert proxy(1, 3) <= 0.5


def test_num_workers_auto_is_one_per_core_and_a_larger_number_is_clamped_with_one_warning(caplog):
    from x3d_exp.data.loader import MAX_AUTO_WORKERS, resolve_num_workers, usable_cores

    cores = usable_cores()
    assert resolve_num_workers("auto") == min(cores, MAX_AUTO_WORKERS) >= 1
    assert resolve_num_workers(0) == 0 and resolve_num_workers(1) == 1
    with caplog.at_level(logging.WARNING, logger="x3d_exp.data"):
        assert resolve_num_workers(cores + 61) == cores
        assert resolve_num_workers(cores + 61) == cores
    warned = [r.getMessage() for r in caplog.records if "data.num_workers" in r.getMessage()]
    assert warned == [f"data.num_workers={cores + 61} is more than this machine's {cores} cores: using {cores}"]
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(DataError, match=r"data.num_workers=.*must be auto or a whole number >= 0"):
            resolve_num_workers(bad)


def test_a_failure_inside_the_dataset_pipeline_is_one_line_naming_the_file():
    import mindspore.dataset as ds

    from x3d_exp.data import pipeline_errors

    class Source:
        def __len__(self):
            return 8

        def __getitem__(self, index):
            if index == 3:
                raise OSError(f"cannot open /data/k400/train/clip_{index}.mp4: Input/output error")
            return (np.zeros(3, np.float32),)

    # In process: a worker process forked inside pytest aborts while formatting the error (MindSpore 2.10).
    dataset = ds.GeneratorDataset(Source(), ["x"], shuffle=False).batch(2)
    with pytest.raises(DataError) as caught:
        with pipeline_errors("data=k400"):
            for _ in dataset.create_tuple_iterator():
                pass
    assert str(caught.value) == "data=k400: OSError: cannot open /data/k400/train/clip_3.mp4: Input/output error"


@pytest.mark.slow
# k400 reads the official csvs (train and val only), k600 PySlowFast's lists. data=folder's class count is not set:
# the tiny copy has 2 class folders.
@pytest.mark.parametrize("group, classes", [("ucf101", "101"), ("k400", "400"), ("k600", "600"), ("hmdb51", "51"),
                                            ("ssv2", "174"), ("folder", "2")])
def test_each_real_data_group_runs_through_the_cli_with_its_own_defaults(group, classes, tmp_path, cache):
    """data=<group> as a user runs it: the group's batch (8), workers (auto), class count and 10x3 test views, and
    the model's own clip (X3D-XS, 4 x 160 px); only the epochs and the model's depth (tests.cli_helpers.SHALLOW: the
    data groups do not set it, and the graph compiles in half the time) are cut. A 4-core default once crashed 2-core
    machines in build_loader (num_parallel_workers out of bounds). Kinetics-400 is read from its official csvs
    with all 400 labels (one training epoch is 50 steps), so the class ids are the published names in sorted
    order; its copy has train and val csvs only, as most downloads do, so the test runs on val with one warning."""
    from tests.cli_helpers import SHALLOW, final_json, run_cli, runs_of, store_uri

    tiny_copy(group, tmp_path / group, int(classes))
    done = run_cli([f"data={group}", f"data.root={tmp_path / group}", "trainer.epochs=1", *SHALLOW,
                    f"hydra.run.dir={tmp_path / 'run'}", f"mlflow.tracking_uri={store_uri(tmp_path)}"],
                   cwd=tmp_path, cache=cache, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = final_json(done.stdout)
    assert result["test_videos"] == 1 and 0 <= result["test_top1"] <= 1
    (run,) = runs_of(store_uri(tmp_path))
    params = run.data.params
    assert (params["data.batch_size"], params["data.num_workers"], params["data.num_classes"]) == ("8", "auto",
                                                                                                   classes)
    assert (params["data.test_num_clips"], params["data.test_num_crops"]) == ("10", "3")
    assert "num_parallel_workers" not in done.stderr and "Traceback" not in done.stderr
    per_class = json.loads((tmp_path / "run" / "per_class_accuracy.json").read_text())
    assert len(per_class) == int(classes)
    # Logged by Hydra's job logging, which writes to stdout.
    output = (done.stdout + done.stderr).splitlines()
    fallback = [line for line in output if "so the test runs on the val split" in line]
    assert len(fallback) == (1 if group == "k400" else 0), done.stdout[-3000:]
    if group == "k400":
        assert f"{tmp_path / group / 'kinetics-400_test.csv'}: not found" in fallback[0]
        assert list(per_class) == sorted(kinetics_labels(400))
        assert list(per_class)[:3] == ["abseiling", "activity 000", "activity 001"]
        assert "passing American football (in game)" in per_class and "massaging person's head" in per_class


def test_several_training_clips_per_video_come_from_one_decode_each_augmented_on_its_own(
        kinetics_root, tmp_path, monkeypatch):
    root, _ = kinetics_root
    opened = count_decoder_calls(monkeypatch, tmp_path / "calls.log")
    loader = build_loader(data_cfg(root, train_clips_per_video=2), "train", **SIZES, batch_size=4, seed=5)
    # 6 videos x 2 clips = 12 clips an epoch, in batches of 4 clips (2 videos): the engine's steps and lr schedule
    # follow steps_per_epoch.
    assert loader.steps_per_epoch == 3 and loader.num_videos == 6
    rows = batches(loader)
    assert len(rows) == 3 and all(b["clip"].shape == (4, 3, T, CROP, CROP) for b in rows)
    clips, labels = column(rows, "clip"), column(rows, "label")
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert opened() == {"open": 6, "get_batch": 6}
    # Video k has grey level 10k + t in frame t: each clip is a window of 4 frames 2 apart of one video, the two
    # clips of a video (consecutive rows) are of the same video, and their windows were drawn independently.
    levels = np.stack([grey_levels(clip) for clip in clips])
    np.testing.assert_allclose(np.diff(levels, axis=1), 2, atol=1.5)
    firsts = levels[:, 0].reshape(6, 2)
    assert (np.abs(firsts[:, 0] - firsts[:, 1]) < 10).all()
    assert (firsts[:, 0] != firsts[:, 1]).any()
    # The same seed gives the same clips; each shard gets half the videos, still K clips of each.
    np.testing.assert_array_equal(column(batches(build_loader(data_cfg(root, train_clips_per_video=2), "train",
                                                              **SIZES, batch_size=4, seed=5)), "clip"), clips)
    shard = build_loader(data_cfg(root, train_clips_per_video=2), "train", **SIZES, batch_size=2, shard_id=1,
                         num_shards=2)
    assert (shard.num_videos, shard.steps_per_epoch) == (3, 3)
    with pytest.raises(DataError, match=r"data.train_clips_per_video=3 must divide data.batch_size=4"):
        build_loader(data_cfg(root, train_clips_per_video=3), "train", **SIZES, batch_size=4)


def count_decoder_calls(monkeypatch, log: Path):
    """Make every clip reader the loader opens, in this process and in the worker processes it forks, a real decord
    reader that appends one line per open and per `get_batch` to `log`; returns a function counting the lines."""
    from x3d_exp.data import video
    from x3d_exp.data.decoders import DecordReader

    class CountingReader(DecordReader):
        def get_batch(self, indices):
            with open(log, "a") as out:
                out.write(f"get_batch {self._path}\n")
            return super().get_batch(indices)

    def counting_open(path, width, height, num_threads, decoder="decord"):
        with open(log, "a") as out:
            out.write(f"open {path}\n")
        reader = CountingReader(path, width, height, num_threads)
        reader._path = path
        return reader

    monkeypatch.setattr(video, "open_reader", counting_open)

    def counts(per_path: bool = False):
        lines = log.read_text().split("\n")[:-1] if log.exists() else []
        keys = lines if per_path else [line.split(" ")[0] for line in lines]
        return {key: keys.count(key) for key in sorted(set(keys))}

    return counts


def test_each_test_video_is_decoded_once_for_all_its_views_with_two_workers(kinetics_root, tmp_path, monkeypatch):
    root, paths = kinetics_root
    opened = count_decoder_calls(monkeypatch, tmp_path / "calls.log")
    in_process = batches(build_loader(data_cfg(root), "test", **SIZES))
    assert opened(per_path=True) == {f"{call} {path}": 1 for call in ("open", "get_batch") for path in paths["test"]}
    (tmp_path / "calls.log").unlink()
    # MindSpore hands the rows to its two worker processes in turn; each video's 2 clips x 3 crops must still be
    # decoded by one of them, once.
    two_workers = batches(build_loader(data_cfg(root, num_workers=2), "test", **SIZES))
    assert opened(per_path=True) == {f"{call} {path}": 1 for call in ("open", "get_batch") for path in paths["test"]}
    # The same views, in an order that interleaves the two videos (rows are matched by video_index).
    for video in (0, 1):
        views = [np.stack(sorted((c for c, i in zip(column(rows, "clip"), column(rows, "video_index")) if i == video),
                                 key=lambda c: grey_levels(c).tolist())) for rows in (in_process, two_workers)]
        assert len(views[0]) == 6
        np.testing.assert_array_equal(views[0], views[1])
    # Training with two workers: one decode per sample of K=2 clips.
    (tmp_path / "calls.log").unlink()
    train = build_loader(data_cfg(root, num_workers=2, train_clips_per_video=2), "train", **SIZES, batch_size=4)
    assert len(batches(train)) == 3
    assert opened() == {"open": 6, "get_batch": 6}


def test_clips_per_video_and_decode_threads_are_checked_when_the_config_is_composed():
    from tests.cli_helpers import compose_config
    from x3d_exp.config import validate
    from x3d_exp.errors import ConfigError

    validate(compose_config("data.train_clips_per_video=2", "data.batch_size=4", "data.decode_threads=auto"))
    for overrides, message in ((["data.train_clips_per_video=3", "data.batch_size=4"],
                                "data.train_clips_per_video=3: must divide data.batch_size=4"),
                               (["data.train_clips_per_video=0"], "data.train_clips_per_video=0: must be >= 1"),
                               (["data.decode_threads=0"], "data.decode_threads=0: must be auto or a whole number")):
        with pytest.raises(ConfigError, match=message):
            validate(compose_config(*overrides))
