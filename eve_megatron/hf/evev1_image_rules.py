"""EVEv1's image rules (EVE-7B-v1.0 / EVE-7B-HD-v1.0): sizes, the block, the teacher image.

The one place these rules are written (``../shared/docs/evev1_reference.md`` §1 Resolution,
§2 Teacher; official ``train/train.py::LazySupervisedDataset.__getitem__``). Training
preprocessing (``eve_megatron.data``) and, later, an exported EVEv1 image processor use it;
like ``eve_image_rules.py`` it imports only numpy, PIL and its shipped sibling.

- base size (what the CLIP teacher sees): the long side becomes ``BASE_SIZE`` (336), the
  short side ``ceil(336 * short / long / 14) * 14``; a square image (or one whose short side
  rounds up to 336) is 336x336.
- student size: base size x ``ratio`` (2 for the 672 model, 4 for the 1344-HD one); small
  images are upscaled. The official code pastes it centred on an SxS canvas with offsets
  that are multiples of 28 (56), and the patch embedding crops back to the valid region,
  so the dataset stores only the resized image: its sides are multiples of ``BLOCK * ratio
  / 2`` (28 or 56), one token per ``BLOCK`` x ``BLOCK`` pixels.
- teacher image: the base-size image pasted on a 336x336 canvas of ``BACKGROUND`` at
  ``teacher_offset``; a 14-pixel patch of the 24x24 grid is valid when it lies in the image.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from .eve_image_rules import CLIP_MEAN, CLIP_STD, image_token_count  # noqa: F401

PATCH_STRIDE = 14
"""Kernel and stride of the PEL conv (the reference's ``patch_stride``)."""
DENSE_STRIDE = 2
"""Patches per side of a LocalAttention window (the reference's ``conv_stride``)."""
BLOCK = PATCH_STRIDE * DENSE_STRIDE
"""Pixels per side of the square that becomes one image token (28)."""
BASE_SIZE = 336
"""Long side of the base size = the CLIP teacher's input side (``image_size_clip``)."""
TEACHER_PATCH = 14
"""The teacher's patch side (``patch_stride_clip``; CLIP ViT-L/14-336)."""
TEACHER_GRID = BASE_SIZE // TEACHER_PATCH
"""Teacher patches per side (24); the teacher sees ``TEACHER_GRID ** 2`` = 576 patches."""
RATIOS = (2, 4)
"""Student size / base size: 2 for EVE-7B-v1.0 (672), 4 for EVE-7B-HD-v1.0 (1344)."""
BACKGROUND = tuple(int(m * 255) for m in CLIP_MEAN)
"""Canvas colour of the official code, ``int(255 * mean)`` = (122, 116, 104) (truncated, so
it normalises to about (-0.011, -0.011, -0.001), not exactly 0)."""


def base_size(width: int, height: int) -> Tuple[int, int]:
    """``(W, H)`` of the base-size image (long side 336, short side rounded UP to 14).
    Ties (square images) take the portrait branch, as the official code does."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width > height:
        return BASE_SIZE, _short_side(height, width)
    return _short_side(width, height), BASE_SIZE


def _short_side(short: int, long: int) -> int:
    return int(math.ceil(BASE_SIZE * short / long / TEACHER_PATCH)) * TEACHER_PATCH


def evev1_size(width: int, height: int, ratio: int) -> Tuple[int, int]:
    """``(W, H)`` of the student image: the base size times ``ratio`` (2 or 4)."""
    if ratio not in RATIOS:
        raise ValueError(f"EVEv1 ratio must be one of {RATIOS}, got {ratio}")
    bw, bh = base_size(width, height)
    return bw * ratio, bh * ratio


def student_grid(width: int, height: int, ratio: int) -> Tuple[int, int]:
    """``(h', w')`` in ``BLOCK``-pixel blocks of the student image of a ``width x height`` image."""
    w, h = evev1_size(width, height, ratio)
    return h // BLOCK, w // BLOCK


def teacher_offset(bw: int, bh: int) -> Tuple[int, int]:
    """``(x, y)`` where a ``bw x bh`` base-size image is pasted on the 336x336 canvas: the
    short side is centred, ``(24 - patches) // 2`` patches before it."""
    _check_base(bw, bh)
    pre = lambda side: (TEACHER_GRID - side // TEACHER_PATCH) // 2 * TEACHER_PATCH  # noqa: E731
    return pre(bw), pre(bh)


def teacher_valid(bw: int, bh: int) -> np.ndarray:
    """bool ``[576]``: which 14-pixel teacher patches (row-major over the 24x24 grid) lie
    in the pasted ``bw x bh`` base-size image (the official mask pooled with stride 14)."""
    x, y = teacher_offset(bw, bh)
    grid = np.zeros((TEACHER_GRID, TEACHER_GRID), dtype=bool)
    p = TEACHER_PATCH
    grid[y // p:(y + bh) // p, x // p:(x + bw) // p] = True
    return grid.reshape(-1)


def teacher_canvas(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[336, 336, 3]``: the base-size ``[bh, bw, 3]`` image pasted on the background."""
    bh, bw = rgb.shape[:2]
    x, y = teacher_offset(bw, bh)
    out = np.empty((BASE_SIZE, BASE_SIZE, 3), dtype=np.uint8)
    out[...] = np.asarray(BACKGROUND, dtype=np.uint8)
    out[y:y + bh, x:x + bw] = rgb
    return out


def _check_base(bw: int, bh: int) -> None:
    ok = (max(bw, bh) == BASE_SIZE and min(bw, bh) >= TEACHER_PATCH
          and bw % TEACHER_PATCH == 0 and bh % TEACHER_PATCH == 0)
    if not ok:
        raise ValueError(f"{bw}x{bh} is not an EVEv1 base size (long side {BASE_SIZE}, "
                         f"sides multiples of {TEACHER_PATCH})")
