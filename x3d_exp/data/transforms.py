"""Crops, flips and normalisation on whole clips at once (numpy slicing and broadcasting only)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

MEAN = (0.45, 0.45, 0.45)
STD = (0.225, 0.225, 0.225)
# (x / 255 - mean) / std as one multiply-add per element.
_SCALE = np.asarray([1.0 / (255.0 * s) for s in STD], np.float32)
_SHIFT = np.asarray([-m / s for m, s in zip(MEAN, STD)], np.float32)


def normalise(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., T, H, W, 3] -> float32 [..., 3, T, H, W], mean/std normalised."""
    out = frames.astype(np.float32) * _SCALE + _SHIFT
    return np.ascontiguousarray(np.moveaxis(out, -1, -4))


def train_crop(frames: np.ndarray, crop: int, rng: np.random.Generator, flip: bool = True,
               frame_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Random `crop`x`crop` window of frames [T, H, W, 3], and with `flip` a horizontal flip with p=0.5.

    `frame_size` (h, w) smaller than the frames: the window is drawn as in frames of that size, and the same region
    of these larger frames is returned (about crop * H / h on a side) for the caller to scale down to the crop;
    scaling only the window costs a fraction of scaling whole frames first.
    """
    height, width = frame_size or frames.shape[1:3]
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    scale_y, scale_x = frames.shape[1] / height, frames.shape[2] / width
    clip = frames[:, round(top * scale_y):round((top + crop) * scale_y),
                  round(left * scale_x):round((left + crop) * scale_x)]
    # Drawn either way, so that switching the flip off leaves the rest of a seed's augmentation as it was.
    flipped = rng.random() < 0.5
    if flip and flipped:
        clip = clip[:, :, ::-1]
    return clip


def test_crop_offsets(height: int, width: int, crop: int, num_crops: int) -> List[Tuple[int, int]]:
    """(top, left) of the centre crop, or of three crops spread along the longer side (PySlowFast order)."""
    centre = ((height - crop) // 2, (width - crop) // 2)
    if num_crops == 1:
        return [centre]
    if width >= height:
        return [(centre[0], 0), centre, (centre[0], width - crop)]
    return [(0, centre[1]), centre, (height - crop, centre[1])]


def view_crop(clip: np.ndarray, crop: int, num_crops: int, index: int) -> np.ndarray:
    """Crop `index` of the `num_crops` test crops (test_crop_offsets) of a clip [T, H, W, 3]."""
    top, left = test_crop_offsets(clip.shape[1], clip.shape[2], crop, num_crops)[index]
    return clip[:, top:top + crop, left:left + crop]


def test_crops(clips: np.ndarray, crop: int, num_crops: int) -> np.ndarray:
    """Clips [N, T, H, W, 3] -> views [N * num_crops, T, crop, crop, 3], clip-major."""
    return np.stack([view_crop(clip, crop, num_crops, index) for clip in clips for index in range(num_crops)])
