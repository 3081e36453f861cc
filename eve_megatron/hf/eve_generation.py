"""Image inputs and decoding-step inputs of the HF EVE model.

Shipped in every export beside ``modeling_eve_qwen2.py`` (``torch`` and ``transformers``
only). The contract with ``GenerationMixin`` is kept to its stable public part: the
model's ``prepare_inputs_for_generation`` receives the running sequence and every model
keyword, and decides itself what a step needs:

- the cache arrives as ``past_key_values`` (transformers 4.x to 5.23) or ``cache``
  (5.24 on); both are accepted, and one that is not a ``Cache`` is an error;
- the tokens the cache lacks are the last ``total - cache length``, where ``total`` is the
  length of the 2-D ``attention_mask`` (or of ``position_ids``, which 5.x keeps when it
  drops an all-ones mask), so cache continuation and candidate verification work;
- images go to a step only while the cache is empty; image placeholders a candidate
  generator copies out of the prompt into a later step are embedded as id 0 (the model
  never predicts a negative id, so such candidates are always rejected);
- positions count only attended tokens (``cumsum`` of the mask), so left padding works;
- generation bookkeeping keys that releases add (``cache_position``,
  ``next_sequence_length``, ``is_first_iteration``) are consumed here; every other keyword
  goes to ``forward``, which names any it does not know.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache

from .eve_image_rules import image_token_count

CACHE_NAMES = ("past_key_values", "cache")
BOOKKEEPING = ("cache_position", "next_sequence_length", "is_first_iteration")


def take_cache(kwargs: dict) -> Optional[Cache]:
    """Pop the cache from ``kwargs`` under either name; it must be a ``Cache``."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
    found = [c for c in found if c is not None]
    if len(found) == 2 and found[0] is not found[1]:
        raise ValueError("two different caches were passed (past_key_values and cache)")
    cache = found[0] if found else None
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"the cache must be a transformers Cache (e.g. DynamicCache), got "
                        f"{type(cache).__name__}; legacy tuple caches are not supported")
    return cache


def _check_image(image: torch.Tensor, block: int, where: str) -> torch.Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: an image must be [3, H, W], got {tuple(image.shape)}")
    if image.shape[1] % block or image.shape[2] % block or not image.shape[1] or not image.shape[2]:
        raise ValueError(f"{where}: image sides must be positive multiples of {block} (the "
                         f"processor resizes them), got {tuple(image.shape[1:])}")
    return image


def image_list(pixel_values, image_sizes, block: int) -> List[torch.Tensor]:
    """The images of ``pixel_values`` in span order, each ``[3, H, W]`` (see the model doc)."""
    if pixel_values is None:
        return []
    if isinstance(pixel_values, (list, tuple)):
        flat = []
        for item in pixel_values:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return [_check_image(im, block, f"pixel_values[{k}]") for k, im in enumerate(flat)]
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (3, 4, 5):
        raise ValueError("pixel_values must be a list of [3, H, W] tensors, an [n, 3, H, W] tensor "
                         "or the processor's [batch, max_images, 3, H, W] tensor with image_sizes")
    lead = pixel_values.shape[:-3]
    images = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    sizes = None
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
        if tuple(torch.as_tensor(image_sizes).shape) != (*lead, 2):
            raise ValueError(f"image_sizes must have shape {(*lead, 2)}, got "
                             f"{tuple(torch.as_tensor(image_sizes).shape)}")
    out = []
    for k, image in enumerate(images):
        h, w = sizes[k] if sizes is not None else image.shape[-2:]
        if h and w:
            out.append(_check_image(image[:, :h, :w], block, f"pixel_values image {k}"))
    return out


