"""FlexAttention over packed rows, with a document-causal ``BlockMask`` built from the
segment layout of the micro-batch (never from an ``[s, s]`` mask).

The mask is built once per micro-batch (:meth:`EVEModel.packed_seq_params`, on every
pipeline stage from its own batch) and shared by every layer. Block ``(i, j)`` (query
block ``i``, key block ``j``, ``FLEX_BLOCK`` tokens each) is skipped when ``j > i`` or when
no segment spans both; it is *full* (no per-token mask) when ``j < i`` and both blocks lie
inside one segment; otherwise the per-token rule ``same segment and kv <= q`` applies.
Segment ids never decrease along a row, so all of this follows from each block's smallest
and largest segment id: ``O((s / FLEX_BLOCK)^2)`` work per row.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

FLEX_BLOCK = 128
"""Tokens per side of a FlexAttention block (its kernels' default)."""

_COMPILED = None


def _flex_attention():
    """``flex_attention``: compiled on CUDA (the fused kernel), eager elsewhere (reference math)."""
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


@contextlib.contextmanager
def _cpu_gradients_allowed():
    """torch's ``flex_attention`` refuses CPU inputs that need gradients although its eager
    (dense reference) path computes them; lift that guard for our call only. Tested against
    sdpa, forward and every gradient (``tests/unit/test_attention_backends.py``)."""
    import torch.nn.attention.flex_attention as module

    guard = getattr(module, "_validate_device", None)
    if guard is None:
        yield
        return
    module._validate_device = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module._validate_device = guard


def _block_indices(blocks: Tensor):
    """``([b, 1, n] counts, [b, 1, n, n] indices)`` of the true entries of ``[b, n, n]``, in order."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None].contiguous(), order[:, None].contiguous()


def document_block_mask(segment_ids: Optional[Tensor], batch: int, seq: int, device,
                        block: int = FLEX_BLOCK):
    """The document-causal ``BlockMask`` of ``[b, s]`` segment ids (None: one sample per row)."""
    from torch.nn.attention.flex_attention import BlockMask

    if segment_ids is None:
        segment_ids = torch.zeros(batch, seq, dtype=torch.int64, device=device)
    n = math.ceil(seq / block)
    seg = segment_ids.to(device=device, dtype=torch.int64)
    seg = torch.cat([seg, seg[:, -1:].expand(batch, n * block - seq)], dim=1)  # [b, n * block]
    per_block = seg.view(batch, n, block)
    lo, hi = per_block.min(-1).values, per_block.max(-1).values  # [b, n]
    q_blk = torch.arange(n, device=device)[:, None]
    kv_blk = torch.arange(n, device=device)[None, :]
    touching = (kv_blk <= q_blk) & (hi[:, None, :] >= lo[:, :, None])  # [b, q block, kv block]
    full = (kv_blk < q_blk) & (lo[:, None, :] == hi[:, :, None])
    partial = touching & ~full

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    partial_num, partial_idx = _block_indices(partial)
    full_num, full_idx = _block_indices(full)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx,
                                    BLOCK_SIZE=block, mask_mod=document_causal,
                                    seq_lengths=(seq, seq))


class FlexCoreAttention(MegatronModule):
    """``flex_attention`` with the micro-batch's document-causal block mask; GQA native."""

    def __init__(self, config, layer_number: int = 1, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("the flex attention backend has no attention dropout: "
                             "use --attention-backend sdpa, flash_attn or te")
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, packed_seq_params) -> Tensor:
        s, b, np_, hn = query.shape
        mask = packed_seq_params.flex_block_mask
        if mask is None:
            raise ValueError("the flex backend needs the micro-batch's block mask "
                             "(EVEModel.packed_seq_params builds it)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        cpu = contextlib.nullcontext() if q.is_cuda else _cpu_gradients_allowed()
        with warnings.catch_warnings(), cpu:  # eager flex on CPU warns that it is unfused
            warnings.simplefilter("ignore", UserWarning)
            out = _flex_attention()(q, k, v, block_mask=mask, scale=self.scale,
                                    enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)
