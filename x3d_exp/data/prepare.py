"""Re-encode a dataset to a smaller short side into a new root with the same layout (task=prepare).

PySlowFast and MMAction2 both recommend re-encoding Kinetics to short side 320 before training: decoding costs
grow with the frame size, and the loader never needs more than train_scale's largest side (320 for X3D-M).

The source root is walked as it is: video files (by extension) are re-encoded with libx264/yuv420p under the same
relative path and name, every other file (annotations, class lists, split files) is copied, so every `data=` layout
and its annotation files work unchanged on the new root. Video frames keep their count and order (the loader's
frame indices stay valid); audio is dropped. Videos whose short side is already at most the target are copied.

Each output is written under a temporary name and renamed into place when complete, so an output that exists is
done: a second run skips it, and a killed run leaves no half file that would count as done.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import av

from x3d_exp.data.datasets import is_video
from x3d_exp.data.video import BadVideo, _first_line, probe_size, short_side_size
from x3d_exp.errors import DataError

# The muxer for an extension whose usual container can hold H.264; the others (webm, mpeg, wmv, ogv) get a
# Matroska container under their own name, which ffmpeg and decord recognise by content.
MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".flv": "flv",
          ".3gp": "3gp", ".ts": "mpegts"}
# A half-written output's name: hidden, next to the final one, never mistaken for a video of the dataset.
PARTIAL = ".partial-"


@dataclass
class PrepareCounts:
    encoded: int = 0  # videos re-encoded to the short side
    copied: int = 0  # other files, and videos already small enough, copied
    skipped: int = 0  # outputs already complete from an earlier run
    bad: Dict[str, str] = field(default_factory=dict)  # relative path -> reason

    def as_dict(self) -> dict:
        return {"encoded": self.encoded, "copied": self.copied, "skipped": self.skipped, "bad": len(self.bad)}


def check_roots(src: Path, dst: Path) -> Tuple[Path, Path]:
    """(src, dst) resolved; DataError when src is not a folder or the two overlap (dst equal to, inside or above
    src could overwrite or re-read the source)."""
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if not src.is_dir():
        raise DataError(f"prepare.src={src}: directory not found")
    if dst == src or src in dst.parents or dst in src.parents:
        raise DataError(f"prepare.dst={dst} overlaps the source {src}: give a new folder outside it "
                        f"(the source is never overwritten)")
    return src, dst


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root` as a relative path, in a stable order; leftovers of an interrupted run excluded."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.startswith(PARTIAL):
                yield (Path(folder) / name).relative_to(root)


def even_size(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """short_side_size rounded to even numbers, which yuv420p needs."""
    height, width = short_side_size(height, width, short_side)
    return height + height % 2, width + width % 2


def encode_video(src: Path, dst: Path, height: int, width: int, crf: int, preset: str,
                 keyint: Optional[int] = None) -> int:
    """`src` re-encoded to `dst` at height x width (H.264, yuv420p, the source's frame rate, a keyframe at least
    every `keyint` frames, None: x264's 250); returns the frame count. Raises BadVideo."""
    try:
        with av.open(str(src)) as source:
            if not source.streams.video:
                raise BadVideo("no video stream (zero frames)")
            stream = source.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or 30
            with av.open(str(dst), "w", format=MUXERS.get(dst.suffix.lower(), "matroska")) as out:
                encoder = out.add_stream("libx264", rate=rate)
                encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
                encoder.options = {"crf": str(crf), "preset": preset, **({"g": str(keyint)} if keyint else {})}
                frames = 0
                for frame in source.decode(stream):
                    frame = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                    # Consecutive timestamps at the source's average rate: the loader indexes frames by count.
                    frame.pts, frame.time_base = frames, Fraction(1) / rate
                    for packet in encoder.encode(frame):
                        out.mux(packet)
                    frames += 1
                if frames == 0:
                    raise BadVideo("no video frames")
                for packet in encoder.encode():
                    out.mux(packet)
    except BadVideo:
        raise
    except Exception as err:  # any ffmpeg failure on a source file makes that file bad, not the run
        raise BadVideo(f"cannot re-encode: {_first_line(err)}") from None
    return frames


def _partial_name(path: Path) -> Path:
    # The real extension stays last: ffmpeg picks nothing from it (the muxer is explicit) but people look.
    return path.with_name(f"{PARTIAL}{path.name}")


def _is_copy_of(src: Path, dst: Path) -> bool:
    if not dst.exists():
        return False
    a, b = src.stat(), dst.stat()
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def _needs_encoding(path: Path, short_side: int) -> bool:
    """A video larger than the target (raises BadVideo for a file that is no readable video)."""
    return min(probe_size(str(path))) > short_side


def prepare_dataset(src: Path, dst: Path, short_side: int, *, crf: int = 23, preset: str = "veryfast",
                    keyint: Optional[int] = None, make_bar: Optional[Callable[[int], Any]] = None,
                    report: Callable[[str], None] = print) -> PrepareCounts:
    """Re-encode every video under `src` whose short side exceeds `short_side` into `dst` (same relative paths),
    copy the rest; resumable. `make_bar(total)` gives a tqdm-like progress bar over the files, `report` prints the
    line of each bad file. Raises DataError for unusable roots; bad files are counted in the result."""
    if short_side < 2:
        raise DataError(f"prepare.short_side={short_side}: must be >= 2")
    src, dst = check_roots(src, dst)
    files = list(walk_files(src))
    bar = make_bar(len(files)) if make_bar else None
    counts = PrepareCounts()
    for relative in files:
        source, target = src / relative, dst / relative
        partial = _partial_name(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_video(relative) and target.exists():
                counts.skipped += 1
            elif is_video(relative) and _needs_encoding(source, short_side):
                encode_video(source, partial, *even_size(*probe_size(str(source)), short_side), crf, preset, keyint)
                os.replace(partial, target)
                counts.encoded += 1
            elif _is_copy_of(source, target):
                counts.skipped += 1
            else:
                shutil.copy2(source, partial)
                os.replace(partial, target)
                counts.copied += 1
        except OSError as err:  # not the file's fault (permissions, a full disk): stop with the path named
            partial.unlink(missing_ok=True)
            raise DataError(f"{source} -> {target}: {err.strerror or err}") from None
        except BadVideo as bad:
            partial.unlink(missing_ok=True)
            counts.bad[str(relative)] = bad.reason
            report(f"bad video skipped: {source} ({bad.reason})")
        if bar is not None:
            bar.set_postfix(counts.as_dict(), refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return counts
