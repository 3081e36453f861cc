"""Training-exact prompt ids for the HF model (images go through the export's own image
processor, ``image_processing_eve_qwen2.py``).

Prompts are rendered with the training templates (``data.templates``) and cut before the
first answer, so a prompt is token for token what the model saw in training; every image
slot becomes its
``1 + h'(w'+1)`` image tokens (``IMAGE_TOKEN_INDEX``). The exported processor's chat
template renders the same ``qwen2`` prompt (tested to agree).
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from eve_megatron.data.templates import IMAGE_TOKEN, render_conversation, tokenize_segments
from eve_megatron.data.tokenizer import Tokenizer
from eve_megatron.hf import eve_image_rules as rules
from eve_megatron.hf.eve_prompt import IMAGE_TOKEN_INDEX


def prompt_ids(tokenizer: Tokenizer, question: str, images: Sequence[torch.Tensor],
               template: str = "qwen2", block: int = rules.BLOCK) -> List[int]:
    """Token ids of a one-question prompt, image slots expanded to their image tokens.

    ``question`` may hold ``<image>`` markers; images without one go before the question
    (as in training). The prompt ends where the answer would start (`` ASSISTANT:`` for
    qwen2 and vicuna_v1, whose answer is two supervised segments: text, then ``</s>``).
    """
    if IMAGE_TOKEN not in question and images:
        question = IMAGE_TOKEN * len(images) + question
    segments = render_conversation([("user", question), ("assistant", "-")], len(images), template)
    last_answer = max(k for k, s in enumerate(segments)  # the answer's first segment
                      if s.supervised and not (k and segments[k - 1].supervised))
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
