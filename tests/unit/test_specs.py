"""Backend selection: the local spec on CPU, TE and flash-attn imported lazily with clear errors."""

import importlib.util

import pytest
import torch

from eve_megatron.models.eve import eve_config
from eve_megatron.models.eve.core_attention import FlashAttnCoreAttention, SDPACoreAttention
from eve_megatron.models.eve.linear import BranchColumnParallelLinear, BranchRowParallelLinear
from eve_megatron.models.eve.norm import RMSNorm
from eve_megatron.models.eve.specs import core_attention_module, get_eve_layer_spec

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None


def test_local_spec_modules():
    spec = get_eve_layer_spec(eve_config("tiny"))
    sub = spec.submodules
    assert sub.input_layernorm is RMSNorm and sub.pre_mlp_layernorm is RMSNorm
    attn = sub.self_attention.submodules
    assert attn.linear_qkv is BranchColumnParallelLinear
    assert attn.linear_proj is BranchRowParallelLinear
    assert attn.core_attention is SDPACoreAttention
    assert sub.mlp.submodules.linear_fc1 is BranchColumnParallelLinear
    assert sub.mlp.submodules.linear_fc2 is BranchRowParallelLinear


def test_backends_selected_by_config():
    from eve_megatron.models.eve.flex_attention import FlexCoreAttention

    assert core_attention_module(eve_config("tiny", core_attention_impl="flex")) is FlexCoreAttention
    cfg = eve_config("tiny", core_attention_impl="flash_attn")
    if HAVE_FLASH and torch.cuda.is_available():
        assert core_attention_module(cfg) is FlashAttnCoreAttention
    else:
        with pytest.raises(RuntimeError, match="pip install flash-attn"):
            core_attention_module(cfg)


@pytest.mark.skipif(HAVE_FLASH, reason="flash-attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    with pytest.raises(ImportError, match="flash-attn"):
        FlashAttnCoreAttention(eve_config("tiny", core_attention_impl="flash_attn"))


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed")
def test_transformer_engine_missing_is_a_clear_error():
    cfg = eve_config("tiny", transformer_impl="transformer_engine")
    assert cfg.attention_impl == ("sdpa" if not torch.cuda.is_available() else cfg.attention_impl)
    with pytest.raises(ImportError, match="Transformer Engine"):
        get_eve_layer_spec(cfg)
    with pytest.raises(RuntimeError, match="transformer-engine"):
        eve_config("tiny", transformer_impl="transformer_engine", core_attention_impl="te").attention_impl


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine")
def test_transformer_engine_spec_modules():
    from eve_megatron.models.eve import te_backend

    spec = get_eve_layer_spec(eve_config("tiny", transformer_impl="transformer_engine"))
    attn = spec.submodules.self_attention.submodules
    assert spec.submodules.input_layernorm is te_backend.TENorm
    assert attn.linear_qkv is te_backend.TEBranchColumnParallelLinear
    assert attn.linear_proj is te_backend.TEBranchRowParallelLinear
    assert attn.core_attention.__name__ == "TECoreAttention"
