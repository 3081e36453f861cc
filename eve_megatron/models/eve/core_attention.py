"""Core attention backends: joint causal GQA attention over packed samples.

All take ``q`` ``[s, b, np, hn]``, ``k``/``v`` ``[s, b, ng, hn]`` (this rank's heads) and
the batch's :class:`EVEPackedSeqParams`, and return ``[s, b, np * hn]``. Attention never
crosses a packed-sample boundary and is causal inside each sample.

Backends (``EVEConfig.core_attention_impl``; the trainer's ``--attention-backend``):
``sdpa`` (torch SDPA: a block-diagonal mask on CPU, one causal call per sample on GPU),
``flex`` (FlexAttention, ``flex_attention.py``), ``torch_varlen`` (torch's varlen flash
kernel, GPU), ``flash_attn`` (flash-attn varlen, GPU), ``te`` (Transformer Engine fused
attention, thd), ``auto`` (:func:`resolve_attention_backend`). Only ``sdpa`` on CPU builds an
``[s, s]`` mask.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from eve_megatron.models.eve.routing import EVEPackedSeqParams


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "torch_varlen", "flash_attn", "te")
_INSTALL = {
    "te": "Transformer Engine and a CUDA GPU (pip install transformer-engine[pytorch]) with "
          "--transformer-impl transformer_engine",
    "flash_attn": "the flash-attn package and a CUDA GPU (pip install flash-attn)",
    "torch_varlen": "a CUDA GPU and torch >= 2.10 (torch.nn.attention.varlen)",
    "flex": "torch >= 2.5 (torch.nn.attention.flex_attention)",
}


def backend_available(name: str, transformer_impl: str = "local") -> bool:
    """Whether backend ``name`` can run here (package importable, CUDA where it needs it)."""
    cuda = torch.cuda.is_available()
    if name == "sdpa":
        return True
    if name == "flex":
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    if name == "torch_varlen":
        return cuda and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if name == "flash_attn":
        return cuda and importlib.util.find_spec("flash_attn") is not None
    if name == "te":
        return (cuda and transformer_impl == "transformer_engine"
                and importlib.util.find_spec("transformer_engine") is not None)
    raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")


def resolve_attention_backend(requested: str, transformer_impl: str = "local") -> str:
    """The backend that runs: ``auto`` is te (TE layers on CUDA), else flash_attn, else
    torch_varlen on CUDA, else flex; sdpa on CPU. A named backend that cannot run here is an
    error saying what it needs."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return "sdpa"
        for name in ("te", "flash_attn", "torch_varlen", "flex"):
            if backend_available(name, transformer_impl):
                return name
        return "sdpa"
    if not backend_available(requested, transformer_impl):
        raise RuntimeError(f"attention backend {requested!r} needs {_INSTALL[requested]}")
    return requested


class SDPACoreAttention(MegatronModule):
    """torch ``scaled_dot_product_attention``: one call with a block-diagonal causal mask on
    CPU; on GPU one causal call per packed sample (no ``[s, s]`` mask), a fallback."""

    def __init__(self, config, layer_number: int = 1, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                packed_seq_params: EVEPackedSeqParams) -> Tensor:
        s, b, np_, hn = query.shape
        if query.is_cuda and packed_seq_params.segment_ids is not None:
            return self._per_sample(query, key, value, packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = block_causal_mask(packed_seq_params)
        out = self._sdpa(q, k, v, mask)
        return out.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)

    def _sdpa(self, q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1])

    def _per_sample(self, query, key, value, params: EVEPackedSeqParams) -> Tensor:
        s, b = query.shape[:2]
        q, k, v = (_to_thd(t).transpose(0, 1) for t in (query, key, value))  # [heads, b*s, hn]
        bounds = params.cu_seqlens_q.tolist()
        out = torch.cat([self._sdpa(q[None, :, x:y], k[None, :, x:y], v[None, :, x:y], None)[0]
                         for x, y in zip(bounds, bounds[1:])], dim=1)
        return _from_thd(out.transpose(0, 1), s, b)


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
            raise ImportError(f"attention backend 'flash_attn' needs {_INSTALL['flash_attn']}") from exc
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


class TorchVarlenCoreAttention(MegatronModule):
    """torch's own ``varlen_attn`` (flash kernel, CUDA) over the flattened ``b*s`` stream.

    Written against both of its signatures: ``is_causal`` (torch 2.10/2.11) or
    ``window_size=(-1, 0)`` (later), native GQA and ``scale`` where the release has them.
    """

    def __init__(self, config, layer_number: int = 1, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, **kwargs):
        super().__init__(config=config)
        if not backend_available("torch_varlen"):
            raise RuntimeError(f"attention backend 'torch_varlen' needs {_INSTALL['torch_varlen']}")
        from torch.nn.attention.varlen import varlen_attn

        if config.attention_dropout if attention_dropout is None else attention_dropout:
            raise ValueError("torch_varlen has no attention dropout: use flash_attn or te")
        self._varlen = varlen_attn
        names = inspect.signature(varlen_attn).parameters
        self._causal = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
        self._gqa, self._has_scale = "enable_gqa" in names, "scale" in names
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                packed_seq_params: EVEPackedSeqParams) -> Tensor:
        s, b, np_, hn = query.shape
        p = packed_seq_params
        q, k, v = _to_thd(query), _to_thd(key), _to_thd(value)  # [b*s, heads, hn]
        kwargs = dict(self._causal)
        if self._gqa:
            kwargs["enable_gqa"] = k.shape[1] != q.shape[1]
        elif k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(np_ // k.shape[1], dim=1) for t in (k, v))
        if self._has_scale:
            kwargs["scale"] = self.scale
        elif not math.isclose(self.scale, hn ** -0.5):
            q = q * (self.scale * math.sqrt(hn))
        out = self._varlen(q, k, v, p.cu_seqlens_q, p.cu_seqlens_kv, p.max_seqlen_q,
                           p.max_seqlen_kv, **kwargs)
        return _from_thd(out, s, b)


def te_core_attention_class():
    """Megatron's ``TEDotProductAttention`` adapted to our ``[s, b, ...]`` calling convention."""
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    if not HAVE_TE:
        raise ImportError(f"attention backend 'te' needs {_INSTALL['te']}")

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
