"""EVE's image rules: RGB conversion, the two resize rules, the image-token count, pixels.

The one place these rules are written. Training preprocessing (``eve_megatron.data``)
and the exported Hugging Face image processor (``image_processing_eve_qwen2.py``) both
use it, so an image becomes the same pixels in training and at inference. Copied into
every export beside the processor, hence numpy and PIL only (no ``eve_megatron``, no
``transformers``).

- ``to_rgb``: any PIL mode -> 8-bit RGB. Alpha by ``alpha``: ``"drop"`` (default; what
  the reference pipeline does with ``convert("RGB")``: the colour channels are kept
  as they are) or ``"white"`` (composite onto white, straight alpha). 16-bit and float
  grey images are scaled to 8 bits.
- resize ``"train"`` (AnyRatio): scale down to an area of ``max_size**2`` if larger,
  never up; sides rounded to the nearest multiple of the block (32), at least one block.
- resize ``"infer"`` (the reference's inference rule): always rescale to an area of
  about ``max_size**2``, up or down; sides rounded UP to a multiple of the block.
- tokens of an image of ``h' x w'`` blocks: ``1 + h'(w' + 1)`` (class token, then each
  row of blocks followed by a split token).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from PIL import Image

PATCH_STRIDE = 16
"""Kernel and stride of the release's first patch-embedding conv."""
DENSE_STRIDE = 2
"""Kernel and stride of its second conv."""
BLOCK = PATCH_STRIDE * DENSE_STRIDE
"""Pixels per side of the square that becomes one image token (32 in the release)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ALPHA_RULES = ("drop", "white")
RESIZE_MODES = ("infer", "train")
_GREY_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_WITH_ALPHA = ("RGBA", "LA", "La", "PA", "RGBa")


def image_token_count(hp, wp):
    """Tokens of an image of ``hp x wp`` blocks: class token + rows of ``wp`` blocks + split.
    Works on ints and elementwise on arrays/tensors; the one place this formula is written."""
    return 1 + hp * (wp + 1)


def _round_nearest(x: float, block: int) -> int:
    return max(block, int(math.floor(x / block + 0.5)) * block)


def anyratio_size(width: int, height: int, max_size: int, block: int = BLOCK) -> Tuple[int, int]:
    """AnyRatio training size ``(W', H')``: scale down to area ``max_size**2`` if larger
    (never up), then round each side to the nearest multiple of ``block`` (half up, min one)."""
    w, h = float(width), float(height)
    s = math.sqrt(w * h) / max_size
    if s > 1:
        w, h = w / s, h / s
    return _round_nearest(w, block), _round_nearest(h, block)


def inference_size(width: int, height: int, max_size: int, block: int = BLOCK) -> Tuple[int, int]:
    """The reference's inference size ``(W', H')``: scale to area ``max_size**2``, sides
    rounded up to a multiple of ``block`` (at least one block)."""
    scale = math.sqrt(width * height) / max_size
    w = max(int(math.ceil(width / scale / block)) * block, block)
    h = max(int(math.ceil(height / scale / block)) * block, block)
    return w, h


def target_size(width: int, height: int, max_size: int, mode: str = "infer",
                block: int = BLOCK) -> Tuple[int, int]:
    """``(W', H')`` of an image by resize ``mode`` (``infer`` or ``train``)."""
    if mode == "infer":
        return inference_size(width, height, max_size, block)
    if mode == "train":
        return anyratio_size(width, height, max_size, block)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def resize(img: Image.Image, max_size: int, mode: str = "infer", block: int = BLOCK) -> Image.Image:
    """Bicubic resize of an RGB image by ``mode`` (no-op when the size already matches)."""
    size = target_size(img.width, img.height, max_size, mode, block)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(img: Image.Image, alpha: str = "drop") -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency by ``alpha`` (``drop`` or ``white``)."""
    if alpha not in ALPHA_RULES:
        raise ValueError(f"alpha rule must be one of {ALPHA_RULES}, got {alpha!r}")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _GREY_HIGH_DEPTH:
        arr = np.asarray(img).astype(np.float64)
        if mode != "F":
            arr = arr / 257.0
        grey = np.clip(np.floor(arr + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if alpha == "drop":
        return img.convert("RGB") if mode != "PA" else img.convert("RGBA").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in _WITH_ALPHA:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return Image.fromarray(_composite_white(np.asarray(img)), "RGB")
    return img.convert("RGB")


def normalize(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """RGB image -> ``[3, H, W]`` float32, ``(x / 255 - mean) / std`` (CLIP)."""
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / s
