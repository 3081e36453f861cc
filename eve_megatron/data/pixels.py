"""Stored image bytes -> 32x32 blocks -> normalised ``pixel_values`` of the batch contract.

Rows keep blocks as uint8 (cheap to move between processes); :func:`normalize_blocks`
writes the float32 values straight into the batch tensor, so each image is converted
to float exactly once.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch

from eve_megatron.data.images import BLOCK, CLIP_MEAN, CLIP_STD, decode_rgb

BLOCK_DIM = 3 * BLOCK * BLOCK
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32).view(1, 3, 1, 1)
_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)],
                      dtype=torch.float32).view(1, 3, 1, 1)


def rgb_to_blocks_u8(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[h'*w', 3, 32, 32]`` uint8, blocks row-major, (channel, y, x)."""
    h, w, c = rgb.shape
    if c != 3 or h % BLOCK or w % BLOCK:
        raise ValueError(f"image of shape {rgb.shape} is not RGB with sides multiple of {BLOCK}")
    hp, wp = h // BLOCK, w // BLOCK
    with warnings.catch_warnings():  # decoded arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.ascontiguousarray(rgb))
    blocks = src.view(hp, BLOCK, wp, BLOCK, 3).permute(0, 2, 4, 1, 3)
    return blocks.reshape(hp * wp, 3, BLOCK, BLOCK).contiguous()


def normalize_blocks(blocks: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 ``[n, 3, 32, 32]`` -> float32 ``[n, 3072]`` with ``(x/255 - mean) / std``."""
    n = blocks.shape[0]
    if out is None:
        out = torch.empty(n, BLOCK_DIM, dtype=torch.float32)
    view = out.view(n, 3, BLOCK, BLOCK)
    torch.mul(blocks, _SCALE, out=view)
    view.sub_(_SHIFT)
    return out


def decode_blocks_u8(data: bytes, hp: int, wp: int) -> torch.Tensor:
    """Decode stored bytes into uint8 blocks, checking the grid is ``hp x wp``."""
    rgb = decode_rgb(data)
    if rgb.shape[:2] != (hp * BLOCK, wp * BLOCK):
        raise ValueError(f"stored image is {rgb.shape[1]}x{rgb.shape[0]} but the index says "
                         f"{wp * BLOCK}x{hp * BLOCK}")
    return rgb_to_blocks_u8(rgb)
