"""Greedy answers from an exported EVE folder (what ``tools/generate.py`` runs).

The model and its image processor are loaded the way users load them
(``AutoModelForCausalLM``/``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)``,
i.e. the code copied into the export, with its ``max_size`` and ``alpha`` settings),
the prompt is the training template's (release qwen2 template and system prompt by
default), decoding stops at ``<|im_end|>`` and the answer drops special tokens, as the
official decoding does. An EVEv1 export (``model_type "eve"``) gets its own image processor
(``AutoImageProcessor``: EVEv1's resize rule), the ``vicuna_v1`` template and stops at
``</s>``, as the official EVEv1 benchmarks decode (greedy, ``--conv-mode vicuna_v1``).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from eve_megatron.checksums import SUMS, check_folder
from eve_megatron.data.templates import IM_END, LLAMA_EOS
from eve_megatron.data.tokenizer import Tokenizer, load_tokenizer
from eve_megatron.hf.processing import prompt_ids


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword in the installed transformers (``dtype`` from 4.56)."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def load_export(model_dir: str, dtype: torch.dtype = torch.float32, verify: bool = True):
    """``(model, tokenizer, image processor)`` of an exported folder (offline, eval mode);
    ``verify`` checks its files against its ``SHA256SUMS`` first (a note on stderr when it
    has none)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir!r} is not an exported model folder (no config.json)")
    if verify and not check_folder(model_dir, "model folder"):
        print(f"note: {model_dir} has no {SUMS}; its files are not verified", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True,
                                                 local_files_only=True, **dtype_kwarg(dtype))
    model.eval()
    if is_evev1(model):
        from transformers import AutoImageProcessor

        images = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True,
                                                    local_files_only=True)
        return model, load_tokenizer(model_dir), images
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True,
                                              local_files_only=True)
    return model, load_tokenizer(model_dir), processor.image_processor


def is_evev1(model) -> bool:
    """Whether a loaded export is EVEv1 (``model_type "eve"``, ``EVELlamaForCausalLM``)."""
    return getattr(model.config, "model_type", None) == "eve"


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


def answer(model, tokenizer: Tokenizer, image_processor, prompt: str,
           image_paths: Sequence[str] = (), max_new_tokens: int = 256,
           template: Optional[str] = None, resize_rule: Optional[str] = None
           ) -> Tuple[str, List[int]]:
    """``(answer text without special tokens, answer token ids)`` of one prompt; images by
    the export's image processor (``resize_rule`` overrides its ``resize_mode``). The
    template defaults to the family's (``qwen2``; EVEv1 ``vicuna_v1``); decoding stops at
    the template's end of answer (``<|im_end|>``; ``</s>`` for vicuna_v1)."""
    template = template or ("vicuna_v1" if is_evev1(model) else "qwen2")
    images = [image_processor.process_one(p, resize_mode=resize_rule) for p in image_paths]
    ids = prompt_ids(tokenizer, prompt, images, template, block=model.config.image_block)
    stop = LLAMA_EOS if template == "vicuna_v1" else IM_END
    new = greedy(model, ids, images, max_new_tokens, tokenizer.token_id(stop))
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new


def escape_line(text: str) -> str:
    """``text`` on one line: backslashes, carriage returns and line breaks escaped."""
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
