"""EVEv1's patch embedding layer (batched over blocks of many images) equals the plain
reference (one image at a time, conv over the padded square, crop to the valid patches):
tokens and every gradient, fp32, on images of mixed sizes placed anywhere on 28-pixel
offsets in random padding."""

import pytest
import torch

from eve_megatron.models.eve.patch_embedding import images_to_blocks
from eve_megatron.models.evev1.config import EVEv1Config, evev1_config
from eve_megatron.models.evev1.patch_embedding import EVEv1PatchEmbedding
from tests.reference_evev1 import VT, EVEv1Shape, pel_forward, random_weights

SHAPE = EVEv1Shape()
GRIDS = [(2, 3), (4, 4), (1, 1), (3, 1)]  # (h', w') in 28-pixel blocks
TOL = 1e-5


def _ours_from(w):
    """Our module's state dict from the reference's released names."""
    out = {"conv.weight": w[VT + "patch_embedding.weight"],
           "class_embedding": w[VT + "class_embedding"],
           "split_embedding": w[VT + "split_embedding"]}
    for a in ("local", "global"):
        for part in ("q.0.weight", "q.0.bias", "q.1.weight", "kv.0.weight", "kv.0.bias",
                     "kv.1.weight", "proj.weight", "proj.bias"):
            out[f"{a}_attention.{part}"] = w[f"{VT}{a}_attention.{part}"]
    for i in ("0", "2"):
        for k in ("weight", "bias"):
            out[f"projector.{i}.{k}"] = w[f"model.mm_projector.{i}.{k}"]
    return out


def _module(w):
    cfg = evev1_config("evev1-tiny", hidden_size=SHAPE.hidden, vision_hidden_size=SHAPE.mm_hidden,
                       pel_num_attention_heads=SHAPE.pel_heads, num_attention_heads=SHAPE.heads,
                       num_query_groups=SHAPE.heads)
    m = EVEv1PatchEmbedding(cfg)
    m.load_state_dict({k: v.clone() for k, v in _ours_from(w).items()}, strict=True)
    return m


def _images(seed):
    """Each image on an S x S canvas of random padding, valid region at a 28-pixel offset."""
    g = torch.Generator().manual_seed(seed)
    s, out = SHAPE.image_size, []
    for k, (h, wd) in enumerate(GRIDS):
        canvas = torch.randn(3, s, s, generator=g)
        mask = torch.zeros(s, s)
        y, x = 28 * (k % ((s // 28) - h + 1)), 28 * ((k + 1) % ((s // 28) - wd + 1))
        mask[y:y + 28 * h, x:x + 28 * wd] = 1
        out.append((canvas, mask, canvas[:, y:y + 28 * h, x:x + 28 * wd]))
    return out


def test_pel_matches_reference_tokens_and_gradients():
    w = random_weights(SHAPE, seed=3)
    images = _images(seed=4)
    ref_w = {k: v.clone().requires_grad_(True) for k, v in w.items() if k.startswith(
        (VT, "model.mm_projector."))}
    ref = [pel_forward(ref_w, canvas, mask, SHAPE) for canvas, mask, _ in images]
    assert [hw for _, hw in ref] == GRIDS
    ref_tokens = torch.cat([t for t, _ in ref])
    module = _module(w)
    pixels, grid = images_to_blocks([crop for _, _, crop in images], block=28)
    ours = module(pixels, grid)
    assert ours.shape == ref_tokens.shape == (sum(1 + h * (wd + 1) for h, wd in GRIDS), SHAPE.hidden)
    torch.testing.assert_close(ours, ref_tokens, rtol=TOL, atol=TOL)
    probe = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5))
    (ours * probe).sum().backward()
    (ref_tokens * probe).sum().backward()
    mapping = _ours_from({k: k for k in w})
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, ref_w[mapping[name]].grad, rtol=TOL, atol=TOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_text_only_batch_gives_zero_gradients_and_bad_blocks_are_named():
    module = _module(random_weights(SHAPE, seed=1))
    out = module(torch.zeros(0, 3 * 28 * 28), torch.zeros(0, 2, dtype=torch.long))
    assert out.shape == (0, SHAPE.hidden)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())
    with pytest.raises(ValueError, match="EVEv1's block B = 14\\*2 = 28"):
        module(torch.zeros(1, 3 * 32 * 32), torch.tensor([[1, 1]]))


def test_config_records_its_family_and_refuses_qwen_only_settings():
    from eve_megatron.models.eve.config import config_from_fields, model_fields

    cfg = evev1_config("evev1-tiny")
    fields = model_fields(cfg)
    assert fields["family"] == "evev1" and fields["pel_num_attention_heads"] == 8
    assert fields["add_qkv_bias"] is False and fields["rotary_base"] == 1e4
    again = config_from_fields(fields)
    assert isinstance(again, EVEv1Config) and model_fields(again) == fields
    assert evev1_config("evev1-7b").block_size == 28
    for bad, words in ((dict(decoupling="all"), "dense"), (dict(add_qkv_bias=True), "q/k/v bias"),
                       (dict(pel_num_attention_heads=5), "must divide")):
        with pytest.raises(ValueError, match=words):
            evev1_config("evev1-tiny", **bad)
