"""Image decoding, RGB conversion, the AnyRatio resize and the patch-block layout.

Every image that enters the dataset goes through :func:`prepare_image` once, offline:
EXIF orientation is applied, any mode becomes 8-bit RGB, the AnyRatio training resize
is applied and the result is re-encoded. The loader later only decodes those bytes and
cuts them into 32x32 blocks (:func:`image_to_blocks`).

Alpha flattening rule: transparent pixels are composited onto WHITE with straight
(non-premultiplied) alpha, per channel ``out = (c*a + 255*(255-a) + 127) // 255``.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps

BLOCK = 32
"""Pixels per image block side (patch_stride 16 x dense_stride 2)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageConfig:
    """How images are prepared for the dataset."""

    max_size: int = 1600
    """AnyRatio target: images with area above ``max_size**2`` are scaled down to it."""
    max_pixels: int = 89_478_485
    """Refuse (decompression bomb) any image whose header declares more pixels."""
    encode_format: str = "jpeg"
    """Stored encoding of the resized image: ``jpeg`` (compact) or ``png`` (lossless)."""
    jpeg_quality: int = 95
    """JPEG quality when ``encode_format == 'jpeg'``."""

    def __post_init__(self) -> None:
        if self.max_size < BLOCK:
            raise ValueError(f"max_size must be >= {BLOCK}, got {self.max_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.encode_format not in ("jpeg", "png"):
            raise ValueError(f"encode_format must be 'jpeg' or 'png', got {self.encode_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def image_token_count(hp: int, wp: int) -> int:
    """Tokens of an image of ``hp x wp`` blocks: class token + rows of ``wp`` blocks + split."""
    return 1 + hp * (wp + 1)


def _round_side(x: float) -> int:
    return max(BLOCK, int(math.floor(x / BLOCK + 0.5)) * BLOCK)


def anyratio_size(width: int, height: int, max_size: int) -> Tuple[int, int]:
    """AnyRatio training size ``(W', H')``: scale down to area ``max_size**2`` if larger
    (never up), then round each side to the nearest multiple of 32 (half up, min 32)."""
    w, h = float(width), float(height)
    s = math.sqrt(w * h) / max_size
    if s > 1:
        w, h = w / s, h / s
    return _round_side(w), _round_side(h)


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit scaled by 1/257, alpha onto white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode != "F":
            arr = arr / 257.0
        gray = np.clip(np.floor(arr + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return Image.fromarray(_flatten_alpha(np.asarray(img)), "RGB")
    return img.convert("RGB")


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image, refusing decompression bombs."""
    try:
        with warnings.catch_warnings():  # our own limit below decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except Exception as exc:  # PIL raises many types for junk input
        raise ImageError("bad_image", f"not a readable image ({type(exc).__name__})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w < 1 or h < 1:
        raise ImageError("bad_image", f"empty image {w}x{h}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except Exception as exc:
        raise ImageError("bad_image", f"cannot decode image ({type(exc).__name__}: {exc})") from None


def resize_anyratio(img: Image.Image, max_size: int) -> Image.Image:
    """Bicubic AnyRatio resize of an RGB image (no-op when the size already matches)."""
    size = anyratio_size(img.width, img.height, max_size)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def encode_image(img: Image.Image, config: ImageConfig) -> bytes:
    """Encode an RGB image for storage (format chosen by ``config``)."""
    buf = io.BytesIO()
    if config.encode_format == "jpeg":
        img.save(buf, format="JPEG", quality=config.jpeg_quality, subsampling=0)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def prepare_image(data: bytes, config: ImageConfig) -> Tuple[bytes, int, int]:
    """Full offline path: decode, upright, RGB, resize, encode. Returns ``(bytes, h', w')``."""
    img = resize_anyratio(load_image(data, config.max_pixels), config.max_size)
    return encode_image(img, config), img.height // BLOCK, img.width // BLOCK


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode stored image bytes to a ``[H, W, 3]`` uint8 array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
