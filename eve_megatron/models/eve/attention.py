"""Self-attention with per-modality q/k/v and output projections around one joint attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import divide
from torch import Tensor

from eve_megatron.models.eve.rope import apply_rotary
from eve_megatron.models.eve.routing import (
    EVEPackedSeqParams,
    Split,
    apply_branches,
    from_order,
    to_order,
)


@dataclass
class RoutedSelfAttentionSubmodules:
    """Classes (or specs) of the projections and of the core attention."""

    linear_qkv: Union[ModuleSpec, type, None] = None
    core_attention: Union[ModuleSpec, type, None] = None
    linear_proj: Union[ModuleSpec, type, None] = None


class RoutedSelfAttention(MegatronModule):
    """GQA self-attention whose projections are chosen per token (text or vision).

    Input is the full sequence's rows, already replicated on the tensor-parallel group;
    the output is this rank's partial sums: the layer reduces them. Only the core
    attention sees sequence order.
    """

    def __init__(self, config, submodules: RoutedSelfAttentionSubmodules, layer_number: int,
                 routed: bool, tp_group: Optional[torch.distributed.ProcessGroup] = None):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.hn = config.kv_channels
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.hn
        proj_in = config.num_attention_heads * self.hn

        def qkv():
            return build_module(
                submodules.linear_qkv, config.hidden_size, qkv_size, config=config,
                init_method=config.init_method, gather_output=False,
                bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False,
                is_expert=False, tp_comm_buffer_name="qkv", tp_group=tp_group)

        def proj():
            return build_module(
                submodules.linear_proj, proj_in, config.hidden_size, config=config,
                init_method=config.output_layer_init_method, bias=config.add_bias_linear,
                input_is_parallel=True, skip_bias_add=True, is_expert=False,
                tp_comm_buffer_name="proj", tp_group=tp_group)

        self.linear_qkv = qkv()
        self.vision_linear_qkv = qkv() if routed else None
        self.core_attention = build_module(submodules.core_attention, config=config,
                                           layer_number=layer_number)
        self.linear_proj = proj()
        self.vision_linear_proj = proj() if routed else None

    def forward(self, x: Union[Split, Tensor], params: EVEPackedSeqParams):
        """Rows of the full sequence (replicated on the TP group) -> this rank's partial sums.

        Routed models pass a :class:`Split` in branch order and get one back; with
        decoupling='none' both are ``[T, h]`` tensors in sequence order.
        """
        s, b = params.seq_length, params.batch_size
        pad = params.branch_pad_multiple
        if params.routed:
            qkv = apply_branches(x, self.linear_qkv, self.vision_linear_qkv, pad)
            qkv = to_order(qkv, params.seq_from_br, params.br_from_seq)  # sequence order
        else:
            qkv = self.linear_qkv(x)[0]
        per_group = self.heads // self.groups
        qkv = qkv.view(s, b, self.groups, (per_group + 2) * self.hn)
        q, k, v = torch.split(qkv, [per_group * self.hn, self.hn, self.hn], dim=-1)
        q = q.reshape(s, b, self.heads, self.hn)
        q = apply_rotary(q, params.cos, params.sin)
        k = apply_rotary(k, params.cos, params.sin)
        context = self.core_attention(q, k, v.contiguous(), packed_seq_params=params)
        context = context.view(s * b, -1)
        if not params.routed:
            return self.linear_proj(context)[0]
        context = from_order(context, params.br_from_seq, params.seq_from_br, params.n_text)
        return apply_branches(context, self.linear_proj, self.vision_linear_proj, pad)
