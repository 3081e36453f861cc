"""Per-micro-batch metadata shared by every layer: packed-attention bounds and modality layout.

Inside the decoder the residual stream is kept in *branch order*: on every rank, the
tokens of its sequence chunk (the whole sequence without sequence parallelism) with all
text tokens first, then all vision tokens, each in sequence order. Every per-token op
(norms, projections, MLP) then runs each branch on a contiguous slice (``split`` +
``cat``, no gathers), and only the attention core goes back to sequence order, through
row permutations whose backward is the inverse permutation (no atomics).

Index spaces of the flattened ``[s * b]`` (sequence-major) tokens:
``SEQ`` sequence order; ``BR`` global branch order (what the branch linears see after the
tensor-parallel gather); ``LOC`` the concatenation over sequence-parallel ranks of each
rank's chunk in branch order (what an all-gather of the stream yields; equals ``BR``
without sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is known: backward is a gather."""

    @staticmethod
    def forward(ctx, x, index, inverse):  # noqa: D102
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: Tensor, index: Optional[Tensor], inverse: Optional[Tensor]) -> Tensor:
    """``x[index]`` for ``[T, ...]`` rows and a permutation ``index`` (None = identity)."""
    if index is None:
        return x
    return _PermuteRows.apply(x, index, inverse)


def _inverse(index: Tensor) -> Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


@dataclass
class EVEPackedSeqParams(PackedSeqParams):
    """Megatron's ``PackedSeqParams`` plus the modality layout of the micro-batch."""

    batch_size: int = 0
    seq_length: int = 0
    routed: bool = False
    """False for decoupling='none': the stream stays in sequence order."""
    n_text: int = 0
    n_vision: int = 0
    local_n_text: int = 0
    local_n_vision: int = 0
    br_from_seq: Optional[Tensor] = None
    """x_BR = x_SEQ[br_from_seq] (and the inverse: x_SEQ = x_BR[seq_from_br])."""
    seq_from_br: Optional[Tensor] = None
    local_from_seq: Optional[Tensor] = None
    """This rank's chunk: x_branch_order = x_seq_order[local_from_seq] (chunk-local indices)."""
    seq_from_local: Optional[Tensor] = None
    br_from_loc: Optional[Tensor] = None
    """Sequence parallelism only: x_BR = x_LOC[br_from_loc] (and ``loc_from_br``)."""
    loc_from_br: Optional[Tensor] = None
    segment_ids: Optional[Tensor] = None
    """[b, s] id of the packed sample of each token (None: one sample per row)."""
    cos: Optional[Tensor] = None
    """[s, b, 1, d] rotary cosines for this batch's position ids (fp32)."""
    sin: Optional[Tensor] = None
    branch_pad_multiple: int = 1
    """Pad each branch's token count to this multiple (16 for TE/FP8 GEMMs)."""
    flex_block_mask: Optional[object] = None
    """The document-causal FlexAttention ``BlockMask`` (flex backend only)."""


def build_packed_seq_params(
    is_vision: Tensor,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    sequence_parallel_rank: int = 0,
    sequence_parallel_size: int = 1,
    branch_pad_multiple: int = 1,
    routed: bool = True,
) -> EVEPackedSeqParams:
    """Layout and packing metadata from the batch's ``is_vision`` ``[b, s]`` and ``cu_seqlens``."""
    b, s = is_vision.shape
    if s % sequence_parallel_size:
        raise ValueError(f"seq_length {s} must divide by the TP size {sequence_parallel_size} "
                         "under sequence parallelism")
    params = EVEPackedSeqParams(batch_size=b, seq_length=s, routed=routed,
                                branch_pad_multiple=branch_pad_multiple)
    if routed:
        _set_layout(params, is_vision.t().reshape(-1), sequence_parallel_rank,
                    sequence_parallel_size)
    _set_packing(params, is_vision.device, cu_seqlens, max_seqlen)
    return params


