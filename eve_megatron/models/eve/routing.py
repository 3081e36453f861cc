"""Per-micro-batch metadata shared by every layer: packed-attention bounds and modality routing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


@dataclass
class EVEPackedSeqParams(PackedSeqParams):
    """Megatron's ``PackedSeqParams`` plus which branch every token takes.

    Token indices are into the flattened ``[s * b]`` (sequence-major) order of a
    ``[s, b, h]`` activation; ``local_*`` indices are into this rank's sequence-parallel
    shard (equal to the full ones without sequence parallelism).
    """

    batch_size: int = 0
    seq_length: int = 0
    text_index: Optional[Tensor] = None
    vision_index: Optional[Tensor] = None
    local_text_index: Optional[Tensor] = None
    local_vision_index: Optional[Tensor] = None
    segment_ids: Optional[Tensor] = None
    """[b, s] int: which packed sample each token belongs to (None: one sample per row)."""
    cos: Optional[Tensor] = None
    """[s, b, 1, d] rotary cosines for this batch's position ids (fp32)."""
    sin: Optional[Tensor] = None
    branch_pad_multiple: int = 1
    """Pad each branch's token count to this multiple (16 for FP8 GEMMs)."""


def build_packed_seq_params(
    is_vision: Tensor,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    sequence_parallel_rank: int = 0,
    sequence_parallel_size: int = 1,
    branch_pad_multiple: int = 1,
) -> EVEPackedSeqParams:
    """Routing and packing metadata from the batch's ``is_vision`` ``[b, s]`` and ``cu_seqlens``."""
    b, s = is_vision.shape
    if s % sequence_parallel_size:
        raise ValueError(f"seq_length {s} must divide by the TP size {sequence_parallel_size} "
                         "under sequence parallelism")
    vision_sb = is_vision.t().contiguous()  # [s, b]
    text_index, vision_index = _split_indices(vision_sb.reshape(-1))
    if sequence_parallel_size > 1:
        chunk = s // sequence_parallel_size
        local = vision_sb[sequence_parallel_rank * chunk:(sequence_parallel_rank + 1) * chunk]
        local_text, local_vision = _split_indices(local.reshape(-1))
    else:
        local_text, local_vision = text_index, vision_index

    segment_ids = None
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=is_vision.device)
        max_seqlen = s
    else:
        cu_seqlens = cu_seqlens.to(device=is_vision.device, dtype=torch.int32)
        _check_cu_seqlens(cu_seqlens, b, s)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if len(cu_seqlens) - 1 > b:
            segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, b, s)
    return EVEPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
        batch_size=b, seq_length=s, text_index=text_index, vision_index=vision_index,
        local_text_index=local_text, local_vision_index=local_vision, segment_ids=segment_ids,
        branch_pad_multiple=branch_pad_multiple,
    )


def segment_ids_from_cu_seqlens(cu_seqlens: Tensor, b: int, s: int) -> Tensor:
    """``[b, s]`` ids of the packed segment each token is in (global over the batch)."""
    starts = torch.zeros(b * s, dtype=torch.int64, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    return starts.cumsum(0).view(b, s)


def _check_cu_seqlens(cu_seqlens: Tensor, b: int, s: int) -> None:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != b * s:
        raise ValueError(f"cu_seqlens must start at 0 and end at b*s={b * s}, got "
                         f"{bounds[0]}..{bounds[-1]}")
    if any(y <= x for x, y in zip(bounds, bounds[1:])):
        raise ValueError("cu_seqlens must be strictly increasing")
    missing = set(range(0, b * s, s)) - set(bounds)
    if missing:
        raise ValueError(f"a packed segment crosses a row boundary (row starts {sorted(missing)} "
                         "are not in cu_seqlens)")


def _split_indices(is_vision_flat: Tensor):
    vision = torch.nonzero(is_vision_flat).squeeze(1)
    text = torch.nonzero(~is_vision_flat).squeeze(1)
    return text, vision


def route(
    x: Tensor,
    text_fn: Callable,
    vision_fn: Optional[Callable],
    text_index: Tensor,
    vision_index: Tensor,
    pad_multiple: int = 1,
) -> Tensor:
    """Run ``text_fn`` on the text tokens of ``x`` and ``vision_fn`` on its vision tokens.

    ``x`` is ``[..., h]`` with tokens in the order the indices refer to; returns
    ``[..., o]``. Each token goes through exactly one branch. With ``vision_fn=None`` the
    text branch serves every token. A branch without tokens still runs (on an empty
    tensor) and stays in the autograd graph, so its parameters always get a gradient.
    """
    if vision_fn is None:
        return _call(text_fn, x)
    lead, h = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, h)
    n_text, n_vision = text_index.numel(), vision_index.numel()
    if n_vision == 0 or n_text == 0:
        full_fn, empty_fn = (text_fn, vision_fn) if n_vision == 0 else (vision_fn, text_fn)
        out = _call_padded(full_fn, flat, pad_multiple)
        out.index_copy_(0, vision_index if n_vision == 0 else text_index,
                        _call_padded(empty_fn, flat[:0], pad_multiple))
        return out.view(*lead, out.shape[-1])
    out_text = _call_padded(text_fn, flat.index_select(0, text_index), pad_multiple)
    out_vision = _call_padded(vision_fn, flat.index_select(0, vision_index), pad_multiple)
    out = flat.new_empty(flat.shape[0], out_text.shape[-1], dtype=out_text.dtype)
    out.index_copy_(0, text_index, out_text)
    out.index_copy_(0, vision_index, out_vision)
    return out.view(*lead, out.shape[-1])


def _call(fn: Callable, x: Tensor) -> Tensor:
    out = fn(x)
    return out[0] if isinstance(out, tuple) else out


def _call_padded(fn: Callable, x: Tensor, multiple: int) -> Tensor:
    n = x.shape[0]
    pad = (-n) % multiple if n else multiple if multiple > 1 else 0
    if pad == 0:
        return _call(fn, x)
    return _call(fn, F.pad(x, (0, 0, 0, pad)))[:n]
