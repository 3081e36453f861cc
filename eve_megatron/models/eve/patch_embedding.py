"""EVE patch embedding: conv(16/16) -> GELU -> conv(2/2), split token per row, class token first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eve_megatron.hf.eve_image_rules import image_token_count


class PatchEmbedding(torch.nn.Module):
    """Turns images into ``N = 1 + h'(w' + 1)`` tokens each, for any number of images.

    Both convolutions have kernel == stride, so every output token depends on one
    ``B x B`` pixel block (``B = patch_stride * dense_stride``) alone: the blocks of all
    images go through two matmuls together, with no loop over images. Parameters keep the
    reference's conv shapes and names (``conv1`` = ``patch_embedding.0``, ``conv2`` =
    ``patch_embedding.2``) and are replicated on the tensor-parallel group.
    """

    def __init__(self, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        self.patch_stride, self.dense_stride = config.patch_stride, config.dense_stride
        self.conv1 = torch.nn.Conv2d(3, config.vision_hidden_size, config.patch_stride,
                                     config.patch_stride, **kw)
        self.conv2 = torch.nn.Conv2d(config.vision_hidden_size, config.hidden_size,
                                     config.dense_stride, config.dense_stride, **kw)
        self.class_embedding = torch.nn.Parameter(torch.randn(config.hidden_size, **kw))
        self.split_embedding = torch.nn.Parameter(torch.randn(config.hidden_size, **kw))

    def forward(self, pixel_values: Tensor, image_grid_hw: Tensor) -> Tensor:
        """``[P, 3*B*B]`` blocks + ``[n_img, 2]`` grids -> ``[sum N_i, hidden]`` image tokens."""
        p, d = self.patch_stride, self.dense_stride
        n_blocks = pixel_values.shape[0]
        if pixel_values.dim() != 2 or pixel_values.shape[1] != 3 * (p * d) ** 2:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must be [P, 3*B*B] with "
                             f"the model's block B = patch_stride*dense_stride = {p * d}")
        x = pixel_values.to(self.conv1.weight.dtype).view(n_blocks, 3, d, p, d, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n_blocks * d * d, 3 * p * p)
        x = F.gelu(F.linear(x, self.conv1.weight.flatten(1), self.conv1.bias))  # [P*d*d, C]
        w2 = self.conv2.weight.permute(0, 2, 3, 1).flatten(1)  # [hidden, d*d*C], (dy, dx, c)
        x = F.linear(x.view(n_blocks, w2.shape[1]), w2, self.conv2.bias)  # [P, hidden]
        table = torch.cat([x, self.class_embedding[None], self.split_embedding[None]])
        return table.index_select(0, image_token_index(image_grid_hw, n_blocks))


def image_token_counts(image_grid_hw: Tensor) -> Tensor:
    """Tokens per image (``eve_image_rules.image_token_count`` of each ``(h', w')`` row)."""
    return image_token_count(image_grid_hw[:, 0], image_grid_hw[:, 1])


def image_token_index(image_grid_hw: Tensor, n_blocks: int) -> Tensor:
    """Row of ``[blocks..., class, split]`` feeding each image token, in stream order."""
    grid = image_grid_hw.to(torch.long)
    h, w = grid[:, 0], grid[:, 1]
    if int((h * w).sum()) != n_blocks:
        raise ValueError(f"pixel_values has {n_blocks} blocks but image_grid_hw "
                         f"{grid.tolist()} needs {int((h * w).sum())}")
    counts = image_token_counts(grid)
    image = torch.repeat_interleave(torch.arange(len(grid), device=grid.device), counts)
    first_token = torch.cumsum(counts, 0) - counts
    first_block = torch.cumsum(h * w, 0) - h * w
    j = torch.arange(image.numel(), device=grid.device) - first_token[image] - 1
    row_len = (w + 1)[image]
    row, col = torch.div(j, row_len, rounding_mode="floor"), torch.remainder(j, row_len)
    index = first_block[image] + row * w[image] + col
    index = torch.where(col == w[image], n_blocks + 1, index)
    return torch.where(j < 0, n_blocks, index)


def images_to_blocks(images, block: int = 32):
    """A list of ``[3, H, W]`` images (H, W multiples of ``block``) -> ``(pixel_values, grid)``.

    The layout of the batch contract: ``[P, 3*block*block]`` blocks, row-major per image.
    """
    blocks, grids = [], []
    for img in images:
        c, hh, ww = img.shape
        if c != 3 or hh % block or ww % block:
            raise ValueError(f"image of shape {tuple(img.shape)} is not [3, H, W] with H, W "
                             f"multiples of {block}")
        gh, gw = hh // block, ww // block
        blocks.append(img.view(3, gh, block, gw, block).permute(1, 3, 0, 2, 4)
                      .reshape(gh * gw, 3 * block * block))
        grids.append((gh, gw))
    if not blocks:
        return torch.zeros(0, 3 * block * block), torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(blocks), torch.tensor(grids, dtype=torch.long)
