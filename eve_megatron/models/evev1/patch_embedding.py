"""EVEv1's patch embedding layer (PEL) and projector, batched over the blocks of all images.

Reference: ../shared/docs/evev1_reference.md section 1 (``VisionTokenizer``). The conv
(k = s = 14, no bias) and the LocalAttention over each 2x2 window of patches only ever see
one 28x28 pixel block, so they run on the ``[P, 3*28*28]`` blocks of every image of the
micro-batch at once (the batch contract's block layout, with EVEv1's block). The data
crops each image to its valid region (sides multiples of 28), which equals the
reference's conv over the padded square followed by the crop to the valid patches.
GlobalAttention (the class embedding attending to its image's tokens) is a segment
softmax over each image's blocks: no loop over images. Layout as EVEv2's: class token
first, then each row followed by the split embedding (``1 + h'(w'+1)`` tokens), then the
``mlp2x_gelu`` projector on every token. Parameters are replicated over TP.

Weight layout choices where the reference leaves it open ([inferred]): ``kv`` outputs
``[k | v]``, each split into heads as contiguous chunks; LayerNorm eps 1e-5; exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from eve_megatron.models.eve.patch_embedding import image_token_counts, image_token_index


class PELAttention(torch.nn.Module):
    """The PEL's attention block: ``q = (LN, Linear no bias)``, ``kv = (LN, Linear C -> 2C no
    bias)``, ``proj`` (with bias); softmax scale ``C^-0.5`` over the full width."""

    def __init__(self, width: int, heads: int, **kw):
        super().__init__()
        self.heads, self.scale = heads, width ** -0.5
        self.q = torch.nn.Sequential(torch.nn.LayerNorm(width, **kw),
                                     torch.nn.Linear(width, width, bias=False, **kw))
        self.kv = torch.nn.Sequential(torch.nn.LayerNorm(width, **kw),
                                      torch.nn.Linear(width, 2 * width, bias=False, **kw))
        self.proj = torch.nn.Linear(width, width, **kw)

    def split_heads(self, x: Tensor) -> Tensor:
        """``[..., C]`` -> ``[..., heads, C/heads]``."""
        return x.view(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)


class EVEv1PatchEmbedding(torch.nn.Module):
    """Blocks ``[P, 3*B*B]`` (B = 14 * 2) + grids ``[n_img, 2]`` -> ``[sum N_i, hidden]``."""

    def __init__(self, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        c, heads = config.vision_hidden_size, config.pel_num_attention_heads
        self.patch, self.window = config.patch_stride, config.dense_stride
        self.conv = torch.nn.Conv2d(3, c, self.patch, self.patch, bias=False, **kw)
        self.class_embedding = torch.nn.Parameter(torch.randn(c, **kw))
        self.split_embedding = torch.nn.Parameter(torch.randn(c, **kw))
        self.local_attention = PELAttention(c, heads, **kw)
        self.global_attention = PELAttention(c, heads, **kw)
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(c, config.hidden_size, **kw), torch.nn.GELU(),
            torch.nn.Linear(config.hidden_size, config.hidden_size, **kw))

    def forward(self, pixel_values: Tensor, image_grid_hw: Tensor) -> Tensor:
        """Image tokens in stream order (images in ``image_grid_hw`` order)."""
        p, w = self.patch, self.window
        n_blocks = pixel_values.shape[0]
        if pixel_values.dim() != 2 or pixel_values.shape[1] != 3 * (p * w) ** 2:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must be [P, 3*B*B] with "
                             f"EVEv1's block B = {p}*{w} = {p * w}")
        grid = image_grid_hw.to(torch.long)
        x = pixel_values.to(self.conv.weight.dtype).view(n_blocks, 3, w, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n_blocks, w * w, 3 * p * p)  # sub-patches (dy, dx)
        x = F.linear(x, self.conv.weight.flatten(1))  # [P, 4, C]
        tokens = self._local(x)  # [P, C]
        cls = self._global(tokens, grid)  # [n_img, C]
        table = self.projector(torch.cat([tokens, cls, self.split_embedding[None]]))
        index = image_token_index(grid, n_blocks)  # EVEv2's rows: class -> P, split -> P + 1
        image = torch.repeat_interleave(torch.arange(len(grid), device=grid.device),
                                        image_token_counts(grid))
        index = torch.where(index == n_blocks, n_blocks + image,  # each image's own class token
                            torch.where(index == n_blocks + 1, n_blocks + len(grid), index))
        return table.index_select(0, index)

    def _local(self, x: Tensor) -> Tensor:
        """LocalAttention of each window: ``[P, 4, C]`` -> ``[P, C]``."""
        att = self.local_attention
        pooled = x.mean(1)  # [P, C]
        q = att.split_heads(att.q(pooled))  # [P, heads, d]
        k, v = att.kv(x).chunk(2, dim=-1)  # [P, 4, C] each
        k, v = att.split_heads(k), att.split_heads(v)  # [P, 4, heads, d]
        a = (torch.einsum("phd,pjhd->phj", q, k) * att.scale).softmax(-1)
        agg = torch.einsum("phj,pjhd->phd", a, v).flatten(1)  # [P, C]
        return pooled + att.proj(agg)

    def _global(self, tokens: Tensor, grid: Tensor) -> Tensor:
        """The class embedding attending to each image's tokens (segment softmax)."""
        att, n = self.global_attention, len(grid)
        image = torch.repeat_interleave(torch.arange(n, device=grid.device), grid[:, 0] * grid[:, 1])
        q = att.split_heads(att.q(self.class_embedding))  # [heads, d]
        k, v = att.kv(tokens).chunk(2, dim=-1)
        k, v = att.split_heads(k), att.split_heads(v)  # [P, heads, d]
        s = torch.einsum("hd,phd->ph", q, k) * att.scale  # [P, heads]
        top = s.new_full((n, s.shape[1]), float("-inf")).scatter_reduce(
            0, image[:, None].expand_as(s), s, "amax", include_self=True)
        e = (s - top[image].detach()).exp()
        z = e.new_zeros(n, s.shape[1]).index_add(0, image, e)
        a = e / z[image]  # [P, heads]
        agg = v.new_zeros(n, *v.shape[1:]).index_add(0, image, a[..., None] * v).flatten(1)
        return self.class_embedding + att.proj(agg)  # [n_img, C]
