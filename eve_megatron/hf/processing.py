"""Inference inputs for the HF model from our side: pixels and training-exact prompt ids.

The image rules are :mod:`eve_megatron.hf.eve_image_rules` (the exported image processor's
too): resize ``infer`` (the reference's inference rule, default) or ``train`` (AnyRatio),
alpha ``drop`` (default, the reference's) or ``white``. Prompts are rendered with the
training templates (``data.templates``) and cut before the first answer, so a prompt is
token for token what the model saw in training; every image slot becomes its
``1 + h'(w'+1)`` image tokens (``IMAGE_TOKEN_INDEX``). The exported processor's chat
template renders the same ``qwen2`` prompt (tested to agree).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from PIL import Image

from eve_megatron.data.templates import IMAGE_TOKEN, render_conversation, tokenize_segments
from eve_megatron.data.tokenizer import Tokenizer
from eve_megatron.hf import eve_image_rules as rules
from eve_megatron.hf.eve_prompt import IMAGE_TOKEN_INDEX

RESIZE_RULES = rules.RESIZE_MODES
inference_size = rules.inference_size


def resize_for_inference(img: Image.Image, max_size: int, rule: str = "infer") -> Image.Image:
    """Bicubic resize of an RGB image by ``rule`` (``infer`` or ``train``)."""
    return rules.resize(img, max_size, rule)


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB image -> ``[3, H, W]`` float32, ``(x / 255 - mean) / std`` (CLIP)."""
    return torch.from_numpy(rules.normalize(img))


def load_inference_image(path: str, max_size: int, rule: str = "infer",
                         alpha: str = "drop") -> torch.Tensor:
    """An image file -> normalised ``[3, H, W]`` pixels by the exported image processor."""
    from eve_megatron.hf.image_processing_eve_qwen2 import EVEImageProcessor

    return EVEImageProcessor(max_size=max_size, resize_mode=rule, alpha=alpha).process_one(path)


def prompt_ids(tokenizer: Tokenizer, question: str, images: Sequence[torch.Tensor],
               template: str = "qwen2", block: int = rules.BLOCK) -> List[int]:
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
        ids.extend([IMAGE_TOKEN_INDEX] * rules.image_token_count(image.shape[1] // block,
                                                                 image.shape[2] // block))
        start = pos
    ids.extend(tokens[start:])
    return ids
