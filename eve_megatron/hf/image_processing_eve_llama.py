"""``EVEv1ImageProcessor``: images -> CLIP-normalised pixels at EVEv1's sizes.

Shipped in every EVEv1 export (``AutoImageProcessor.from_pretrained(DIR,
trust_remote_code=True)``). The rule is ``evev1_image_rules.py``'s, the one training
preprocessing uses: the long side becomes 336 and the short side a multiple of 14 (the base
size, what the CLIP teacher sees), times ``image_size / image_size_clip`` (2, HD 4) for
the student image; bicubic resize, RGB (alpha dropped, the official ``convert("RGB")``).
The student image is the official padded canvas cropped to its valid region, which is
what the patch embedding layer sees; ``teacher`` gives the teacher's 336-pixel canvas
and its valid patches (training only).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .eve_image_rules import CLIP_MEAN, CLIP_STD, normalize, to_rgb
from .evev1_image_rules import BASE_SIZE, base_size, evev1_size, teacher_canvas, teacher_valid
from .image_processing_eve_qwen2 import flatten_images, to_pil


class EVEv1ImageProcessor(BaseImageProcessor):
    """Any image -> RGB -> EVEv1 student size -> CLIP pixels ``[3, H, W]`` (sides multiples
    of ``patch_stride * conv_stride`` = 28)."""

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, image_size: int = 672, image_size_clip: int = BASE_SIZE,
                 patch_stride: int = 14, conv_stride: int = 2, patch_stride_clip: int = 14,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, do_resize: bool = False,
                 do_normalize: bool = True, resample: int = 3, **kwargs):
        super().__init__(**kwargs)
        if image_size % image_size_clip or image_size // image_size_clip not in (2, 4):
            raise ValueError(f"image_size {image_size} must be 2 or 4 x image_size_clip "
                             f"{image_size_clip}")
        self.image_size, self.image_size_clip = image_size, image_size_clip
        self.patch_stride, self.conv_stride = patch_stride, conv_stride
        self.patch_stride_clip = patch_stride_clip
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.do_resize, self.do_normalize, self.resample = do_resize, do_normalize, resample

    @property
    def ratio(self) -> int:
        """Student size / base size."""
        return self.image_size // self.image_size_clip

    def process_one(self, image, resize_mode: str = None) -> torch.Tensor:
        """One image -> the student's ``[3, H, W]`` float32 pixels (``resize_mode`` is
        accepted for the EVEv2 call signature; EVEv1 has one rule)."""
        if resize_mode not in (None, "evev1"):
            raise ValueError(f"EVEv1 has one resize rule; got resize_mode={resize_mode!r}")
        img = to_rgb(to_pil(image), "drop")
        img = img.resize(evev1_size(img.width, img.height, self.ratio), Image.BICUBIC)
        return torch.from_numpy(normalize(img, self.image_mean, self.image_std))

    def teacher(self, image) -> Tuple[torch.Tensor, torch.Tensor]:
        """``([3, 336, 336] CLIP pixels, [576] bool valid patches)`` of the teacher's input."""
        img = to_rgb(to_pil(image), "drop")
        img = img.resize(base_size(img.width, img.height), Image.BICUBIC)
        canvas = Image.fromarray(teacher_canvas(np.asarray(img)))
        pixels = torch.from_numpy(normalize(canvas, self.image_mean, self.image_std))
        return pixels, torch.from_numpy(teacher_valid(img.width, img.height))

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """``pixel_values`` (list of ``[3, H, W]``, stacked when sizes agree) and
        ``image_sizes`` of an image or a (nested) list of images."""
        if kwargs:
            raise TypeError(f"EVEv1ImageProcessor got unknown arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"returns torch tensors; got return_tensors={return_tensors!r}")
        pixels = [self.process_one(im) for im in flatten_images(images)]
        sizes = torch.tensor([list(p.shape[1:]) for p in pixels], dtype=torch.long).reshape(-1, 2)
        if pixels and all(p.shape == pixels[0].shape for p in pixels):
            pixels = torch.stack(pixels)
        return BatchFeature(data={"pixel_values": pixels, "image_sizes": sizes})

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["EVEv1ImageProcessor"]
