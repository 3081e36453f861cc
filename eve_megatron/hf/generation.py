"""Greedy answers from an exported EVE folder (what ``tools/generate.py`` runs).

The model is loaded the way users load it (``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``, i.e. the modelling code copied into the export), the image
is resized by the export's ``preprocessor_config.json`` ``max_size``, the prompt is the
release's qwen2 template with its system prompt, and decoding stops at ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import torch

from eve_megatron.data.templates import IM_END
from eve_megatron.data.tokenizer import Tokenizer, load_tokenizer
from eve_megatron.hf.processing import load_inference_image, prompt_ids


def load_export(model_dir: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, preprocessor config)`` of an exported folder (offline, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype,
                                                 local_files_only=True)
    model.eval()
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        preprocessor = json.load(f)
    return model, load_tokenizer(model_dir), preprocessor


@torch.no_grad()
def greedy(model, input_ids: Sequence[int], images: Sequence[torch.Tensor], max_new_tokens: int,
           stop_id: Optional[int]) -> List[int]:
    """New token ids of a KV-cache greedy ``generate`` (``stop_id`` excluded)."""
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        pixel_values=[im.to(model.dtype) for im in images] if images else None,
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=stop_id, pad_token_id=stop_id if stop_id is not None else 0,
        temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    if stop_id is not None and stop_id in new:
        new = new[:new.index(stop_id)]
    return new


def answer(model, tokenizer: Tokenizer, preprocessor: dict, prompt: str,
           image_paths: Sequence[str] = (), max_new_tokens: int = 256, template: str = "qwen2",
           resize_rule: str = "reference") -> Tuple[str, List[int]]:
    """``(answer text, answer token ids)`` of one prompt with optional images."""
    images = [load_inference_image(p, preprocessor["max_size"], resize_rule) for p in image_paths]
    ids = prompt_ids(tokenizer, prompt, images, template)
    new = greedy(model, ids, images, max_new_tokens, tokenizer.token_id(IM_END))
    return tokenizer.decode(new).strip(), new
