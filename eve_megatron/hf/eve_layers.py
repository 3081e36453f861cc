"""The layers of the HF EVE model: routed text/vision modules, RMSNorm, SwiGLU, RoPE, the
causal masks, joint GQA attention (sdpa or eager), the decoder layer, the patch embedding.

Shipped in every export beside ``modeling_eve_qwen2.py``; ``torch`` and ``transformers``'
``Cache`` only, so nothing here depends on a release's Qwen2 internals. Module and
parameter names are the released checkpoint's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

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


class EVERMSNorm(nn.Module):
    """RMSNorm computed in float32 (Qwen2's)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class EVEMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, config: EVEQwen2Config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_tables(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """``(cos, sin)`` ``[b, s, head_dim]`` of plain RoPE, computed in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.int64).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [b, s, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalMasks:
    """Additive ``[b, 1, q, kv]`` masks of one forward, built once per key length.

    Query ``i`` sits at cache slot ``past + i`` and sees slots ``<= past + i`` that the 2-D
    ``attention_mask`` (over slots ``0 .. past + q - 1``) does not hide. Slots past the
    mask (a static cache's empty tail) are hidden by causality alone.
    """

    def __init__(self, attention_mask: Optional[torch.Tensor], batch: int, q_len: int, past: int):
        self.attention_mask, self.batch, self.q_len, self.past = attention_mask, batch, q_len, past
        self.padded = attention_mask is not None and not bool(attention_mask.all())
        self._built = {}

    def sdpa_is_causal(self, kv_len: int) -> bool:
        """True when plain causal attention is exact (no padding, no past, no empty slots)."""
        return not self.padded and self.past == 0 and kv_len == self.q_len

    def needs_none(self, kv_len: int) -> bool:
        """True when every key is visible to every query (one new token, no padding)."""
        return not self.padded and self.q_len == 1 and kv_len == self.past + 1

    def __call__(self, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (kv_len, dtype)
        if key not in self._built:
            q = torch.arange(self.q_len, device=device)[:, None] + self.past
            allowed = (torch.arange(kv_len, device=device)[None, :] <= q)[None, None]
            allowed = allowed.expand(self.batch, 1, self.q_len, kv_len)
            if self.attention_mask is not None:
                seen = self.attention_mask.to(device=device, dtype=torch.bool)[:, :kv_len]
                if seen.shape[1] < kv_len:
                    seen = F.pad(seen, (0, kv_len - seen.shape[1]), value=True)
                allowed = allowed & seen[:, None, None, :]
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            self._built[key] = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return self._built[key]


class EVEAttention(nn.Module):
    """Joint causal GQA attention; q/k/v and output projections have vision copies (``moe_``)."""

    def __init__(self, config: EVEQwen2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // heads
        self.groups = heads // kv
        self.scaling = self.head_dim ** -0.5
        bias = getattr(config, "qkv_bias", True)  # Qwen2: True; Llama (EVEv1): False
        self.q_proj = nn.Linear(h, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, h, bias=False)
        self.moe_q_proj = self.moe_k_proj = self.moe_v_proj = self.moe_o_proj = None
        if config.decoupled("self_attn"):
            self.moe_q_proj = nn.Linear(h, heads * self.head_dim, bias=True)
            self.moe_k_proj = nn.Linear(h, kv * self.head_dim, bias=True)
            self.moe_v_proj = nn.Linear(h, kv * self.head_dim, bias=True)
            self.moe_o_proj = nn.Linear(heads * self.head_dim, h, bias=False)

    def forward(self, x, rotary, masks: CausalMasks, cache: Optional[Cache], vision_mask,
                output_attentions: bool):
        """``(output [b, s, h], attention weights or None)``."""
        b, s, _ = x.shape
        shape = (b, s, -1, self.head_dim)
        q = routed(x, vision_mask, self.q_proj, self.moe_q_proj).view(shape).transpose(1, 2)
        k = routed(x, vision_mask, self.k_proj, self.moe_k_proj).view(shape).transpose(1, 2)
        v = routed(x, vision_mask, self.v_proj, self.moe_v_proj).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rotary)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            slots = torch.arange(masks.past, masks.past + s, device=x.device)
            k, v = cache.update(k, v, self.layer_idx,
                                {"cache_position": slots, "sin": rotary[1], "cos": rotary[0]})
        k, v = (t.repeat_interleave(self.groups, dim=1) if self.groups > 1 else t for t in (k, v))
        kv_len = k.shape[-2]
        dropout = self.config.attention_dropout if self.training else 0.0
        impl = getattr(self.config, "_attn_implementation", None) or "sdpa"
        weights = None
        if impl == "eager" or output_attentions:
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            if not masks.needs_none(kv_len):
                scores = scores + masks(kv_len, scores.dtype, x.device)
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(F.dropout(weights, p=dropout, training=self.training), v)
        elif impl == "sdpa":
            causal = masks.sdpa_is_causal(kv_len) and s > 1
            mask = None if causal or masks.needs_none(kv_len) else masks(kv_len, q.dtype, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal, scale=self.scaling)
        else:
            raise ValueError(f"attn_implementation {impl!r} is not supported by EVE: "
                             "use 'sdpa' or 'eager'")
        out = out.transpose(1, 2).reshape(b, s, -1)
        return routed(out, vision_mask, self.o_proj, self.moe_o_proj), weights


class EVEDecoderLayer(nn.Module):
    """``h = x + O_m(Attn(QKV_m(LN1_m(x)))); y = h + MLP_m(LN2_m(h))``, m = token modality."""

    def __init__(self, config: EVEQwen2Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = EVEAttention(config, layer_idx)
        self.mlp = EVEMLP(config)
        self.input_layernorm = EVERMSNorm(h, eps)
        self.post_attention_layernorm = EVERMSNorm(h, eps)
        norms = config.decoupled("layernorm")
        self.moe_input_layernorm = EVERMSNorm(h, eps) if norms else None
        self.moe_post_attention_layernorm = EVERMSNorm(h, eps) if norms else None
        self.moe_mlp = EVEMLP(config) if config.decoupled("mlp") else None

    def forward(self, x, rotary, masks, cache, vision_mask, output_attentions=False):
        """``(hidden states, attention weights or None)``."""
        ln = routed(x, vision_mask, self.input_layernorm, self.moe_input_layernorm)
        attn, weights = self.self_attn(ln, rotary, masks, cache, vision_mask, output_attentions)
        x = x + attn
        ln = routed(x, vision_mask, self.post_attention_layernorm, self.moe_post_attention_layernorm)
        return x + routed(ln, vision_mask, self.mlp, self.moe_mlp), weights


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
        """``[3, H, W]`` images -> their ``1 + h'(w'+1)`` tokens each, ``[sum N, hidden]``."""
        dtype = self.class_embedding.dtype
        out = [self.class_embedding.new_zeros(0, self.class_embedding.numel())]
        for image in images:
            f = self.patch_embedding(image.to(dtype)[None])[0]  # [hidden, h', w']
            split = self.split_embedding[:, None, None].expand(-1, f.shape[1], 1)
            rows = torch.cat([f, split], dim=2).flatten(1).t()
            out += [self.class_embedding[None], rows]
        return torch.cat(out)
