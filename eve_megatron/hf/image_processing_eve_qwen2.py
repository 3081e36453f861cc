"""``EVEImageProcessor``: images -> CLIP-normalised pixels at EVE's sizes.

Shipped in every export (``AutoImageProcessor.from_pretrained(DIR, trust_remote_code=True)``);
the rules are ``eve_image_rules.py``'s, the same functions training preprocessing uses.
The saved ``preprocessor_config.json`` keeps the released keys (``max_size``,
``patch_stride``, ``dense_stride``, CLIP mean/std, ``do_resize: false``), so the official
EVEv2 code's ``CLIPImageProcessor.from_pretrained`` reads it too.
"""

from __future__ import annotations

import io
import os
from typing import List

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .eve_image_rules import (ALPHA_RULES, CLIP_MEAN, CLIP_STD, RESIZE_MODES, normalize,
                              resize, to_rgb)


def to_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a file path, bytes, or an ``HWC``/``CHW`` array or
    tensor (uint8 0..255, or float 0..1); EXIF orientation applied as in training."""
    if isinstance(image, (str, os.PathLike)):
        if str(image).startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            image = load_image(str(image))
        else:
            with open(image, "rb") as f:
                image = Image.open(io.BytesIO(f.read()))
    elif isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
            arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        elif arr.dtype != np.uint8 and not (arr.dtype == np.uint16 and arr.ndim == 2):
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"integer image values must lie in 0..255, "
                                 f"got {arr.min()}..{arr.max()}")
            arr = arr.astype(np.uint8)
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}: give a PIL image, a "
                        "path, bytes, or an HWC/CHW array or tensor")
    image.load()
    return ImageOps.exif_transpose(image)


class EVEImageProcessor(BaseImageProcessor):
    """Any image -> RGB (alpha rule) -> EVE resize (``infer`` or ``train``) -> CLIP pixels.

    Returns ``pixel_values`` (a list of ``[3, H, W]`` float32 tensors; one stacked tensor
    when all sizes agree) and ``image_sizes`` (``[n, 2]``, height and width), sides
    multiples of ``patch_stride * dense_stride``.
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, max_size: int = 1600, patch_stride: int = 16, dense_stride: int = 2,
                 resize_mode: str = "infer", alpha: str = "drop", image_mean=CLIP_MEAN,
                 image_std=CLIP_STD, do_resize: bool = False, do_center_crop: bool = False,
                 do_normalize: bool = True, resample: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.max_size, self.patch_stride, self.dense_stride = max_size, patch_stride, dense_stride
        self.resize_mode, self.alpha = resize_mode, alpha
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        # The CLIP-style keys the official code reads: it resizes before calling the
        # processor, so do_resize stays false; this class always resizes by resize_mode.
        self.do_resize, self.do_center_crop, self.do_normalize = do_resize, do_center_crop, do_normalize
        self.resample = resample
        self._check(resize_mode, alpha)

    @staticmethod
    def _check(resize_mode: str, alpha: str) -> None:
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if alpha not in ALPHA_RULES:
            raise ValueError(f"alpha must be one of {ALPHA_RULES}, got {alpha!r}")

    def process_one(self, image, resize_mode: str = None, alpha: str = None,
                    max_size: int = None) -> torch.Tensor:
        """One image -> ``[3, H, W]`` float32 pixels."""
        mode, alpha = resize_mode or self.resize_mode, alpha or self.alpha
        self._check(mode, alpha)
        img = resize(to_rgb(to_pil(image), alpha), max_size or self.max_size, mode,
                     self.patch_stride * self.dense_stride)
        return torch.from_numpy(normalize(img, self.image_mean, self.image_std))

    def preprocess(self, images, return_tensors=None, resize_mode: str = None, alpha: str = None,
                   max_size: int = None, **kwargs) -> BatchFeature:
        """``pixel_values`` and ``image_sizes`` of an image or a (nested) list of images."""
        if kwargs:
            raise TypeError(f"EVEImageProcessor got unknown arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"EVE's image processor returns torch tensors; got return_tensors="
                             f"{return_tensors!r}")
        flat = flatten_images(images)
        pixels = [self.process_one(im, resize_mode, alpha, max_size) for im in flat]
        sizes = torch.tensor([list(p.shape[1:]) for p in pixels], dtype=torch.long).reshape(-1, 2)
        if pixels and all(p.shape == pixels[0].shape for p in pixels):
            pixels = torch.stack(pixels)
        return BatchFeature(data={"pixel_values": pixels, "image_sizes": sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def flatten_images(images) -> List:
    """A single image or a (nested) list of images -> a flat list, in order."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


__all__ = ["EVEImageProcessor"]
