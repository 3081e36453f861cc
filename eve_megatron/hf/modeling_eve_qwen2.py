"""Hugging Face side of EVE: ``EVEQwen2Model`` and ``EVEQwen2ForCausalLM``.

Copied next to the weights of every export, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it. Written on
``torch`` and the stable public API of ``transformers`` only (``PreTrainedModel``,
``GenerationMixin``, ``Cache``/``DynamicCache``, the output classes): the layers, rotary
embedding, masks and attention are our own, so nothing here moves when a release
changes Qwen2's internals. Parameter names are the released checkpoint's.

Inputs: ``input_ids`` hold ``config.image_token_index`` at every image-token position
(``1 + h'(w'+1)`` per image) and ``pixel_values`` the images (CLIP-normalised, sides
multiples of 32) in the order their spans appear (row-major over the batch): a list of
``[3, H, W]`` tensors, an ``[n, 3, H, W]`` tensor, or the processor's padded
``[batch, max_images, 3, H, W]`` tensor with ``image_sizes`` ``[batch, max_images, 2]``
(height and width of each image, 0 for an empty slot). Each token goes through the text
or the vision weights of a layer (routed, not blended); attention is joint and causal.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_eve_qwen2 import EVEQwen2Config
from .eve_layers import CausalMasks, EVEDecoderLayer, EVERMSNorm, EVEVisionTower, rotary_tables
from .eve_generation import (GenerationInputs, image_list, pad_images, rows_of_images,
                             take_cache)
from .eve_image_rules import BLOCK  # noqa: F401  (transformers 4 copies direct imports only)

try:  # transformers 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as _init
except ImportError:  # transformers 4: from_pretrained initialises only the missing weights
    _init = nn.init


def _cache_field(output_class) -> str:
    """Name this release gives the cache in its output classes (``past_key_values``/``cache``)."""
    return "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"


class EVEQwen2PreTrainedModel(PreTrainedModel):
    """Weight init and capabilities shared by the EVE HF classes."""

    config_class = EVEQwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EVEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4: generate may hand us a Cache
    _supports_static_cache = True  # transformers 4: cache_implementation="static"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` that always writes this code beside the weights
        (transformers 4.x leaves it out for a model it loaded with ``trust_remote_code``)."""
        if getattr(self, "_auto_class", None) is None:
            auto = "AutoModel" if isinstance(self, EVEQwen2Model) else "AutoModelForCausalLM"
            type(self).register_for_auto_class(auto)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, EVERMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, EVEVisionTower):
            _init.normal_(module.class_embedding, mean=0.0, std=std)
            _init.normal_(module.split_embedding, mean=0.0, std=std)


