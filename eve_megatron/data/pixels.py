"""Stored image bytes -> square blocks -> normalised ``pixel_values`` of the batch contract.

Rows keep blocks as uint8 (cheap to move between processes); :func:`normalize_blocks`
writes the float32 values straight into the batch tensor, so each image is converted
to float exactly once. The block side is the dataset's (``BLOCK`` = 32 for EVEv2, 28 for
EVEv1, recorded in the dataset's metadata). EVEv1's teacher images become uint8
``[3, 336, 336]`` canvases (:func:`decode_teacher_u8`), normalised the same way.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch

from eve_megatron.data.images import BLOCK, CLIP_MEAN, CLIP_STD, decode_rgb
from eve_megatron.hf import evev1_image_rules as evev1

BLOCK_DIM = 3 * BLOCK * BLOCK
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD], dtype=torch.float32).view(1, 3, 1, 1)
_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)],
                      dtype=torch.float32).view(1, 3, 1, 1)


def rgb_to_blocks_u8(rgb: np.ndarray, block: int = BLOCK) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[h'*w', 3, block, block]`` uint8, blocks row-major,
    (channel, y, x)."""
    h, w, c = rgb.shape
    if c != 3 or h % block or w % block:
        raise ValueError(f"image of shape {rgb.shape} is not RGB with sides multiple of {block}")
    hp, wp = h // block, w // block
    with warnings.catch_warnings():  # decoded arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(np.ascontiguousarray(rgb))
    blocks = src.view(hp, block, wp, block, 3).permute(0, 2, 4, 1, 3)
    return blocks.reshape(hp * wp, 3, block, block).contiguous()


def normalize_blocks(blocks: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 ``[n, 3, a, b]`` -> float32 ``[n, 3*a*b]`` with ``(x/255 - mean) / std``."""
    n, _, a, b = blocks.shape
    if out is None:
        out = torch.empty(n, 3 * a * b, dtype=torch.float32)
    view = out.view(n, 3, a, b)
    torch.mul(blocks, _SCALE, out=view)
    view.sub_(_SHIFT)
    return out


def decode_blocks_u8(data: bytes, hp: int, wp: int, block: int = BLOCK) -> torch.Tensor:
    """Decode stored bytes into uint8 blocks, checking the grid is ``hp x wp``."""
    rgb = decode_rgb(data)
    if rgb.shape[:2] != (hp * block, wp * block):
        raise ValueError(f"stored image is {rgb.shape[1]}x{rgb.shape[0]} but the index says "
                         f"{wp * block}x{hp * block}")
    return rgb_to_blocks_u8(rgb, block)


def decode_teacher_u8(data: bytes, width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """EVEv1 teacher image: stored base-size bytes -> (uint8 ``[3, 336, 336]`` canvas, the
    image centred on the official background colour; bool ``[576]`` valid patches)."""
    rgb = decode_rgb(data)
    if rgb.shape[:2] != (height, width):
        raise ValueError(f"stored teacher image is {rgb.shape[1]}x{rgb.shape[0]} but the index "
                         f"says {width}x{height}")
    canvas = evev1.teacher_canvas(rgb)
    return (torch.from_numpy(canvas.transpose(2, 0, 1).copy()),
            torch.from_numpy(evev1.teacher_valid(width, height)))
