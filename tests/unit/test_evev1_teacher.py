"""EVEv1's frozen CLIP teacher equals Hugging Face's CLIPVisionModel: features are
``hidden_states[-2][:, 1:]`` (fp32, <= 1e-5), its state dict loads as is, it never trains,
and inside EVEv1Model it feeds the PAL from the batch's teacher images."""

import pytest
import torch

from eve_megatron.models.evev1 import evev1_config
from eve_megatron.models.evev1.teacher import CLIPTeacher, load_hf_clip_state_dict


def _hf_clip(cfg):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=cfg.teacher_hidden_size, intermediate_size=cfg.teacher_ffn_hidden_size,
        num_hidden_layers=cfg.teacher_num_layers, num_attention_heads=cfg.teacher_num_attention_heads,
        image_size=cfg.teacher_image_size, patch_size=cfg.teacher_patch_size,
        layer_norm_eps=cfg.teacher_layernorm_epsilon, hidden_act="quick_gelu")).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random everywhere, norms included
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def test_teacher_equals_hf_clip_second_to_last_layer():
    cfg = evev1_config("evev1-tiny")
    hf = _hf_clip(cfg)
    teacher = CLIPTeacher(cfg)
    load_hf_clip_state_dict(teacher, hf.state_dict())
    images = torch.randn(3, 3, cfg.teacher_image_size, cfg.teacher_image_size)
    with torch.no_grad():
        ref = hf(pixel_values=images, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = teacher(images)
    assert ours.shape == (3, (cfg.teacher_image_size // 14) ** 2, cfg.teacher_hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # stays in eval mode
    bad = {k: v for k, v in hf.state_dict().items() if not k.endswith("pre_layrnorm.weight")}
    assert len(bad) == len(hf.state_dict()) - 1  # with or without the vision_model. prefix
    with pytest.raises(ValueError, match="pre_layrnorm.weight"):
        load_hf_clip_state_dict(CLIPTeacher(cfg), bad)


def test_model_runs_the_teacher_on_the_batch_images(megatron_world):
    from tests.reference_evev1 import make_batch
    from tests.unit.test_evev1_model import SHAPE, _contract, _model
    from tests.reference_evev1 import random_weights

    model = _model(SHAPE, random_weights(SHAPE, seed=2))
    batch = make_batch(SHAPE, [(2, 3), (1, 1)], rows=1, seq=48, seed=5)
    pixels = torch.randn(2, 3, 56, 56)
    inputs = dict(_contract(batch, SHAPE), labels=batch["labels"],
                  teacher_valid=batch["teacher_valid"])
    _, via_images, _ = model(**inputs, teacher_pixel_values=pixels)
    _, via_features, _ = model(**inputs, teacher_features=model.teacher(pixels))
    assert torch.equal(via_images, via_features) and float(via_images) > 0
