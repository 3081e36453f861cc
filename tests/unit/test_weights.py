"""One source of truth for the architecture: the weights each variant has (models/eve/weights.py)
equal a real model's parameters and give the parameter counts; every architecture field is
recorded in checkpoints by construction; the image-token formula, the block size and the
conversion dtypes are each written once."""

import dataclasses

import pytest
import torch

from eve_megatron.hf.eve_image_rules import BLOCK, image_token_count
from eve_megatron.models.eve import EVEModel, eve_config
from eve_megatron.models.eve.config import (EVEConfig, INHERITED_ARCHITECTURE, MODEL_FIELDS,
                                            config_from_fields, model_fields)
from eve_megatron.models.eve.flops import parameter_counts
from eve_megatron.models.eve.patch_embedding import image_token_counts
from eve_megatron.models.eve.weights import VISION_TWINS, weight_shapes
from megatron.core.transformer.transformer_config import TransformerConfig

INHERITED_NOT_RECORDED = {
    "activation_func": "validated: always F.silu",
    "add_bias_linear": "validated: always False",
    "hidden_dropout": "training only", "attention_dropout": "training only",
    "calculate_per_token_loss": "how the loss is reduced, not the model",
}


@pytest.mark.parametrize("overrides", [dict(add_qkv_bias=False), dict(gated_linear_unit=False),
                                       dict(decoupling="mlp", kv_channels=24)])
def test_weight_table_is_the_model(megatron_world, overrides):
    cfg = eve_config("tiny", **overrides)
    model = {n: tuple(p.shape) for n, p in EVEModel(cfg).named_parameters()}
    assert weight_shapes(model_fields(cfg)) == model
    assert parameter_counts(cfg).total == sum(p.numel() for p in EVEModel(cfg).parameters())
    twins = {n for n in model if ".vision_" in f".{n}"}
    assert bool(twins) == bool(VISION_TWINS[cfg.decoupling])


def test_every_config_field_is_recorded_or_declared_runtime():
    inherited = {f.name for f in dataclasses.fields(TransformerConfig)}
    own = {f.name for f in dataclasses.fields(EVEConfig)}
    for name in [n for n in EVEConfig.__annotations__ if n in own]:  # ClassVars are not fields
        f = EVEConfig.__dataclass_fields__[name]
        if "architecture" in f.metadata:  # declared with _arch(...) or _runtime(...)
            assert (name in MODEL_FIELDS) == f.metadata["architecture"], name
        else:
            assert name in inherited, f"EVEConfig.{name}: declare it with _arch() or _runtime()"
            assert name in INHERITED_ARCHITECTURE or name in INHERITED_NOT_RECORDED, (
                f"EVEConfig overrides TransformerConfig.{name}: add it to "
                "INHERITED_ARCHITECTURE or say here why it is not recorded")


def test_recorded_fields_rebuild_the_same_model(megatron_world):
    changed = dict(num_layers=3, hidden_size=96, num_attention_heads=6, num_query_groups=3,
                   ffn_hidden_size=160, kv_channels=24, layernorm_epsilon=1e-5,
                   add_qkv_bias=False, gated_linear_unit=True, vocab_size=384,
                   max_sequence_length=2048, rotary_base=5e5,
                   share_embeddings_and_output_weights=True, decoupling="mlp",
                   vision_hidden_size=48, patch_stride=8, dense_stride=4)
    assert set(changed) | {"normalization"} == set(MODEL_FIELDS)  # every field is exercised
    cfg = eve_config("tiny", **changed)
    fields = model_fields(cfg)
    again = config_from_fields(fields)
    assert model_fields(again) == fields
    shapes = [{n: p.shape for n, p in EVEModel(c).named_parameters()} for c in (cfg, again)]
    assert shapes[0] == shapes[1] == {n: torch.Size(s) for n, s in weight_shapes(fields).items()}


def test_image_token_formula_and_block_are_written_once(megatron_world):
    grid = torch.tensor([[1, 1], [3, 5], [7, 2]])
    assert image_token_counts(grid).tolist() == [image_token_count(h, w) for h, w in grid.tolist()]
    assert eve_config("tiny").block_size == BLOCK
    from eve_megatron.data.indexed import StoredImage
    from eve_megatron.data.pixels import BLOCK_DIM

    assert StoredImage(b"", 3, 5, 0).num_tokens == image_token_count(3, 5) == 19
    assert BLOCK_DIM == 3 * BLOCK * BLOCK
    model = EVEModel(eve_config("tiny", patch_stride=8))  # block 16: the data's 32 do not fit
    with pytest.raises(ValueError, match="block B = patch_stride\\*dense_stride = 16"):
        model.embedding.patch_embedding(torch.randn(2, 3 * BLOCK * BLOCK), torch.tensor([[1, 2]]))


def test_conversion_dtypes_are_one_table():
    from eve_megatron.hf import export, hf_files, importer

    assert export.DTYPES is hf_files.DTYPES and importer.DTYPES is hf_files.DTYPES
