"""Image decoding, RGB conversion, the AnyRatio resize and the patch-block layout.

Every image that enters the dataset goes through :func:`prepare_image` once, offline:
EXIF orientation is applied, any mode becomes 8-bit RGB, the AnyRatio training resize
is applied and the result is re-encoded. The loader later only decodes those bytes and
cuts them into 32x32 blocks (:func:`image_to_blocks`). EVEv1 images go through
:func:`prepare_evev1_image` instead (``hf/evev1_image_rules.py``: 28-pixel blocks, and a
second, base-size image for the CLIP teacher).

The rules themselves (RGB conversion and its alpha rule, both resize rules, the
image-token count, CLIP constants) live in :mod:`eve_megatron.hf.eve_image_rules`, which
every Hugging Face export also carries, so training and inference agree. Alpha rule by
default: ``drop`` (the reference's ``convert("RGB")``); ``white`` composites onto white.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image, ImageOps

from eve_megatron.hf import evev1_image_rules as evev1
from eve_megatron.hf.eve_image_rules import (ALPHA_RULES, BLOCK, CLIP_MEAN, CLIP_STD,  # noqa: F401
                                             anyratio_size, image_token_count, resize, to_rgb)


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
    alpha: str = "drop"
    """Transparency: ``drop`` keeps the colour channels (the reference's ``convert("RGB")``),
    ``white`` composites onto white. Inference must use the same rule (the export records it)."""

    def __post_init__(self) -> None:
        if self.max_size < BLOCK:
            raise ValueError(f"max_size must be >= {BLOCK}, got {self.max_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.encode_format not in ("jpeg", "png"):
            raise ValueError(f"encode_format must be 'jpeg' or 'png', got {self.encode_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.alpha not in ALPHA_RULES:
            raise ValueError(f"alpha must be one of {ALPHA_RULES}, got {self.alpha!r}")


def load_image(data: bytes, max_pixels: int, alpha: str = "drop") -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image (transparency by the ``alpha``
    rule), refusing decompression bombs."""
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
        return to_rgb(img, alpha)
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except Exception as exc:
        raise ImageError("bad_image", f"cannot decode image ({type(exc).__name__}: {exc})") from None


def resize_anyratio(img: Image.Image, max_size: int) -> Image.Image:
    """Bicubic AnyRatio resize of an RGB image (no-op when the size already matches)."""
    return resize(img, max_size, "train")


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
    img = resize_anyratio(load_image(data, config.max_pixels, config.alpha), config.max_size)
    return encode_image(img, config), img.height // BLOCK, img.width // BLOCK


def prepare_evev1_image(data: bytes, config: ImageConfig, ratio: int) -> Tuple[bytes, int, int,
                                                                            bytes, int, int]:
    """EVEv1's offline path (``hf/evev1_image_rules.py``): decode, upright, RGB, then two
    bicubic resizes of that same image (as the official code resizes the original twice):
    the student image (base size x ``ratio``) and the teacher's base-size image. Returns
    ``(student bytes, h', w', teacher bytes, teacher W, teacher H)``; ``h', w'`` in 28-pixel
    blocks, the teacher size in pixels (long side 336)."""
    img = load_image(data, config.max_pixels, config.alpha)
    student = img.resize(evev1.evev1_size(img.width, img.height, ratio), Image.BICUBIC)
    teacher = img.resize(evev1.base_size(img.width, img.height), Image.BICUBIC)
    return (encode_image(student, config), student.height // evev1.BLOCK,
            student.width // evev1.BLOCK, encode_image(teacher, config), teacher.width,
            teacher.height)


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode stored image bytes to a ``[H, W, 3]`` uint8 array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
