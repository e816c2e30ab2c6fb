"""task=prepare on a tiny generated dataset, in process: re-encoded sizes, the layout kept, a bad file counted, a
resumed run, a refused destination; and through the real CLI, its one-line refusal."""

from __future__ import annotations

import av
import pytest

from tests.cli_helpers import compose_config, run_cli
from tests.data_helpers.layouts import write_video
from x3d_exp.data import DataError, load_video_views
from x3d_exp.data.prepare import check_roots
from x3d_exp.data.video import probe_size
from x3d_exp.tasks.prepare import task_prepare


def frames_of(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def keyframes_of(path) -> int:
    with av.open(str(path)) as container:
        return sum(packet.is_keyframe for packet in container.demux(video=0) if packet.size)


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def source(tmp_path):
    """A Kinetics-style root: csv, videos of several containers and sizes, a nested text file and a bad video."""
    root = tmp_path / "k400"
    write_video(root / "train" / "a_000000_000010.mp4", 10, width=64, height=48)
    write_video(root / "train" / "small_000000_000010.mp4", 30, width=20, height=16)  # already small: copied
    write_video(root / "val" / "c_000000_000010.avi", 50, codec="mpeg4", width=64, height=48)
    write_video(root / "clips" / "portrait.webm", 70, codec="libvpx-vp9", width=48, height=64)  # as SSv2 ships
    (root / "train" / "bad_000000_000010.mp4").write_text("<html><body>404 Not Found</body></html>\n")
    (root / "docs").mkdir()
    (root / "docs" / "README.txt").write_text("class list\n")
    (root / "kinetics-400_train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                                 "a,a,0,10,train\nb,small,0,10,train\nb,bad,0,10,train\n")
    return root


def test_prepare_reencodes_keeps_the_layout_counts_bad_files_and_resumes(source, tmp_path, capsys):
    """task=prepare in process (the CLI's part, its one-line error, is the slow test below)."""
    dst = tmp_path / "k400_24"
    cfg = compose_config("task=prepare", f"prepare.src={source}", f"prepare.dst={dst}", "prepare.short_side=24",
                         "prepare.keyint=4", "trainer.progress=on")
    result = task_prepare(cfg)
    out, err = capsys.readouterr()
    assert (result["encoded"], result["copied"], result["skipped"], result["bad"]) == (3, 3, 0, 1)
    assert result["bad_files"] == ["train/bad_000000_000010.mp4"]
    assert "bad video skipped: " in err and "bad_000000_000010.mp4" in err
    assert "prepare k400 -> 24p" in err  # the progress bar
    assert "prepare: 3 videos re-encoded to short side 24, 3 files copied, 0 already done, 1 bad" in out

    # Same relative paths (the bad file aside), short side 24 with the aspect ratio kept, every frame kept.
    assert files_under(dst) == [f for f in files_under(source) if "bad_" not in f]
    assert probe_size(str(dst / "train/a_000000_000010.mp4")) == (24, 32)
    assert probe_size(str(dst / "val/c_000000_000010.avi")) == (24, 32)
    assert probe_size(str(dst / "clips/portrait.webm")) == (32, 24)
    assert all(frames_of(dst / name) == 16 for name in ("train/a_000000_000010.mp4", "val/c_000000_000010.avi",
                                                        "clips/portrait.webm"))
    assert keyframes_of(dst / "train/a_000000_000010.mp4") == 4  # prepare.keyint=4 over 16 frames
    for name in ("kinetics-400_train.csv", "docs/README.txt", "train/small_000000_000010.mp4"):
        assert (dst / name).read_bytes() == (source / name).read_bytes()
    # The loader reads every re-encoded container (H.264 in .avi and in a Matroska file named .webm).
    for name in ("val/c_000000_000010.avi", "clips/portrait.webm"):
        views = load_video_views(dst / name, num_frames=2, sampling_rate=1, test_crop_size=24, num_clips=1,
                                 num_crops=1)
        assert views.shape == (1, 3, 2, 24, 24)

    # A killed run leaves a partial file and lacks an output: the next run redoes only that, and retries the bad file.
    (dst / "val/c_000000_000010.avi").unlink()
    (dst / "val/.partial-c_000000_000010.avi").write_bytes(b"half a file")
    result = task_prepare(cfg)
    assert (result["encoded"], result["copied"], result["skipped"], result["bad"]) == (1, 0, 5, 1)
    assert files_under(dst) == [f for f in files_under(source) if "bad_" not in f]


@pytest.mark.slow
def test_prepare_through_the_cli_refuses_to_overwrite_its_source_in_one_line(source, tmp_path, cache):
    refused = run_cli(["task=prepare", f"prepare.src={source}", f"prepare.dst={source}"], cwd=tmp_path, cache=cache)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: prepare.dst={source} overlaps the source {source}: give a new folder "
                                      f"outside it (the source is never overwritten)")


def test_prepare_refuses_a_destination_inside_or_above_the_source(source):
    for dst in (source / "small", source.parent):
        with pytest.raises(DataError, match="overlaps the source"):
            check_roots(source, dst)
    with pytest.raises(DataError, match="directory not found"):
        check_roots(source / "nowhere", source.parent / "elsewhere")
