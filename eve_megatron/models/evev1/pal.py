"""EVEv1's patch aligning layer (PAL): visual supervision of the decoder's image positions
against a frozen teacher's patch features.

Reference: ../shared/docs/evev1_reference.md section 2 (``VisionCompressor``). The decoder's
hidden states at the taps ``config.pal_taps`` (hs[L] after the final norm first, hs[0] the
embedding output) are read at every image block position (no class token, no split
column), 2x2 average pooled when the student grid is twice the teacher's (HD); per tap
``norm_layer[j]`` = LayerNorm + Linear(hidden -> C_t, no bias); the query (tap 0) attends
over the other taps (no q/k/v projections, ``pal_num_attention_heads`` heads, scale
C_t^-0.5); output = ``input_layer(hs[L]) + output_layer(fused)``. Loss of an image:
1 - mean over its valid teacher patches of cos(output, teacher feature). All images of
the micro-batch at once (segment sums, no loop over images).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from eve_megatron.models.eve.patch_embedding import image_token_index


class PatchAligningLayer(torch.nn.Module):
    """The PAL heads: ``[n, J, hidden]`` tapped states -> ``[n, C_t]``."""

    def __init__(self, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        h, t = config.hidden_size, config.teacher_hidden_size
        self.heads, self.scale = config.pal_num_attention_heads, t ** -0.5
        self.norm_layer = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(h, **kw), torch.nn.Linear(h, t, bias=False, **kw))
            for _ in config.pal_taps)
        self.input_layer = torch.nn.Linear(h, t, **kw)
        self.output_layer = torch.nn.Linear(t, t, **kw)

    def forward(self, taps: Tensor) -> Tensor:
        """``taps [n, J, hidden]`` (query tap first) -> ``[n, C_t]``."""
        proj = torch.stack([norm(taps[:, j]) for j, norm in enumerate(self.norm_layer)], 1)
        n, j, t = proj.shape
        q = proj[:, 0].view(n, self.heads, t // self.heads)
        kv = proj[:, 1:].view(n, j - 1, self.heads, t // self.heads)
        a = (torch.einsum("nhd,njhd->nhj", q, kv) * self.scale).softmax(-1)
        fused = torch.einsum("nhj,njhd->nhd", a, kv).reshape(n, t)
        return self.input_layer(taps[:, 0]) + self.output_layer(fused)


def block_rows(is_vision: Tensor, image_grid_hw: Tensor) -> Tensor:
    """``[(s, b)]`` flat row index, in ``[s, b, h]`` layout, of every image block token
    (class tokens and split columns left out), images in stream order, blocks row-major."""
    b, s = is_vision.shape
    pos = is_vision.nonzero()  # [n_vision, 2] (row, position), stream order
    grid = image_grid_hw.to(torch.long)
    n_blocks = int((grid[:, 0] * grid[:, 1]).sum())
    keep = image_token_index(grid, n_blocks) < n_blocks  # the token shows a block
    pos = pos[keep]
    return pos[:, 1] * b + pos[:, 0]


def pool_index(image_grid_hw: Tensor, factors: Tensor) -> Tuple[Tensor, int]:
    """For each block (row-major per image): its cell after ``factor x factor`` average
    pooling of its image, and the number of cells."""
    grid = image_grid_hw.to(torch.long)
    h, w = grid[:, 0], grid[:, 1]
    image = torch.repeat_interleave(torch.arange(len(grid), device=grid.device), h * w)
    j = torch.arange(int((h * w).sum()), device=grid.device) - (torch.cumsum(h * w, 0) - h * w)[image]
    f = factors[image]
    y, x = torch.div(j, w[image], rounding_mode="floor"), torch.remainder(j, w[image])
    cells = (h // factors) * (w // factors)
    first = torch.cumsum(cells, 0) - cells
    index = first[image] + torch.div(y, f, rounding_mode="floor") * (w // factors)[image] + \
        torch.div(x, f, rounding_mode="floor")
    return index, int(cells.sum())


def pal_loss(pal: PatchAligningLayer, taps: Sequence[Tensor], is_vision: Tensor,
             image_grid_hw: Tensor, teacher_features: Tensor, teacher_valid: Tensor
             ) -> Tuple[Tensor, int]:
    """``(sum over images of 1 - mean cos, number of images)`` of one micro-batch.

    ``taps``: full-sequence hidden states ``[s, b, hidden]`` in ``pal_taps`` order;
    ``teacher_features [n_img, G*G, C_t]`` and ``teacher_valid [n_img, G*G]`` (bool,
    row-major patches) in image order. The student grid must equal the valid teacher grid
    or be twice it (HD: 2x2 pooling)."""
    rows = block_rows(is_vision, image_grid_hw)
    x = torch.stack([t.reshape(-1, t.shape[-1])[rows] for t in taps], 1)  # [P, J, hidden]
    grid = image_grid_hw.to(torch.long).to(x.device)
    valid = teacher_valid.to(torch.bool)
    n_valid = valid.sum(1)
    factors = torch.ones(len(grid), dtype=torch.long, device=x.device)
    factors[grid[:, 0] * grid[:, 1] == 4 * n_valid] = 2
    if not torch.equal(grid[:, 0] * grid[:, 1], factors ** 2 * n_valid):
        raise ValueError(f"image grids {grid.tolist()} do not match the teacher's valid patches "
                         f"{n_valid.tolist()} (equal, or twice per side for HD)")
    if bool((factors > 1).any()):
        index, cells = pool_index(grid, factors)
        count = x.new_zeros(cells).index_add(0, index, x.new_ones(len(index)))
        x = x.new_zeros(cells, *x.shape[1:]).index_add(0, index, x) / count[:, None, None]
    out = pal(x)  # [cells, C_t]
    target = teacher_features[valid].to(out.dtype)  # [cells, C_t], image order, row-major
    cos = F.cosine_similarity(out, target, dim=-1)
    image = torch.repeat_interleave(torch.arange(len(grid), device=x.device), n_valid)
    mean = cos.new_zeros(len(grid)).index_add(0, image, cos) / n_valid.clamp_min(1)
    return (1 - mean).sum() + 0 * out.sum(), len(grid)
