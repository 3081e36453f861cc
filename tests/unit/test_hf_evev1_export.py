"""EVEv1 checkpoint -> EVE-7B-v1.0 HF folder: the name table, the weight list, the export's
layout and config keys, and the shipped HF model's logits against EVEv1Model (fp32, <= 1e-5).

How each test fails: a Megatron weight missing from (or extra to) the table or to
``weight_shapes``; a released name the table does not produce (the reference's names,
``tests.reference_evev1.weight_shapes``, are written independently); the export writing a
padded vocabulary, a wrong config key, no tokenizer or a bad SHA256SUMS; the HF model
(PEL, projector, Llama decoder) computing different logits from Megatron's.
"""

import json
import os

import pytest
import torch

from eve_megatron.checksums import check_folder
from eve_megatron.hf import mapping_evev1
from eve_megatron.hf.export import export_checkpoint
from eve_megatron.hf.hf_files import HFWeights
from eve_megatron.hf.mapping import hf_names, megatron_name_of
from eve_megatron.hf.shapes import heads_of, table_of
from eve_megatron.models.eve.config import model_fields
from eve_megatron.models.eve.patch_embedding import images_to_blocks
from eve_megatron.models.eve.weights import weight_shapes
from eve_megatron.models.evev1 import EVEv1Model
from eve_megatron.training import checkpointing
from tests.reference_evev1 import EVEv1Shape, random_weights
from tests.reference_evev1 import weight_shapes as released_shapes
from tests.unit._data_helpers import make_llama_sp_tokenizer
from tests.unit.test_evev1_model import _megatron_weights, config_of

SHAPE = EVEv1Shape(vocab=512)  # padded: the tokenizer has 400 pieces
CLIP = mapping_evev1.CLIP
TOL = 1e-5


def _model(seed=5):
    torch.manual_seed(seed)
    model = EVEv1Model(config_of(SHAPE))
    model.load_state_dict(_megatron_weights(model, random_weights(SHAPE, seed)), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(model, export folder)``: a saved EVEv1 checkpoint exported with a Llama-style
    sentencepiece tokenizer (400 pieces)."""
    from eve_megatron.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    root = tmp_path_factory.mktemp("evev1_export")
    model = _model()
    checkpointing.save_checkpoint(str(root / "ckpt"), 3, [model])
    tok = make_llama_sp_tokenizer(str(root / "tok"))
    summary = export_checkpoint(str(root / "ckpt"), str(root / "hf"), tokenizer=tok,
                                progress=False, verify=True)
    assert summary["verified"]
    return model, str(root / "hf")


def test_weight_shapes_and_table_cover_the_model(megatron_world):
    model = _model()
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    fields = model_fields(model.config)
    assert weight_shapes(fields) == params
    table = table_of(fields)
    released = set(released_shapes(SHAPE))
    produced = set()
    for name in params:
        for k, hf in enumerate(hf_names(name, table)):
            assert megatron_name_of(hf, table) == (name, k)  # the table inverts
            produced.add(hf)
    teacher = {h for h in produced if h.startswith(CLIP)}
    assert produced - teacher == released  # every released name, nothing else
    assert len(teacher) == 5 + 16 * (model.config.teacher_num_layers - 1)


def test_export_writes_the_release_layout(exported):
    model, folder = exported
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "eve" and cfg["architectures"] == ["EVELlamaForCausalLM"]
    assert cfg["vocab_size"] == 400 and cfg["mm_hidden_size"] == SHAPE.mm_hidden
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["requires_cliploss"] is True
    assert cfg["mm_vision_tower"] == "openai/eve-patch14-anypixel-672"
    assert cfg["mm_vision_tower_clip"] == "openai/clip-vit-large-patch14-336"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert cfg["num_hidden_layers"] == SHAPE.layers and cfg["rope_theta"] == 1e4
    assert cfg["vision_clip_config"]["num_hidden_layers"] == model.config.teacher_num_layers
    assert os.path.isfile(os.path.join(folder, "tokenizer.model"))
    assert check_folder(folder, "export", required=True)
    w = HFWeights(folder)
    names = set(w.names())
    assert names - {n for n in names if n.startswith(CLIP)} == set(released_shapes(SHAPE))
    embed = model.embedding.word_embeddings.weight.detach()
    assert torch.equal(w.read("model.embed_tokens.weight"), embed[:400])  # unpadded
    assert torch.equal(w.read("lm_head.weight"), model.output_layer.weight.detach()[:400])
    assert torch.equal(w.read(CLIP + "encoder.layers.1.mlp.fc2.bias"),
                       model.teacher.encoder.layers[1].mlp.fc2.bias)
    q = w.read("model.layers.2.self_attn.q_proj.weight")
    heads = heads_of(model_fields(model.config))
    fused = model.decoder.layers[2].self_attention.linear_qkv.weight.detach()
    d = heads.head_dim
    assert torch.equal(q[:d], fused[:d]) and torch.equal(q[d:2 * d], fused[3 * d:4 * d])


def _inputs(seed=0):
    """Two images (28-pixel multiples) in one row: ``(input_ids, images, is_vision)``."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 56, 84, generator=g), torch.randn(3, 28, 28, generator=g)]
    counts = [1 + (im.shape[1] // 28) * (im.shape[2] // 28 + 1) for im in images]
    ids = [1, 5, 9] + [-200] * counts[0] + [17, 3, 30] + [-200] * counts[1] + [8, 250, 399, 2]
    input_ids = torch.tensor([ids])
    return input_ids, images, input_ids == -200


def test_hf_model_logits_equal_megatron(exported):
    from transformers import AutoModelForCausalLM

    model, folder = exported
    hf, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                    local_files_only=True, output_loading_info=True)
    hf.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == "EVELlamaForCausalLM"
    input_ids, images, is_vision = _inputs()
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, pixel_values=images).logits
    pixels, grid = images_to_blocks(images, block=28)
    s = input_ids.shape[1]
    with torch.no_grad():
        ours = model(tokens=input_ids.clamp_min(0), position_ids=torch.arange(s)[None],
                     is_vision=is_vision, cu_seqlens=torch.tensor([0, s], dtype=torch.int32),
                     max_seqlen=s, pixel_values=pixels, image_grid_hw=grid)
    ours = ours[..., :400]
    assert theirs.shape == ours.shape
    assert float((theirs - ours).norm() / ours.norm()) <= TOL
    hf_state = hf.state_dict()
    assert torch.equal(hf_state["model.vision_tower_compressor.norm_layer.3.1.weight"],
                       model.pal.norm_layer[3][1].weight)  # PAL and teacher load too
    assert torch.equal(hf_state[CLIP + "pre_layrnorm.bias"],
                       model.teacher.pre_layrnorm.bias)
