"""Config presets, validation and parameter counts."""

import pytest

from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.flops import model_flops_per_token, parameter_counts


@pytest.mark.parametrize("decoupling", ["none", "mlp", "all"])
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_model(megatron_world, decoupling, tied):
    cfg = eve_config("tiny", decoupling=decoupling, share_embeddings_and_output_weights=tied)
    model = EVEModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_counts(cfg).total


def test_eve_7b_shape_and_size():
    cfg = eve_config("eve-7b-hd-v2.0", use_cpu_initialization=True)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size) == (
        3584, 28, 28, 4, 128, 18944, 152064)
    assert not cfg.share_embeddings_and_output_weights and cfg.rotary_base == 1e6
    eve = parameter_counts(cfg)
    dense = parameter_counts(eve_config("eve-7b-hd-v2.0", decoupling="none"))
    assert eve.active == dense.total  # same FLOPs per token as the base LLM
    assert 1.7 < eve.total / dense.total < 2.0  # "about 2x the base LLM"
    assert 7.6e9 < dense.total - dense.patch_embedding < 7.7e9  # Qwen2.5-7B
    assert model_flops_per_token(cfg, 4096) > 6 * 7e9


@pytest.mark.parametrize("bad,message", [
    (dict(decoupling="moe"), "decoupling must be one of"),
    (dict(tensor_model_parallel_size=2, vocab_size=511), "must divide by TP"),
    (dict(tensor_model_parallel_size=4), "num_query_groups 2 must divide by TP=4"),
    (dict(add_bias_linear=True), "add_bias_linear must be False"),
    (dict(normalization="LayerNorm"), "RMSNorm"),
    (dict(fp8="hybrid"), "fp8 needs transformer_impl"),
    (dict(core_attention_impl="te"), "needs transformer_impl='transformer_engine'"),
    (dict(transformer_impl="apex"), "transformer_impl must be one of"),
])
def test_invalid_combinations_fail_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        eve_config("tiny", **bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        eve_config("llama-70b")