def _set_layout(p: EVEPackedSeqParams, vis: Tensor, rank: int, size: int) -> None:
    chunk = vis.numel() // size
    p.br_from_seq = torch.argsort(vis.to(torch.int8), stable=True)
    p.seq_from_br = _inverse(p.br_from_seq)
    p.n_vision = int(vis.sum())
    p.n_text = vis.numel() - p.n_vision
    if size == 1:
        p.local_from_seq, p.seq_from_local = p.br_from_seq, p.seq_from_br
        p.local_n_text, p.local_n_vision = p.n_text, p.n_vision
        return
    owner = torch.arange(vis.numel(), device=vis.device) // chunk
    loc_from_seq = torch.argsort(owner * 2 + vis.long(), stable=True)  # LOC pos -> SEQ idx
    p.local_from_seq = loc_from_seq[rank * chunk:(rank + 1) * chunk] - rank * chunk
    p.seq_from_local = _inverse(p.local_from_seq)
    p.local_n_vision = int(vis[rank * chunk:(rank + 1) * chunk].sum())
    p.local_n_text = chunk - p.local_n_vision
    p.br_from_loc = _inverse(loc_from_seq)[p.br_from_seq]
    p.loc_from_br = _inverse(p.br_from_loc)


def _set_packing(p: EVEPackedSeqParams, device, cu_seqlens, max_seqlen) -> None:
    b, s = p.batch_size, p.seq_length
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device)
        max_seqlen = s
    else:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        _check_cu_seqlens(cu_seqlens, b, s)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if len(cu_seqlens) - 1 > b:
            p.segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, b, s)
    p.qkv_format = "thd"
    p.cu_seqlens_q = p.cu_seqlens_kv = cu_seqlens
    p.max_seqlen_q = p.max_seqlen_kv = max_seqlen


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


@dataclass
class Split:
    """The rows of one activation held per branch: text rows, then vision rows."""

    text: Tensor
    vision: Tensor

    @staticmethod
    def of(x: Tensor, n_text: int) -> "Split":
        """Views of the first ``n_text`` rows and of the rest."""
        text, vision = x.split([n_text, x.shape[0] - n_text])
        return Split(text, vision)

    def join(self) -> Tensor:
        """One tensor, text rows first."""
        return torch.cat([self.text, self.vision])

    def __add__(self, other: "Split") -> "Split":
        return Split(self.text + other.text, self.vision + other.vision)


def apply_branches(x: Split, text_fn: Callable, vision_fn: Optional[Callable],
                   pad_multiple: int = 1) -> Split:
    """Run ``text_fn`` on the text rows and ``vision_fn`` on the vision rows.

    With ``vision_fn=None`` the part is shared: ``text_fn`` runs once on all rows. A branch
    without tokens still runs (on an empty slice) and stays in the autograd graph, so its
    parameters always get a (zero) gradient and data-parallel buckets complete.
    """
    if vision_fn is None:
        return Split.of(_call(text_fn, x.join()), x.text.shape[0])
    return Split(_call_padded(text_fn, x.text, pad_multiple),
                 _call_padded(vision_fn, x.vision, pad_multiple))


def to_order(x: Split, index: Tensor, inverse: Tensor) -> Tensor:
    """Branch rows -> one tensor whose row ``k`` is row ``index[k]`` of ``x.join()``
    (``seq_from_br``: sequence order; ``loc_from_br``: the all-gathered order)."""
    return permute_rows(x.join(), index, inverse)


def from_order(x: Tensor, index: Tensor, inverse: Tensor, n_text: int) -> Split:
    """Inverse of :func:`to_order`: branch rows ``x[index]`` (``br_from_seq``, ``br_from_loc``)."""
    return Split.of(permute_rows(x, index, inverse), n_text)


def _call(fn: Callable, x: Tensor) -> Tensor:
    out = fn(x)
    return out[0] if isinstance(out, tuple) else out


def _call_padded(fn: Callable, x: Tensor, multiple: int) -> Tensor:
    n = x.shape[0]
    pad = (-n) % multiple if n else multiple if multiple > 1 else 0
    if pad == 0:
        return _call(fn, x)
    return _call(fn, F.pad(x, (0, 0, 0, pad)))[:n]
