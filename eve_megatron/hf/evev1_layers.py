"""EVEv1's image modules on the HF side, under the released names: the patch embedding
layer (``vision_tower``), the patch aligning layer (``vision_tower_compressor``) and the
frozen CLIP teacher (``vision_clip.backbone.vision_model``).

Shipped in every EVEv1 export beside ``modeling_eve_llama.py``; torch only. Written from
../shared/docs/evev1_reference.md §1-2, one image at a time as the official code runs it:
the image (sides multiples of 28, the crop of the official padded canvas to its valid
region) -> conv 14/14 (no bias) -> LocalAttention over each 2x2 window -> GlobalAttention
(the class embedding attends to every token) -> class token first, a split embedding after
each row. The PAL and the teacher serve training (the PAL loss) only; inference never
runs them, but they load so the checkpoint is complete.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PELAttention(nn.Module):
    """``q = (LN, Linear no bias)``, ``kv = (LN, Linear C -> 2C no bias)`` (``[k | v]``),
    ``proj`` with bias; per-head softmax with the full-width scale ``C^-0.5``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, width ** -0.5
        self.q = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width, bias=False))
        self.proj = nn.Linear(width, width)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``query [n, C]`` attends over ``keys [n, m, C]`` -> ``proj(aggregate) [n, C]``."""
        n, m, c = keys.shape
        d = c // self.heads
        q = self.q(query).view(n, self.heads, d)
        k, v = self.kv(keys).chunk(2, dim=-1)
        k, v = k.reshape(n, m, self.heads, d), v.reshape(n, m, self.heads, d)
        a = (torch.einsum("nhd,nmhd->nhm", q, k) * self.scale).softmax(-1)
        return self.proj(torch.einsum("nhm,nmhd->nhd", a, v).reshape(n, c))


class EVEv1VisionTower(nn.Module):
    """The PEL: ``[3, H, W]`` image -> ``[1 + h(w+1), mm_hidden_size]`` tokens (h = H / 28)."""

    def __init__(self, config):
        super().__init__()
        c, heads = config.mm_hidden_size, config.pel_num_attention_heads
        self.patch, self.window = int(config.patch_stride), int(config.conv_stride)
        self.patch_embedding = nn.Conv2d(3, c, self.patch, self.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c))
        self.split_embedding = nn.Parameter(torch.zeros(c))
        self.local_attention = PELAttention(c, heads)
        self.global_attention = PELAttention(c, heads)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Tokens of one image (before the projector)."""
        s = self.window
        x = self.patch_embedding(image.to(self.class_embedding.dtype)[None])[0]  # [C, H/14, W/14]
        c, gh, gw = x.shape
        h, w = gh // s, gw // s
        windows = x[:, :h * s, :w * s].reshape(c, h, s, w, s).permute(1, 3, 2, 4, 0)
        windows = windows.reshape(h * w, s * s, c)  # [hw, 4, C], sub-patches row-major
        pooled = windows.mean(1)
        grid = pooled + self.local_attention(pooled, windows)  # [hw, C]
        cls = self.class_embedding + self.global_attention(self.class_embedding[None], grid[None])[0]
        split = self.split_embedding.expand(h, 1, c)
        rows = torch.cat([grid.view(h, w, c), split], 1).reshape(h * (w + 1), c)
        return torch.cat([cls[None], rows])


class VisionCompressor(nn.Module):
    """The PAL heads (``vision_tower_compressor``): tapped states ``[n, J, hidden]`` (hs[L]
    first) -> ``[n, C_t]``, compared with the teacher by cosine in training."""

    def __init__(self, config):
        super().__init__()
        h, t = config.hidden_size, config.clip()["hidden_size"]
        self.heads, self.scale = config.pal_num_attention_heads, t ** -0.5
        self.norm_layer = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, t, bias=False))
                                        for _ in config.pal_taps())
        self.input_layer = nn.Linear(h, t)
        self.output_layer = nn.Linear(t, t)

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        """``input_layer(hs[L]) + output_layer(attention of tap 0 over the other taps)``."""
        proj = torch.stack([norm(taps[:, j]) for j, norm in enumerate(self.norm_layer)], 1)
        n, j, t = proj.shape
        q = proj[:, 0].view(n, self.heads, t // self.heads)
        kv = proj[:, 1:].reshape(n, j - 1, self.heads, t // self.heads)
        a = (torch.einsum("nhd,njhd->nhj", q, kv) * self.scale).softmax(-1)
        fused = torch.einsum("nhj,njhd->nhd", a, kv).reshape(n, t)
        return self.input_layer(taps[:, 0]) + self.output_layer(fused)


class CLIPEmbeddings(nn.Module):
    """CLIP's patch embedding, class embedding and learned positions (HF names)."""

    def __init__(self, width: int, patch: int, image: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.position_embedding = nn.Embedding((image // patch) ** 2 + 1, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.position_embedding.weight


class CLIPLayer(nn.Module):
    """One CLIP encoder layer (pre-LN, quick-GELU MLP), HF names."""

    def __init__(self, width: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(width, width))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, ffn), nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (p(h).view(n, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class CLIPTeacher(nn.Module):
    """``vision_clip.backbone.vision_model``: patch features of encoder layer n-1 (the
    release's ``hidden_states[-2][:, 1:]``); only those n-1 layers exist."""

    def __init__(self, clip: dict):
        super().__init__()
        width, eps = clip["hidden_size"], clip["layer_norm_eps"]
        self.embeddings = CLIPEmbeddings(width, clip["patch_size"], clip["image_size"])
        self.pre_layrnorm = nn.LayerNorm(width, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPLayer(width, clip["num_attention_heads"], clip["intermediate_size"], eps)
            for _ in range(clip["num_hidden_layers"] - 1))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[n, 3, S, S]`` CLIP pixels -> ``[n, (S / patch)^2, width]`` (class token dropped)."""
        x = self.pre_layrnorm(self.embeddings(pixels.to(self.pre_layrnorm.weight.dtype)))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]
