"""Module specs of the EVE layer for the two backends: ``local`` and ``transformer_engine``."""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from eve_megatron.models.eve.attention import RoutedSelfAttention, RoutedSelfAttentionSubmodules
from eve_megatron.models.eve.config import EVEConfig
from eve_megatron.models.eve.core_attention import (
    FlashAttnCoreAttention,
    SDPACoreAttention,
    TorchVarlenCoreAttention,
    te_core_attention_class,
)
from eve_megatron.models.eve.flex_attention import FlexCoreAttention
from eve_megatron.models.eve.layer import EVELayerSubmodules, EVETransformerLayer


def backend_modules(config: EVEConfig):
    """``(norm, column_linear, row_linear)`` classes of the configured backend."""
    if config.transformer_impl == "local":
        from eve_megatron.models.eve.linear import (
            BranchColumnParallelLinear,
            BranchRowParallelLinear,
        )
        from eve_megatron.models.eve.norm import RMSNorm

        return RMSNorm, BranchColumnParallelLinear, BranchRowParallelLinear
    from eve_megatron.models.eve import te_backend

    return (te_backend.TENorm, te_backend.TEBranchColumnParallelLinear,
            te_backend.TEBranchRowParallelLinear)


def core_attention_module(config: EVEConfig):
    """The core attention class for ``config.attention_impl``."""
    impl = config.attention_impl
    if impl == "te":
        return te_core_attention_class()
    return {"sdpa": SDPACoreAttention, "flex": FlexCoreAttention,
            "torch_varlen": TorchVarlenCoreAttention, "flash_attn": FlashAttnCoreAttention}[impl]


def get_eve_layer_spec(config: EVEConfig) -> ModuleSpec:
    """Spec of one :class:`EVETransformerLayer` for the configured backend."""
    norm, column, row = backend_modules(config)
    attention = ModuleSpec(
        module=RoutedSelfAttention,
        submodules=RoutedSelfAttentionSubmodules(
            linear_qkv=column, core_attention=core_attention_module(config), linear_proj=row),
    )
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row))
    return ModuleSpec(
        module=EVETransformerLayer,
        submodules=EVELayerSubmodules(input_layernorm=norm, self_attention=attention,
                                      pre_mlp_layernorm=norm, mlp=mlp),
    )


def get_eve_block_spec(config: EVEConfig, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: its layers and the final norm."""
    layer = get_eve_layer_spec(config)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    norm = backend_modules(config)[0]
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)