class EVEQwen2Model(EVEQwen2PreTrainedModel):
    """Token embedding with image tokens spliced in, the decoder layers and the final norm."""

    def __init__(self, config: EVEQwen2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_tower = EVEVisionTower(config)
        self.layers = nn.ModuleList(
            [EVEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = EVERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head_dim = (getattr(config, "head_dim", None)
                         or config.hidden_size // config.num_attention_heads)
        self.rope_base = config.rope_base()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None):
        """``(inputs_embeds, vision_mask)``: token embeddings with the image tokens spliced in."""
        vision_mask = input_ids == self.config.image_token_index
        embeds = self.embed_tokens(input_ids.masked_fill(vision_mask, 0))
        images = image_list(pixel_values, image_sizes, self.config.image_block)
        rows_of_images(input_ids, images, self.config)  # names a row whose images do not add up
        image_tokens = self.vision_tower(images)
        n_vision = int(vision_mask.sum())
        if image_tokens.shape[0] != n_vision:
            raise ValueError(f"input_ids hold {n_vision} image tokens but the {len(images)} images "
                             f"make {image_tokens.shape[0]} (1 + h'(w'+1) each)")
        embeds = embeds.masked_scatter(vision_mask[..., None], image_tokens.to(embeds.dtype))
        return embeds, vision_mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Optional[Cache] = None, inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                pixel_values=None, image_sizes=None, vision_mask=None, cache: Optional[Cache] = None):
        """Hidden states after the final norm (``BaseModelOutputWithPast``, or its tuple)."""
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (cfg.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = cfg.return_dict if return_dict is None else return_dict
        inputs_embeds, vision_mask = self._embeddings(input_ids, inputs_embeds, pixel_values,
                                                      image_sizes, vision_mask)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = take_cache({"past_key_values": past_key_values, "cache": cache})
        if use_cache and cache is None:
            cache = DynamicCache()
        b, s = inputs_embeds.shape[:2]
        past = int(cache.get_seq_length()) if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (b, past + s):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the cache holds {past} "
                f"positions and the input {s}: a 2-D mask over all {past + s} positions is needed"
                + (" (no cache was passed: was it handed under another name?)" if cache is None else ""))
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, -1)
        elif position_ids.numel() and int(position_ids.max()) >= past + s:
            raise ValueError(f"position_ids reach {int(position_ids.max())} but the cache holds {past} "
                             f"positions and the input {s}: the cache of the earlier positions was "
                             "not passed (a decoding step needs it)")
        rotary = rotary_tables(position_ids, self.head_dim, self.rope_base, inputs_embeds.dtype)
        masks = CausalMasks(attention_mask, b, s, past)
        hidden, states, attentions = inputs_embeds, (), ()
        for layer in self.layers:
            states += (hidden,)
            if self.gradient_checkpointing and self.training:
                hidden, weights = self._gradient_checkpointing_func(
                    layer.__call__, hidden, rotary, masks, None, vision_mask, output_attentions)
            else:
                hidden, weights = layer(hidden, rotary, masks, cache, vision_mask, output_attentions)
            attentions += (weights,)
        hidden = self.norm(hidden)
        cache_out = {_cache_field(BaseModelOutputWithPast): cache if use_cache else None}
        out = BaseModelOutputWithPast(**cache_out, last_hidden_state=hidden,
                                      hidden_states=states + (hidden,) if output_hidden_states else None,
                                      attentions=attentions if output_attentions else None)
        return out if return_dict else out.to_tuple()

    def _embeddings(self, input_ids, inputs_embeds, pixel_values, image_sizes, vision_mask):
        """``(inputs_embeds, vision_mask)`` from either input form, with clear errors."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if vision_mask is not None:
                raise ValueError("vision_mask goes with inputs_embeds; with input_ids the image "
                                 f"positions are the ids equal to {self.config.image_token_index}")
            return self.embed(input_ids, pixel_values, image_sizes)
        if pixel_values is not None:
            raise ValueError("pixel_values cannot go with inputs_embeds: build the embeddings with "
                             "model.embed(input_ids, pixel_values) and pass its vision_mask")
        if vision_mask is None:
            if self.config.add_moe:
                raise ValueError("inputs_embeds needs vision_mask ([batch, seq] bool, true at image "
                                 "tokens): without it image tokens would run through the text "
                                 "weights. model.embed(input_ids, pixel_values) returns both")
            vision_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool,
                                      device=inputs_embeds.device)
        if tuple(vision_mask.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(f"vision_mask has shape {tuple(vision_mask.shape)}, inputs_embeds "
                             f"{tuple(inputs_embeds.shape[:2])}")
        return inputs_embeds, vision_mask.bool()


class EVEQwen2ForCausalLM(EVEQwen2PreTrainedModel, GenerationMixin):
    """EVE with its LM head; ``generate`` passes the images to the prefill step only."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EVEQwen2Config):
        super().__init__(config)
        self.model = EVEQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Optional[Cache] = None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, pixel_values=None, image_sizes=None, vision_mask=None,
                logits_to_keep=0, num_logits_to_keep=None, cache: Optional[Cache] = None):
        """Logits ``[b, s, vocab]`` and, with ``labels``, the shifted cross-entropy loss (image
        positions and -100 are ignored, so ``labels=input_ids.clone()`` works)."""
        return_dict = (self.config.return_dict if return_dict is None
                       else return_dict)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, return_dict=True,
                         pixel_values=pixel_values, image_sizes=image_sizes,
                         vision_mask=vision_mask, cache=cache)
        keep = logits_to_keep if num_logits_to_keep is None else num_logits_to_keep
        hidden = out.last_hidden_state
        if isinstance(keep, int) and keep > 0:
            hidden = hidden[:, -keep:]
        elif isinstance(keep, torch.Tensor):
            hidden = hidden[:, keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            labels = labels.masked_fill(labels == self.config.image_token_index, -100)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        cache = getattr(out, _cache_field(BaseModelOutputWithPast))
        result = CausalLMOutputWithPast(**{_cache_field(CausalLMOutputWithPast): cache}, loss=loss,
                                        logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None,
                                      **kwargs):
        """One decoding step's inputs: only the tokens the cache lacks, the images only while
        the cache is empty (see ``eve_generation.GenerationInputs``)."""
        kwargs.update(attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return GenerationInputs(self).prepare(input_ids, kwargs)

    def generate(self, inputs=None, generation_config=None, pixel_values=None, image_sizes=None,
                 **kwargs):
        """``GenerationMixin.generate``; images in list (or ``[n, 3, H, W]``) form are first
        padded per batch row so beam search and ``num_return_sequences`` copy them with their row."""
        if pixel_values is not None and not (isinstance(pixel_values, torch.Tensor)
                                             and pixel_values.dim() == 5):
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            if ids is None:
                raise ValueError("generate with pixel_values needs input_ids (the image positions)")
            images = image_list(pixel_values, image_sizes, self.config.image_block)
            pixel_values, image_sizes = pad_images(rows_of_images(ids, images, self.config))
        if pixel_values is not None:
            kwargs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return super().generate(inputs, generation_config, **kwargs)


__all__ = ["EVEQwen2ForCausalLM", "EVEQwen2Model", "EVEQwen2PreTrainedModel"]
