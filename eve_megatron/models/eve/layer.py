"""The EVE decoder layer: per-modality norms, projections and MLP around one joint attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank
from torch import Tensor

from eve_megatron.models.eve.routing import (
    EVEPackedSeqParams,
    Split,
    apply_branches,
    from_order,
    to_order,
)
from eve_megatron.models.eve.weights import has_vision_twin


@dataclass
class EVELayerSubmodules:
    """Classes (or specs) of one EVE layer; vision twins are built from the same specs."""

    input_layernorm: Union[ModuleSpec, type, None] = None
    self_attention: Union[ModuleSpec, type, None] = None
    pre_mlp_layernorm: Union[ModuleSpec, type, None] = None
    mlp: Union[ModuleSpec, type, None] = None


class EVETransformerLayer(MegatronModule, BaseTransformerLayer):
    """Pre-norm layer ``h = x + O_m(Attn(QKV_m(LN1_m(x)))); y = h + MLP_m(LN2_m(h))``.

    ``m`` is each token's modality. Which parts have a vision twin depends on
    ``config.decoupling``: none, the MLP only, or all (norms, q/k/v, output projection,
    MLP). Tensor/sequence-parallel communication happens here, once per sub-block for
    both branches; the branch modules themselves never communicate.
    """

    def __init__(self, config, submodules: EVELayerSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None,
                 vp_stage: Optional[int] = None):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp))
        self.hidden_dropout = config.hidden_dropout if hidden_dropout is None else hidden_dropout
        def twin(part: str) -> bool:
            return has_vision_twin(config.decoupling, part)

        def norm(spec):
            return build_module(spec, config=config, hidden_size=config.hidden_size,
                                eps=config.layernorm_epsilon)

        def mlp():
            return build_module(submodules.mlp, config=config,
                                ffn_hidden_size=config.ffn_hidden_size, tp_group=self.tp_group)

        self.input_layernorm = norm(submodules.input_layernorm)
        self.vision_input_layernorm = (
            norm(submodules.input_layernorm) if twin("input_layernorm") else None)
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=self.layer_number,
            routed=twin("self_attention"), tp_group=self.tp_group)
        self.pre_mlp_layernorm = norm(submodules.pre_mlp_layernorm)
        self.vision_pre_mlp_layernorm = (
            norm(submodules.pre_mlp_layernorm) if twin("pre_mlp_layernorm") else None)
        self.mlp = mlp()
        self.vision_mlp = mlp() if twin("mlp") else None

    def forward(self, hidden_states: Tensor, attention_mask=None, context=None,
                context_mask=None, rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        """``[s(/tp), b, h]`` in branch order -> same; returns ``(hidden_states, context)``.

        Inside the layer a routed model holds activations as a :class:`Split` (text rows,
        vision rows) and joins them once, at the end.
        """
        params: EVEPackedSeqParams = packed_seq_params
        if not isinstance(params, EVEPackedSeqParams):
            raise TypeError("EVETransformerLayer needs the batch's EVEPackedSeqParams")
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T_local, h]
        if params.routed:
            x = Split.of(x, params.local_n_text)
        pad = params.branch_pad_multiple

        ln = _branches(x, self.input_layernorm, self.vision_input_layernorm)
        attn = self.self_attention(self._enter_tp(ln, params), params)
        x = x + self._dropout(self._exit_tp(attn, params))

        ln = _branches(x, self.pre_mlp_layernorm, self.vision_pre_mlp_layernorm)
        out = _branches(self._enter_tp(ln, params), self.mlp, self.vision_mlp, pad)
        x = x + self._dropout(self._exit_tp(out, params))
        if params.routed:
            x = x.join()
        return x.view(shape), context

    def _enter_tp(self, x, params: EVEPackedSeqParams):
        """This rank's rows -> all rows (global branch order), replicated on the TP group."""
        if self.config.tensor_model_parallel_size == 1:
            return x
        if not self.config.sequence_parallel:
            return _per_part(x, lambda t: tensor_parallel.copy_to_tensor_model_parallel_region(
                t, group=self.tp_group))
        routed = isinstance(x, Split)
        full = tensor_parallel.gather_from_sequence_parallel_region(
            x.join() if routed else x, tensor_parallel_output_grad=True, group=self.tp_group)
        if not routed:
            return full
        return from_order(full, params.br_from_loc, params.loc_from_br, params.n_text)

    def _exit_tp(self, x, params: EVEPackedSeqParams):
        """Partial sums of the TP ranks -> the reduced rows of this rank."""
        if self.config.tensor_model_parallel_size == 1:
            return x
        if not self.config.sequence_parallel:
            return _per_part(x, lambda t: tensor_parallel.reduce_from_tensor_model_parallel_region(
                t, group=self.tp_group))
        if not isinstance(x, Split):
            return tensor_parallel.reduce_scatter_to_sequence_parallel_region(
                x, group=self.tp_group)
        local = tensor_parallel.reduce_scatter_to_sequence_parallel_region(
            to_order(x, params.loc_from_br, params.br_from_loc), group=self.tp_group)
        return Split.of(local, params.local_n_text)

    def _dropout(self, x):
        if self.hidden_dropout == 0.0:
            return x
        return _per_part(x, lambda t: F.dropout(t, p=self.hidden_dropout, training=self.training))


def _per_part(x, fn):
    return Split(fn(x.text), fn(x.vision)) if isinstance(x, Split) else fn(x)


def _branches(x, text_fn, vision_fn, pad_multiple: int = 1):
    """Per-branch modules on a :class:`Split`; the text module alone on a plain tensor."""
    if isinstance(x, Split):
        return apply_branches(x, text_fn, vision_fn, pad_multiple)
    out = text_fn(x)
    return out[0] if isinstance(out, tuple) else out
