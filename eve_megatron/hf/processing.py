"""Inference inputs for the HF model: the reference's inference resize, pixels, prompt ids.

Resize rules (``eve_reference.md`` §3), selectable so training and inference can agree:

- ``reference`` (default, what the released inference code does): always rescale to an
  area of about ``max_size**2`` (up or down), each side rounded UP to a multiple of 32;
- ``train``: the AnyRatio training rule (``data.images.anyratio_size``): only scale down,
  round to the nearest multiple of 32.

Prompts are rendered with the training templates (``data.templates``) and cut before the
first answer, so a prompt is token for token what the model saw in training; every
image slot becomes its ``1 + h'(w'+1)`` image tokens (``IMAGE_TOKEN_INDEX``).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from eve_megatron.data.images import BLOCK, CLIP_MEAN, CLIP_STD, anyratio_size, image_token_count, load_image
from eve_megatron.data.templates import IMAGE_TOKEN, render_conversation, tokenize_segments
from eve_megatron.data.tokenizer import Tokenizer
from eve_megatron.hf.config_map import IMAGE_TOKEN_INDEX

RESIZE_RULES = ("reference", "train")


def inference_size(width: int, height: int, max_size: int, block: int = BLOCK) -> Tuple[int, int]:
    """The reference's inference size ``(W', H')``: scale to area ``max_size**2``, sides
    rounded up to a multiple of ``block`` (at least ``block``)."""
    scale = math.sqrt(width * height) / max_size
    w = max(int(math.ceil(width / scale / block)) * block, block)
    h = max(int(math.ceil(height / scale / block)) * block, block)
    return w, h


def resize_for_inference(img: Image.Image, max_size: int, rule: str = "reference") -> Image.Image:
    """Bicubic resize of an RGB image by ``rule`` (``reference`` or ``train``)."""
    if rule == "reference":
        size = inference_size(img.width, img.height, max_size)
    elif rule == "train":
        size = anyratio_size(img.width, img.height, max_size)
    else:
        raise ValueError(f"resize rule must be one of {RESIZE_RULES}, got {rule!r}")
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB image -> ``[3, H, W]`` float32, ``(x / 255 - mean) / std`` (CLIP)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def load_inference_image(path: str, max_size: int, rule: str = "reference",
                         max_pixels: int = 89_478_485) -> torch.Tensor:
    """An image file -> normalised ``[3, H, W]`` pixels, sides multiples of 32."""
    with open(path, "rb") as f:
        img = load_image(f.read(), max_pixels)
    return normalize(resize_for_inference(img, max_size, rule))


def prompt_ids(tokenizer: Tokenizer, question: str, images: Sequence[torch.Tensor],
               template: str = "qwen2", block: int = BLOCK) -> List[int]:
    """Token ids of a one-question prompt, image slots expanded to their image tokens.

    ``question`` may hold ``<image>`` markers; images without one go before the question
    (as in training). The prompt ends where the answer would start (`` ASSISTANT:`` for
    qwen2).
    """
    if IMAGE_TOKEN not in question and images:
        question = IMAGE_TOKEN * len(images) + question
    segments = render_conversation([("user", question), ("assistant", "-")], len(images), template)
    last_answer = max(k for k, s in enumerate(segments) if s.supervised)
    tokens, _, image_pos = tokenize_segments(segments[:last_answer], tokenizer)
    ids: List[int] = []
    start = 0
    for pos, image in zip(image_pos, images):
        ids.extend(tokens[start:pos])
        ids.extend([IMAGE_TOKEN_INDEX] * image_token_count(image.shape[1] // block,
                                                           image.shape[2] // block))
        start = pos
    ids.extend(tokens[start:])
    return ids
