"""Hugging Face side of EVE: ``EVEQwen2ForCausalLM`` on ``transformers``' Qwen2 pieces.

Copied next to the weights of every export, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it; depends
on ``torch`` and ``transformers`` only. Parameter names are the released checkpoint's.

Inputs: ``input_ids`` hold ``config.image_token_index`` at every image-token position
(``1 + h'(w'+1)`` per image, see ``processing.py``) and ``pixel_values`` the images in
the order their spans appear (row-major over the batch): a list of ``[3, H, W]``
tensors or one ``[n, 3, H, W]`` tensor, sides multiples of 32, CLIP-normalised. Each
token goes through the text or the vision weights of a layer (routed, not blended);
attention is joint and causal over the whole sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_eve_qwen2 import EVEQwen2Config


def routed(x: torch.Tensor, vision_mask: Optional[torch.Tensor], text_fn, vision_fn):
    """``text_fn`` on text tokens, ``vision_fn`` on vision tokens (``vision_mask`` true).

    Without a vision module (that part is not decoupled) ``text_fn`` serves every token.
    """
    if vision_fn is None or vision_mask is None or not bool(vision_mask.any()):
        return text_fn(x)
    if bool(vision_mask.all()):
        return vision_fn(x)
    flat, mask = x.reshape(-1, x.shape[-1]), vision_mask.reshape(-1)
    text_rows, vision_rows = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
    t, v = text_fn(flat[text_rows]), vision_fn(flat[vision_rows])
    out = t.new_empty(flat.shape[0], t.shape[-1])
    out[text_rows], out[vision_rows] = t, v
    return out.view(*x.shape[:-1], -1)


class EVEVisionTower(nn.Module):
    """Patch embedding: conv(16/16) -> GELU -> conv(2/2); split token per row, class token first."""

    def __init__(self, config: EVEQwen2Config):
        super().__init__()
        c, p, d = config.mm_hidden_size, config.patch_stride, config.dense_stride
        self.patch_embedding = nn.Sequential(nn.Conv2d(3, c, p, p), nn.GELU(),
                                             nn.Conv2d(c, config.hidden_size, d, d))
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.split_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, images) -> torch.Tensor:
        """Images -> their ``1 + h'(w'+1)`` tokens each, concatenated ``[sum N, hidden]``."""
        dtype = self.class_embedding.dtype
        out = []
        for image in images:
            f = self.patch_embedding(image.to(dtype)[None])[0]  # [hidden, h', w']
            split = self.split_embedding[:, None, None].expand(-1, f.shape[1], 1)
            rows = torch.cat([f, split], dim=2).flatten(1).t()
            out.append(torch.cat([self.class_embedding[None], rows]))
        return torch.cat(out) if out else self.class_embedding.new_zeros(0, self.class_embedding.numel())


class EVEQwen2Attention(Qwen2Attention):
    """Qwen2 attention whose q/k/v and output projections have vision copies (``moe_``)."""

    def __init__(self, config: EVEQwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.moe_q_proj = self.moe_k_proj = self.moe_v_proj = self.moe_o_proj = None
        if config.decoupled("self_attn"):
            heads, kv = config.num_attention_heads, config.num_key_value_heads
            self.moe_q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=True)
            self.moe_k_proj = nn.Linear(config.hidden_size, kv * self.head_dim, bias=True)
            self.moe_v_proj = nn.Linear(config.hidden_size, kv * self.head_dim, bias=True)
            self.moe_o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask,
                past_key_values: Optional[Cache] = None, vision_mask=None, **kwargs):
        """Same as Qwen2's, with each projection routed by ``vision_mask``."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = routed(hidden_states, vision_mask, self.q_proj, self.moe_q_proj)
        k = routed(hidden_states, vision_mask, self.k_proj, self.moe_k_proj)
        v = routed(hidden_states, vision_mask, self.v_proj, self.moe_v_proj)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                         eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return routed(out, vision_mask, self.o_proj, self.moe_o_proj), weights


