"""The Megatron <-> HF name table, its fused-tensor helpers and the config translation."""

import pytest
import torch

from eve_megatron.hf import config_map
from eve_megatron.hf.configuration_eve_qwen2 import EVEQwen2Config
from eve_megatron.hf.mapping import (
    TABLE,
    find_rule,
    hf_names,
    hf_shapes,
    hf_to_megatron,
    megatron_name_of,
    megatron_to_hf,
)
from eve_megatron.hf.modeling_eve_qwen2 import EVEQwen2ForCausalLM
from eve_megatron.hf.shapes import heads_of
from eve_megatron.models.eve.weights import weight_shapes
from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.config import model_fields
from tests.reference_eve import RefShape, make_weights, to_megatron

VARIANTS = [(d, t) for d in ("none", "mlp", "all") for t in (False, True)]


def reference_hf(w, shape: RefShape):
    """The reference weights under the released HF names, written out independently."""
    out = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"],
           "model.vision_tower.patch_embedding.0.weight": w["conv1.w"],
           "model.vision_tower.patch_embedding.0.bias": w["conv1.b"],
           "model.vision_tower.patch_embedding.2.weight": w["conv2.w"],
           "model.vision_tower.patch_embedding.2.bias": w["conv2.b"],
           "model.vision_tower.class_embedding": w["cls"],
           "model.vision_tower.split_embedding": w["split"]}
    if not shape.tied:
        out["lm_head.weight"] = w["lm_head"]
    for i in range(shape.layers):
        for br, m in (("text", ""), ("vision", "moe_")):
            p, h = f"layers.{i}.{br}.", f"model.layers.{i}."
            if br == "text" or shape.decoupling == "all":
                out[f"{h}{m}input_layernorm.weight"] = w[p + "ln1"]
                out[f"{h}{m}post_attention_layernorm.weight"] = w[p + "ln2"]
                for x in "qkv":
                    out[f"{h}self_attn.{m}{x}_proj.weight"] = w[p + f"{x}.w"]
                    out[f"{h}self_attn.{m}{x}_proj.bias"] = w[p + f"{x}.b"]
                out[f"{h}self_attn.{m}o_proj.weight"] = w[p + "o.w"]
            if br == "text" or shape.decoupling != "none":
                for x in ("gate", "up", "down"):
                    out[f"{h}{m}mlp.{x}_proj.weight"] = w[p + x]
    return out


@pytest.mark.parametrize("decoupling,tied", VARIANTS)
def test_table_covers_megatron_and_hf_models_exactly(megatron_world, decoupling, tied):
    cfg = eve_config("tiny", decoupling=decoupling, share_embeddings_and_output_weights=tied)
    megatron = {n: tuple(p.shape) for n, p in EVEModel(cfg).named_parameters()}
    fields = model_fields(cfg)
    assert weight_shapes(fields) == megatron
    hf = EVEQwen2ForCausalLM(EVEQwen2Config(**config_map.hf_config(fields, "float32")))
    hf_params = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    mapped = {}
    for name, shape in megatron.items():
        mapped.update(hf_shapes(name, shape, heads_of(fields)))
    assert mapped == hf_params


@pytest.mark.parametrize("decoupling,tied", [("all", False), ("mlp", True), ("none", False)])
def test_fused_layouts_against_independent_reference(decoupling, tied):
    shape = RefShape(decoupling=decoupling, tied=tied)
    w = make_weights(shape, seed=5)
    hf, megatron = reference_hf(w, shape), to_megatron(w, shape)
    heads = heads_of(model_fields(eve_config("tiny", decoupling=decoupling,
                                             share_embeddings_and_output_weights=tied)))
    back = {}
    for name, tensor in megatron.items():
        assert torch.equal(hf_to_megatron(name, hf.__getitem__, heads), tensor), name
        back.update(megatron_to_hf(name, tensor, heads))
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_names_invert_and_moe_only_in_hf_names():
    for rule in TABLE:
        name = rule.megatron.replace("{i}", "7")
        assert "moe" not in name
        for part, hf in enumerate(hf_names(name)):
            assert megatron_name_of(hf) == (name, part)
    assert find_rule("decoder.layers.12.vision_mlp.linear_fc1.weight")[1] == 12
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        hf_names("decoder.layers.0.mlp.router.weight")
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts"):
        megatron_name_of("model.layers.0.mlp.experts.0.weight")


@pytest.mark.parametrize("decoupling,tied", VARIANTS)
def test_config_round_trip(decoupling, tied):
    fields = model_fields(eve_config("qwen2.5-7b", decoupling=decoupling,
                                     share_embeddings_and_output_weights=tied))
    cfg = config_map.hf_config(fields, "bfloat16", "/models/eve-7b", eos_token_id=7)
    assert cfg["architectures"] == ["EVEQwen2ForCausalLM"] and cfg["model_type"] == "eve-qwen2"
    assert cfg["mm_hidden_size"] == 1024 and cfg["rope_theta"] == 1e6
    assert cfg["add_moe"] == (decoupling != "none")
    assert cfg["mm_vision_tower"] == "/models/eve-7b"
    assert config_map.fields_from_hf(cfg) == fields


def test_qwen2_config_and_unsupported_inputs():
    from transformers import Qwen2Config

    qwen = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                       rope_theta=5e5, tie_word_embeddings=True).to_dict()
    fields = config_map.fields_from_hf(qwen, vision_hidden_size=32)
    assert fields["decoupling"] == "none" and fields["rotary_base"] == 5e5
    assert fields["share_embeddings_and_output_weights"] and fields["kv_channels"] == 16
    assert config_map.fields_from_hf(qwen, decoupling="all")["decoupling"] == "all"
    with pytest.raises(ValueError, match="moe_part"):
        config_map.decoupling_of({"add_moe": True, "moe_part": "self_attn"})
    with pytest.raises(ValueError, match="sliding"):
        config_map.fields_from_hf(dict(qwen, use_sliding_window=True))
    with pytest.raises(ValueError, match="model_type"):
        config_map.fields_from_hf(dict(qwen, model_type="llama"))
