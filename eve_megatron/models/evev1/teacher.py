"""The frozen CLIP ViT teacher of EVEv1's visual supervision (CLIP ViT-L/14-336 in the release).

Reference: ../shared/docs/evev1_reference.md section 2 (Teacher): features =
``hidden_states[-2][:, 1:]`` of ``CLIPVisionModel`` (the output of the second-to-last
encoder layer, class token dropped) on the 336-pixel padded base-size image. Our own plain
PyTorch ViT with the Hugging Face parameter names (``embeddings.*``, ``pre_layrnorm``,
``encoder.layers.{i}.*``), so an HF ``CLIPVisionModel``'s ``vision_model`` state dict loads
as is; only the layers up to the tapped one are built. Frozen (``requires_grad=False``)
and run under ``no_grad`` in eval mode; replicated on the ranks that compute the PAL (the
last pipeline stage), its work is ``n_images`` ViT forwards per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _Embeddings(torch.nn.Module):
    def __init__(self, width: int, patch: int, image: int, **kw):
        super().__init__()
        self.patch_embedding = torch.nn.Conv2d(3, width, patch, patch, bias=False, **kw)
        self.class_embedding = torch.nn.Parameter(torch.randn(width, **kw))
        self.position_embedding = torch.nn.Embedding((image // patch) ** 2 + 1, width, **kw)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [n, G*G, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.position_embedding.weight


class _Attention(torch.nn.Module):
    def __init__(self, width: int, heads: int, **kw):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            torch.nn.Linear(width, width, **kw) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = (p(x).view(n, t, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c))


class _MLP(torch.nn.Module):
    def __init__(self, width: int, ffn: int, **kw):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, ffn, **kw), torch.nn.Linear(ffn, width, **kw)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu (CLIP)


class _Layer(torch.nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, eps: float, **kw):
        super().__init__()
        self.layer_norm1 = torch.nn.LayerNorm(width, eps=eps, **kw)
        self.self_attn = _Attention(width, heads, **kw)
        self.layer_norm2 = torch.nn.LayerNorm(width, eps=eps, **kw)
        self.mlp = _MLP(width, ffn, **kw)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(torch.nn.Module):
    def __init__(self, layers, **_):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)


class CLIPTeacher(torch.nn.Module):
    """``[n, 3, S, S]`` CLIP-normalised images -> ``[n, (S/patch)^2, width]`` patch features
    of encoder layer ``teacher_num_layers - 1`` (the release's ``hidden_states[-2]``)."""

    def __init__(self, config):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=torch.float32, device=device)  # the teacher runs in fp32
        width, eps = config.teacher_hidden_size, config.teacher_layernorm_epsilon
        self.embeddings = _Embeddings(width, config.teacher_patch_size,
                                      config.teacher_image_size, **kw)
        self.pre_layrnorm = torch.nn.LayerNorm(width, eps=eps, **kw)
        self.encoder = _Encoder([
            _Layer(width, config.teacher_num_attention_heads, config.teacher_ffn_hidden_size,
                   eps, **kw) for _ in range(config.teacher_num_layers - 1)])
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "CLIPTeacher":
        """Always in eval mode (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """Patch features (class token dropped), fp32."""
        x = self.pre_layrnorm(self.embeddings(pixels.float()))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]


def load_hf_clip_state_dict(teacher: CLIPTeacher, state: dict) -> None:
    """Load an HF ``CLIPVisionModel`` state dict (``vision_model.*`` names, or the
    ``CLIPVisionTransformer``'s own); the layers after the tapped one and ``post_layernorm``
    are not part of the teacher and are skipped. Missing or mis-shaped weights are errors."""
    ours = teacher.state_dict()
    mine = {}
    for name, tensor in state.items():
        key = name[len("vision_model."):] if name.startswith("vision_model.") else name
        if key in ours:
            if tuple(tensor.shape) != tuple(ours[key].shape):
                raise ValueError(f"teacher weight {name}: shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(ours[key].shape)}")
            mine[key] = tensor
    missing = sorted(set(ours) - set(mine))
    if missing:
        raise ValueError(f"teacher weights missing: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    teacher.load_state_dict(mine, strict=True)