def rows_of_images(input_ids: torch.Tensor, images: Sequence[torch.Tensor], config) -> List[List]:
    """Split span-ordered ``images`` into the batch rows whose image tokens they fill."""
    counts = (input_ids == config.image_token_index).sum(-1).reshape(-1).tolist()
    block, k, rows = config.image_block, 0, []
    for b, n in enumerate(counts):
        row, got = [], 0
        while got < n and k < len(images):
            got += image_token_count(images[k].shape[-2] // block, images[k].shape[-1] // block)
            row.append(images[k])
            k += 1
        if got != n:
            raise ValueError(f"row {b} of input_ids holds {n} image tokens but its images make "
                             f"{got} (1 + h'(w'+1) each; images are taken in span order)")
        rows.append(row)
    if k != len(images):
        raise ValueError(f"{len(images)} images were given but input_ids have image tokens for {k}")
    return rows


def pad_images(rows: Sequence[Sequence[torch.Tensor]]
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``([batch, max_images, 3, H, W] zero-padded pixels, [batch, max_images, 2] sizes)``."""
    most = max((len(r) for r in rows), default=0)
    if most == 0:
        return None, None
    images = [im for r in rows for im in r]
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    pixels = images[0].new_zeros(len(rows), most, 3, h, w)
    sizes = torch.zeros(len(rows), most, 2, dtype=torch.long)
    for b, row in enumerate(rows):
        for m, im in enumerate(row):
            pixels[b, m, :, :im.shape[-2], :im.shape[-1]] = im
            sizes[b, m] = torch.tensor(im.shape[-2:])
    return pixels, sizes


class GenerationInputs:
    """Builds one decoding step's model inputs (see the module doc)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def prepare(self, input_ids: torch.Tensor, kwargs: dict) -> dict:
        kwargs = dict(kwargs)
        cache = take_cache(kwargs)
        for key in BOOKKEEPING:
            kwargs.pop(key, None)
        mask = kwargs.pop("attention_mask", None)
        embeds, vision_mask = kwargs.pop("inputs_embeds", None), kwargs.pop("vision_mask", None)
        pixel_values, image_sizes = kwargs.pop("pixel_values", None), kwargs.pop("image_sizes", None)
        position_ids = kwargs.pop("position_ids", None)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if mask is not None:
            total = mask.shape[-1]
        elif position_ids is not None:  # transformers 5 drops an all-ones mask, keeps positions
            total = position_ids.shape[-1]
        elif embeds is not None:
            raise ValueError("generating from inputs_embeds needs an attention_mask")
        else:
            total = input_ids.shape[1]
        new = total - past
        if new <= 0:
            raise ValueError(f"nothing to decode: the cache holds {past} of {total} positions")
        out = {"past_key_values": cache} if cache is not None else {}
        prompt = embeds.shape[1] if embeds is not None else 0
        if past < prompt:
            if past:
                raise ValueError("a prefill from inputs_embeds must start from an empty cache")
            out.update(self._embeds(embeds, vision_mask, input_ids, new - prompt))
        else:
            ids = input_ids[:, -new:]
            if past:
                ids = ids.masked_fill(ids == self.config.image_token_index, 0)
            elif pixel_values is not None:
                ids = self._drop_copied_placeholders(ids, pixel_values, image_sizes)
                out.update(pixel_values=pixel_values, image_sizes=image_sizes)
            out["input_ids"] = ids
        if position_ids is not None:
            out["position_ids"] = position_ids[..., -new:]
        elif mask is not None:
            pos = mask.long().cumsum(-1) - 1
            out["position_ids"] = pos.masked_fill(mask == 0, 1)[:, -new:]
        if mask is not None:
            out["attention_mask"] = mask
        out.update(kwargs)
        return out

    def _drop_copied_placeholders(self, ids, pixel_values, image_sizes):
        """Placeholders after a row's own image tokens (candidates copied from the prompt into a
        first step, as prompt lookup does) become id 0; needs the per-row (padded) image form."""
        if not (isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5):
            return ids
        block = self.config.image_block
        sizes = (torch.as_tensor(image_sizes) if image_sizes is not None else torch.tensor(
            pixel_values.shape[-2:]).expand(*pixel_values.shape[:2], 2)) // block
        per_image = torch.where(sizes[..., 0] > 0, 1 + sizes[..., 0] * (sizes[..., 1] + 1), 0)
        own = per_image.sum(-1).to(ids.device)  # [batch] image tokens of each row
        placeholder = ids == self.config.image_token_index
        copied = placeholder & (placeholder.long().cumsum(-1) > own[:, None])
        return ids.masked_fill(copied, 0)

    def _embeds(self, embeds, vision_mask, input_ids, generated: int) -> dict:
        """The prompt embeddings, followed (cache-free decoding) by the generated tokens'."""
        if generated <= 0:
            return {"inputs_embeds": embeds, "vision_mask": vision_mask}
        tail = input_ids[:, -generated:]
        more = self.model.get_input_embeddings()(tail).to(embeds.dtype)
        if vision_mask is not None:
            vision_mask = torch.cat([vision_mask.bool(), torch.zeros_like(tail, dtype=torch.bool)], 1)
        return {"inputs_embeds": torch.cat([embeds, more], 1), "vision_mask": vision_mask}
