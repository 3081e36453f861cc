"""1-D rotary position embedding (Qwen2/Megatron non-interleaved layout) for per-token positions."""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(position_ids: Tensor, dim: int, base: float):
    """cos and sin ``[s, b, 1, dim]`` (fp32) for ``position_ids`` ``[b, s]``.

    Computed once per micro-batch and shared by every layer.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / dim))
    freqs = position_ids.t().float().unsqueeze(-1) * inv_freq  # [s, b, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [s, b, 1, dim]
    return emb.cos(), emb.sin()


def apply_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``t`` ``[s, b, heads, dim]`` by the given angles (rotate-half convention)."""
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    x1, x2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin
