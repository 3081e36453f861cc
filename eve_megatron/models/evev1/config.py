"""EVEv1 config: a dense Llama-2/Vicuna decoder (EVEConfig, decoupling 'none') plus the
patch embedding layer (PEL) of the released EVE-7B-v1.0.

Facts from ../shared/docs/evev1_reference.md section 1: no q/k/v bias, RMSNorm eps 1e-5,
RoPE base 1e4, MHA, SwiGLU, untied, vocab 32000 (padded for TP); PEL width C =
``mm_hidden_size`` 1024, conv 14x14 (``patch_stride``), 2x2 local windows (``dense_stride``,
the reference's ``conv_stride``: one token per 28x28 pixel block), 8 PEL heads, projector
``mlp2x_gelu`` (C -> hidden -> hidden).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from eve_megatron.hf.evev1_image_rules import BASE_SIZE, DENSE_STRIDE, PATCH_STRIDE, TEACHER_PATCH
from eve_megatron.models.eve.config import EVEConfig, _arch
from eve_megatron.models.evev1.weights import pal_taps



@dataclass
class EVEv1Config(EVEConfig):
    """Config of an EVEv1 model (Vicuna decoder + PEL + PAL)."""

    FAMILY: ClassVar[str] = "evev1"
    MODEL: ClassVar[str] = "eve_megatron.models.evev1.model:EVEv1Model"

    pel_num_attention_heads: int = _arch(8)
    """Heads of the PEL's local and global attention (the softmax scale is C^-0.5 anyway)."""
    teacher_hidden_size: int = _arch(1024)
    """Width C_t of the teacher's patch features (CLIP ViT-L/14-336: 1024)."""
    teacher_num_layers: int = _arch(24)
    """Encoder layers of the teacher; its features are those of layer ``n - 1``
    (``hidden_states[-2]``), so only ``n - 1`` layers are built."""
    teacher_num_attention_heads: int = _arch(16)
    teacher_ffn_hidden_size: int = _arch(4096)
    teacher_image_size: int = _arch(BASE_SIZE)
    """Side of the teacher's (padded, square) input image."""
    teacher_patch_size: int = _arch(TEACHER_PATCH)
    teacher_layernorm_epsilon: float = _arch(1e-5)
    pal_layer_stride: int = _arch(4)
    """The PAL taps hidden states ``L, L - k, ..., 0`` for this ``k`` (4 of 32 layers: 9 taps;
    hs[0] = the embedding output, hs[L] = the final norm's output)."""
    pal_num_attention_heads: int = _arch(8)
    """Heads of the PAL's attention across the tapped layers (scale C_t^-0.5)."""

    # Llama-2 / Vicuna and PEL defaults for inherited fields (EVEConfig's own fields keep
    # their _arch declaration, so they stay recorded).
    decoupling: str = _arch("none")
    rotary_base: float = _arch(10_000.0)
    patch_stride: int = _arch(PATCH_STRIDE)
    dense_stride: int = _arch(DENSE_STRIDE)
    add_qkv_bias: bool = False
    layernorm_epsilon: float = 1e-5

    @property
    def pal_taps(self) -> list:
        """Tapped hidden-state indices, the query (hs[L]) first: ``L, L - k, ..., 0``."""
        return pal_taps(self.num_layers, self.pal_layer_stride)

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.decoupling == "none", "EVEv1 is dense: decoupling must be 'none'"),
            (not self.add_qkv_bias, "EVEv1 (Llama) has no q/k/v bias"),
            (self.vision_hidden_size % self.pel_num_attention_heads == 0,
             f"vision_hidden_size {self.vision_hidden_size} must divide by "
             f"pel_num_attention_heads {self.pel_num_attention_heads}"),
            (self.teacher_hidden_size % self.pal_num_attention_heads == 0,
             f"teacher_hidden_size {self.teacher_hidden_size} must divide by "
             f"pal_num_attention_heads {self.pal_num_attention_heads}"),
            (self.teacher_num_layers >= 2 and self.teacher_image_size % self.teacher_patch_size == 0
             and self.teacher_hidden_size % self.teacher_num_attention_heads == 0,
             "the teacher needs >= 2 layers, image size a multiple of its patch, heads dividing "
             "its width"),
            (1 <= self.pal_layer_stride <= self.num_layers,
             f"pal_layer_stride must be in [1, num_layers], got {self.pal_layer_stride}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"EVEv1Config: {message}")


PRESETS = {
    "evev1-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                       ffn_hidden_size=128, vocab_size=512, vision_hidden_size=32,
                       pel_num_attention_heads=8, teacher_hidden_size=32, pal_layer_stride=1,
                       teacher_num_layers=3, teacher_num_attention_heads=4,
                       teacher_ffn_hidden_size=64,
                       max_sequence_length=4096),
    "evev1-7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_query_groups=32, ffn_hidden_size=11008, vocab_size=32000,
                     vision_hidden_size=1024, pel_num_attention_heads=8,
                     teacher_hidden_size=1024, pal_layer_stride=4, max_sequence_length=4096),
}


def evev1_config(preset: str, **overrides) -> EVEv1Config:
    """An :class:`EVEv1Config` from a named preset plus overrides (CPU init without CUDA)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown EVEv1 preset {preset!r}; choose from {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu_initialization", True)
    kwargs.update(overrides)
    return EVEv1Config(**kwargs)
