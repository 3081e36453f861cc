"""``EVEProcessor``: tokenizer + ``EVEImageProcessor``, with the release's chat template.

Shipped in every export: ``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)``.
Each ``<image>`` in the text becomes the ``1 + h'(w'+1)`` image positions of its image
(id ``image_token_index``, -200); the text between markers is tokenised piece by piece
without special tokens, exactly as training tokenises a sample, so a prompt rendered by
``apply_chat_template`` is token for token the training prompt (``qwen2`` template:
``{system} USER: <image>\\n{q} ASSISTANT:``). Batches are padded on the left (generation)
and the images of each row travel with it (``[batch, max_images, 3, H, W]`` plus
``image_sizes``), so beam search and ``num_return_sequences`` copy them correctly.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .eve_generation import pad_images
from .eve_image_rules import image_token_count
from .eve_prompt import CHAT_TEMPLATE, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from .image_processing_eve_qwen2 import flatten_images

class EVEProcessor(ProcessorMixin):
    """Image processor + tokenizer of an EVE export (see the module doc)."""

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # 5.x derives them from __init__
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
    image_token = IMAGE_TOKEN

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token_index = IMAGE_TOKEN_INDEX

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True,
                 padding_side: str = "left", images_kwargs: Optional[dict] = None,
                 **kwargs) -> BatchFeature:
        """``input_ids``/``attention_mask`` of ``text`` (a string or a list) with every
        ``<image>`` expanded, and the images as ``pixel_values``/``image_sizes``.

        ``images``: one image, a flat list (taken by the texts' markers in order) or one
        list per text; any PIL mode, array, tensor, path or bytes. ``resize_mode``,
        ``alpha`` and ``max_size`` go to the image processor.
        """
        images_kwargs = dict(images_kwargs or {})
        for key in ("resize_mode", "alpha", "max_size"):
            if key in kwargs:
                images_kwargs[key] = kwargs.pop(key)
        kwargs.pop("legacy", None)  # the 4.4x pipelines' flag for other processors' argument order
        if kwargs:
            raise TypeError(f"EVEProcessor got unknown arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"EVEProcessor returns torch tensors; got "
                             f"return_tensors={return_tensors!r}")
        if text is None:
            return self.image_processor(images, **images_kwargs)
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._images_per_text(images, texts)
        rows, pixels = [], []
        for t, imgs in zip(texts, per_text):
            row_pixels = [self.image_processor.process_one(im, **images_kwargs) for im in imgs]
            rows.append(self._expand(t, row_pixels))
            pixels.append(row_pixels)
        data = self._pad(rows, padding, padding_side)
        pixel_values, image_sizes = pad_images(pixels)
        if pixel_values is not None:
            data.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return BatchFeature(data=data)

    def _images_per_text(self, images, texts: List[str]) -> List[List]:
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        if images is None:
            per_text = [[] for _ in texts]
        elif (isinstance(images, (list, tuple)) and len(images) == len(texts)
              and all(isinstance(x, (list, tuple)) for x in images)):
            per_text = [flatten_images(x) for x in images]
        else:
            flat, per_text = flatten_images(images), []
            if len(flat) != sum(counts):
                raise ValueError(f"the text holds {sum(counts)} {IMAGE_TOKEN} markers for "
                                 f"{len(flat)} images: put one {IMAGE_TOKEN} where each image goes "
                                 "(apply_chat_template does it)")
            for c in counts:
                per_text.append(flat[:c])
                flat = flat[c:]
        for k, (c, imgs) in enumerate(zip(counts, per_text)):
            if c != len(imgs):
                raise ValueError(f"text {k} holds {c} {IMAGE_TOKEN} markers for {len(imgs)} images")
        return per_text

    def _expand(self, text: str, pixels: List[torch.Tensor]) -> List[int]:
        block = self.image_processor.patch_stride * self.image_processor.dense_stride
        chunks = text.split(IMAGE_TOKEN)
        ids = list(self.tokenizer(chunks[0], add_special_tokens=False)["input_ids"]) if chunks[0] else []
        for image, chunk in zip(pixels, chunks[1:]):
            n = image_token_count(image.shape[1] // block, image.shape[2] // block)
            ids += [IMAGE_TOKEN_INDEX] * n
            if chunk:
                ids += list(self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return ids

    def _pad(self, rows: List[List[int]], padding, side: str) -> dict:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(r) for r in rows)
        if not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("texts of different lengths need padding=True")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None and len({len(r) for r in rows}) > 1:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        ids = torch.full((len(rows), longest), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=True,
                            tokenize=False, return_dict=False, return_tensors=None,
                            continue_final_message=False, processor_kwargs=None, **kwargs):
        """Render messages (``content`` a string with ``<image>`` markers, or a list of
        ``{"type": "text"|"image", ...}`` parts) with the release's template; with
        ``tokenize=True`` also run the processor on the text and the messages' images."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        template = chat_template or self.chat_template or CHAT_TEMPLATE
        texts = [self.tokenizer.apply_chat_template(list(c), chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
                 for c in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        images = [[part.get("image", part.get("url", part.get("path")))
                   for m in c if not isinstance(m["content"], str)
                   for part in m["content"] if part.get("type") == "image"] for c in conversations]
        options = dict(processor_kwargs or {})
        options.update({k: kwargs.pop(k) for k in ("padding", "padding_side", "resize_mode",
                                                   "alpha", "max_size") if k in kwargs})
        if kwargs:
            raise TypeError(f"apply_chat_template got unknown arguments {sorted(kwargs)}")
        out = self(text=texts, images=images if any(images) else None, return_tensors="pt", **options)
        return out if return_dict else out["input_ids"]

    def batch_decode(self, sequences, **kwargs) -> List[str]:
        """Texts of token id rows; image positions (negative ids) are left out."""
        rows = sequences.tolist() if isinstance(sequences, torch.Tensor) else sequences
        return self.tokenizer.batch_decode([[t for t in r if t >= 0] for r in rows], **kwargs)

    def decode(self, token_ids, **kwargs) -> str:
        """Text of one row of token ids; image positions (negative ids) are left out."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        return self.tokenizer.decode([t for t in ids if t >= 0], **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decoded texts of ``generate``'s output (what the ``image-text-to-text`` pipeline calls)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """``ProcessorMixin.save_pretrained``, plus the image processor's own
        ``preprocessor_config.json`` (which transformers 5 folds into processor_config.json,
        and which the official EVEv2 code reads)."""
        out = super().save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return out

    @property
    def model_input_names(self) -> List[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = ["EVEProcessor"]
