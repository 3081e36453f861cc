"""Stored image bytes -> normalised 32x32 blocks, the ``pixel_values`` layout of the batch contract."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from eve_megatron.data.images import BLOCK, CLIP_MEAN, CLIP_STD, decode_rgb

_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32).view(1, 1, 3, 1, 1)
_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)],
                      dtype=torch.float32).view(1, 1, 3, 1, 1)


def rgb_to_blocks(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[h'*w', 3*32*32]`` float32: blocks row-major, each block
    ``[3, 32, 32]`` (channel, y, x) flattened, values ``(x/255 - mean) / std``."""
    h, w, c = rgb.shape
    if c != 3 or h % BLOCK or w % BLOCK:
        raise ValueError(f"image of shape {rgb.shape} is not RGB with sides multiple of {BLOCK}")
    hp, wp = h // BLOCK, w // BLOCK
    with warnings.catch_warnings():  # decoded arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.ascontiguousarray(rgb))
    blocks = src.view(hp, BLOCK, wp, BLOCK, 3).permute(0, 2, 4, 1, 3)
    out = torch.empty(hp, wp, 3, BLOCK, BLOCK, dtype=torch.float32)
    out.copy_(blocks)
    out.mul_(_SCALE).sub_(_SHIFT)
    return out.view(hp * wp, 3 * BLOCK * BLOCK)


def decode_blocks(data: bytes, hp: int, wp: int) -> torch.Tensor:
    """Decode stored bytes and cut them into blocks, checking the grid is ``hp x wp``."""
    rgb = decode_rgb(data)
    if rgb.shape[:2] != (hp * BLOCK, wp * BLOCK):
        raise ValueError(f"stored image is {rgb.shape[1]}x{rgb.shape[0]} but the index says "
                         f"{wp * BLOCK}x{hp * BLOCK}")
    return rgb_to_blocks(rgb)
