"""Hugging Face side of EVEv1: ``EVELlamaModel`` and ``EVELlamaForCausalLM`` (EVE-7B-v1.0).

Copied next to the weights of every EVEv1 export, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it; torch and
the public API of transformers only. The decoder, masks, RoPE, cache handling and
generation contract are EVEv2's (``modeling_eve_qwen2.py``, ``eve_layers.py``,
``eve_generation.py``) with a dense Llama layer (no q/k/v bias, no vision copies); the
image tokens come from EVEv1's patch embedding layer and ``mm_projector``
(``evev1_layers.py``). Parameter names are the released checkpoint's, the PAL
(``vision_tower_compressor``) and the CLIP teacher (``vision_clip``) included: they load
but inference never runs them.

Inputs as for EVEv2: ``input_ids`` hold ``image_token_index`` (-200) at each of the
``1 + h(w+1)`` positions of an image, ``pixel_values`` the images (``[3, H, W]``, sides
multiples of 28, CLIP-normalised: ``image_processing_eve_llama.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_eve_llama import EVELlamaConfig
from .configuration_eve_qwen2 import EVEQwen2Config  # noqa: F401  (transformers 4 copies direct imports only)
from .eve_generation import image_list, rows_of_images
from .eve_image_rules import BLOCK  # noqa: F401
from .eve_layers import EVEDecoderLayer, EVERMSNorm
from .evev1_image_rules import BASE_SIZE  # noqa: F401
from .evev1_layers import CLIPTeacher, EVEv1VisionTower, VisionCompressor
from .modeling_eve_qwen2 import EVEQwen2ForCausalLM, EVEQwen2Model, EVEQwen2PreTrainedModel, _init


class EVELlamaPreTrainedModel(EVEQwen2PreTrainedModel):
    """Weight init shared by the EVEv1 HF classes (EVEv2's plus LayerNorms and the PEL)."""

    config_class = EVELlamaConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, EVEv1VisionTower):
            _init.normal_(module.class_embedding, mean=0.0, std=std)
            _init.normal_(module.split_embedding, mean=0.0, std=std)


class _Holder(nn.Module):
    """A named level of the released module tree (``vision_clip.backbone``)."""


class EVELlamaModel(EVELlamaPreTrainedModel, EVEQwen2Model):
    """Token embedding with EVEv1 image tokens spliced in, the Llama layers, the final norm
    (+ the PAL and the teacher, for the weights)."""

    def __init__(self, config: EVELlamaConfig):
        EVELlamaPreTrainedModel.__init__(self, config)
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.vision_tower = EVEv1VisionTower(config)
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, h), nn.GELU(),
                                          nn.Linear(h, h))
        self.layers = nn.ModuleList(EVEDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = EVERMSNorm(h, config.rms_norm_eps)
        self.vision_tower_compressor = VisionCompressor(config)
        self.vision_clip = _Holder()
        self.vision_clip.backbone = _Holder()
        self.vision_clip.backbone.vision_model = CLIPTeacher(config.clip())
        self.vision_clip.requires_grad_(False)
        self.head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
        self.rope_base = config.rope_base()
        self.gradient_checkpointing = False
        self.post_init()

    def image_tokens(self, images) -> torch.Tensor:
        """``[sum N, hidden]``: each image's PEL tokens through ``mm_projector``."""
        dtype = self.mm_projector[0].weight.dtype
        tokens = [self.vision_tower(image) for image in images]
        if not tokens:
            return self.embed_tokens.weight.new_zeros(0, self.config.hidden_size)
        return self.mm_projector(torch.cat(tokens).to(dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None):
        """``(inputs_embeds, vision_mask)``: token embeddings with the image tokens spliced in."""
        vision_mask = input_ids == self.config.image_token_index
        embeds = self.embed_tokens(input_ids.masked_fill(vision_mask, 0))
        images = image_list(pixel_values, image_sizes, self.config.image_block)
        rows_of_images(input_ids, images, self.config)  # names a row whose images do not add up
        image_tokens = self.image_tokens(images)
        n_vision = int(vision_mask.sum())
        if image_tokens.shape[0] != n_vision:
            raise ValueError(f"input_ids hold {n_vision} image tokens but the {len(images)} images "
                             f"make {image_tokens.shape[0]} (1 + h(w+1) each)")
        embeds = embeds.masked_scatter(vision_mask[..., None], image_tokens.to(embeds.dtype))
        return embeds, vision_mask


class EVELlamaForCausalLM(EVELlamaPreTrainedModel, EVEQwen2ForCausalLM):
    """EVEv1 with its LM head (untied in the release); ``generate`` as EVEv2's."""

    def __init__(self, config: EVELlamaConfig):
        EVELlamaPreTrainedModel.__init__(self, config)
        self.model = EVELlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["EVELlamaForCausalLM", "EVELlamaModel", "EVELlamaPreTrainedModel"]