class EVEQwen2DecoderLayer(GradientCheckpointingLayer):
    """``h = x + O_m(Attn(QKV_m(LN1_m(x)))); y = h + MLP_m(LN2_m(h))``, m = token modality."""

    def __init__(self, config: EVEQwen2Config, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = EVEQwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        norms = config.decoupled("layernorm")
        self.moe_input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps) if norms else None
        self.moe_post_attention_layernorm = (
            Qwen2RMSNorm(config.hidden_size, eps=eps) if norms else None)
        self.moe_mlp = Qwen2MLP(config) if config.decoupled("mlp") else None

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None,
                past_key_values=None, vision_mask=None, **kwargs) -> torch.Tensor:
        """One layer; ``vision_mask`` ``[b, s]`` routes each token."""
        ln = routed(hidden_states, vision_mask, self.input_layernorm, self.moe_input_layernorm)
        attn, _ = self.self_attn(ln, position_embeddings, attention_mask,
                                 past_key_values=past_key_values, vision_mask=vision_mask, **kwargs)
        hidden_states = hidden_states + attn
        ln = routed(hidden_states, vision_mask, self.post_attention_layernorm,
                    self.moe_post_attention_layernorm)
        return hidden_states + routed(ln, vision_mask, self.mlp, self.moe_mlp)


class EVEQwen2PreTrainedModel(PreTrainedModel):
    """Weight init and capabilities shared by the EVE HF classes."""

    config_class = EVEQwen2Config
    config: EVEQwen2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EVEQwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EVEVisionTower):
            init.normal_(module.class_embedding, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.split_embedding, mean=0.0, std=self.config.initializer_range)


class EVEQwen2Model(EVEQwen2PreTrainedModel):
    """Token embedding with image tokens spliced in, the decoder layers and the final norm."""

    def __init__(self, config: EVEQwen2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_tower = EVEVisionTower(config)
        self.layers = nn.ModuleList(
            [EVEQwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.post_init()

    def embed(self, input_ids: torch.Tensor, pixel_values=None):
        """``(inputs_embeds, vision_mask)``: token embeddings with the image tokens spliced in."""
        vision_mask = input_ids == self.config.image_token_index
        embeds = self.embed_tokens(input_ids.masked_fill(vision_mask, 0))
        n_vision = int(vision_mask.sum())
        if pixel_values is None:
            if n_vision:
                raise ValueError(f"input_ids hold {n_vision} image tokens but no pixel_values")
            return embeds, vision_mask
        image_tokens = self.vision_tower(pixel_values)
        if image_tokens.shape[0] != n_vision:
            raise ValueError(f"input_ids hold {n_vision} image tokens but the images make "
                             f"{image_tokens.shape[0]} (1 + h'(w'+1) each)")
        embeds = embeds.masked_scatter(vision_mask[..., None], image_tokens.to(embeds.dtype))
        return embeds, vision_mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Optional[Cache] = None, inputs_embeds=None, use_cache=None,
                pixel_values=None, vision_mask=None, **kwargs) -> BaseModelOutputWithPast:
        """Hidden states of the last layer (after the final norm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds, vision_mask = self.embed(input_ids, pixel_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + seen).unsqueeze(0)
        mask = attention_mask
        if not isinstance(mask, dict):
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                      attention_mask=attention_mask,
                                      past_key_values=past_key_values, position_ids=position_ids)
        else:
            mask = mask["full_attention"]
        hidden = inputs_embeds
        rotary = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                           past_key_values=past_key_values, vision_mask=vision_mask,
                           position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       past_key_values=past_key_values if use_cache else None)


class EVEQwen2ForCausalLM(EVEQwen2PreTrainedModel, GenerationMixin):
    """EVE with its LM head; ``generate`` passes ``pixel_values`` to the prefill step only."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EVEQwen2Config):
        super().__init__(config)
        self.model = EVEQwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values: Optional[Cache] = None, inputs_embeds=None, labels=None,
                use_cache=None, pixel_values=None, vision_mask=None, logits_to_keep=0,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits ``[b, s, vocab]`` (and the shifted cross-entropy loss with ``labels``)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         pixel_values=pixel_values, vision_mask=vision_mask, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=out.past_key_values)


__all__ = ["EVEQwen2ForCausalLM", "EVEQwen2Model", "EVEQwen2PreTrainedModel"]
