"""Patch embedding vs real convolutions; token counts and layout of the image tokens."""

import pytest
import torch

from eve_megatron.models.eve import eve_config, image_token_counts, images_to_blocks
from eve_megatron.models.eve.patch_embedding import PatchEmbedding
from tests.reference_eve import image_tokens, rel_err


def _weights(pe: PatchEmbedding):
    return {"conv1.w": pe.conv1.weight, "conv1.b": pe.conv1.bias, "conv2.w": pe.conv2.weight,
            "conv2.b": pe.conv2.bias, "cls": pe.class_embedding, "split": pe.split_embedding}


def test_equals_per_image_convolutions():
    torch.manual_seed(0)
    pe = PatchEmbedding(eve_config("tiny"))
    images = [torch.randn(3, 32 * h, 32 * w) for h, w in [(1, 1), (3, 2), (2, 5), (4, 1)]]
    pixel_values, grid = images_to_blocks(images)
    out = pe(pixel_values, grid)
    ref = torch.cat([image_tokens(_weights(pe), im) for im in images])
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-6
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), list(pe.parameters()))
    ref_grads = torch.autograd.grad((ref * g).sum(), list(pe.parameters()))
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-5


def test_split_and_class_token_positions():
    torch.manual_seed(1)
    pe = PatchEmbedding(eve_config("tiny"))
    pixel_values, grid = images_to_blocks([torch.randn(3, 64, 96)])  # h'=2, w'=3
    out = pe(pixel_values, grid)
    assert out.shape[0] == 1 + 2 * (3 + 1)
    assert torch.equal(out[0], pe.class_embedding)
    for row in range(2):
        assert torch.equal(out[1 + row * 4 + 3], pe.split_embedding)


@pytest.mark.parametrize("side,expected", [(1600, 2551), (800, 651), (32, 3)])
def test_token_count_formula(side, expected):
    grid = torch.tensor([[side // 32, side // 32]])
    assert int(image_token_counts(grid)[0]) == expected


def test_mismatched_blocks_and_grid_fail():
    pe = PatchEmbedding(eve_config("tiny"))
    pixel_values, _ = images_to_blocks([torch.randn(3, 64, 64)])
    with pytest.raises(ValueError, match="blocks"):
        pe(pixel_values, torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="multiples of 32"):
        images_to_blocks([torch.randn(3, 50, 64)])
