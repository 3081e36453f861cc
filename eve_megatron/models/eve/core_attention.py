"""Core attention backends: joint causal GQA attention over packed samples.

All take ``q`` ``[s, b, np, hn]``, ``k``/``v`` ``[s, b, ng, hn]`` (this rank's heads) and
the batch's :class:`EVEPackedSeqParams`, and return ``[s, b, np * hn]``. Attention never
crosses a packed-sample boundary and is causal inside each sample.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from eve_megatron.models.eve.routing import EVEPackedSeqParams


class SDPACoreAttention(MegatronModule):
    """torch ``scaled_dot_product_attention`` with a block-diagonal causal mask (CPU, fallback)."""

    def __init__(self, config, layer_number: int = 1, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                packed_seq_params: EVEPackedSeqParams) -> Tensor:
        s, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = block_causal_mask(packed_seq_params)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


def block_causal_mask(params: EVEPackedSeqParams) -> Optional[Tensor]:
    """``[b, 1, s, s]`` bool mask (True = may attend), or None when rows are single samples."""
    if params.segment_ids is None:
        return None
    seg = params.segment_ids
    s = seg.shape[1]
    same = seg.unsqueeze(2) == seg.unsqueeze(1)  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril_()
    return (same & causal).unsqueeze(1)


def _to_thd(t: Tensor) -> Tensor:
    s, b = t.shape[:2]
    return t.transpose(0, 1).reshape(b * s, *t.shape[2:])


def _from_thd(t: Tensor, s: int, b: int) -> Tensor:
    return t.reshape(b, s, -1).transpose(0, 1).contiguous()


class FlashAttnCoreAttention(MegatronModule):
    """flash-attn ``flash_attn_varlen_func`` over the flattened ``b*s`` stream (GPU)."""

    def __init__(self, config, layer_number: int = 1, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError as exc:
            raise ImportError("core_attention_impl='flash_attn' needs the flash-attn package "
                              "(pip install flash-attn) and a CUDA GPU") from exc
        self._varlen = flash_attn_varlen_func
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                packed_seq_params: EVEPackedSeqParams) -> Tensor:
        s, b = query.shape[:2]
        p = packed_seq_params
        out = self._varlen(
            _to_thd(query), _to_thd(key), _to_thd(value), p.cu_seqlens_q, p.cu_seqlens_kv,
            p.max_seqlen_q, p.max_seqlen_kv, dropout_p=self.dropout if self.training else 0.0,
            softmax_scale=self.scale, causal=True,
        )
        return _from_thd(out, s, b)


def te_core_attention_class():
    """Megatron's ``TEDotProductAttention`` adapted to our ``[s, b, ...]`` calling convention."""
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    if not HAVE_TE:
        raise ImportError("core_attention_impl='te' needs Transformer Engine "
                          "(pip install transformer-engine[pytorch]) and a CUDA GPU")

    class TECoreAttention(TEDotProductAttention):
        """TE fused attention in ``thd`` format with ``padding_causal`` masking."""

        def __init__(self, config, layer_number: int = 1, **kwargs):
            super().__init__(config=config, layer_number=layer_number,
                             attn_mask_type=AttnMaskType.padding_causal, attention_type="self",
                             **kwargs)

        def forward(self, query, key, value, packed_seq_params):  # noqa: D102
            s, b = query.shape[:2]
            out = super().forward(_to_thd(query), _to_thd(key), _to_thd(value), None,
                                  AttnMaskType.padding_causal,
                                  packed_seq_params=packed_seq_params)
            return _from_thd(out, s, b)

    return TECoreAttention
