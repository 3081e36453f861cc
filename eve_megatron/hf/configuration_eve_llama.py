"""Configuration of the Hugging Face side of EVEv1 (``model_type = "eve"``, EVE-7B-v1.0).

Copied next to the weights of every EVEv1 export (``trust_remote_code``); depends on
``transformers`` only. The released config is a Llama config plus LLaVA-style ``mm_*``
keys; what the release kept elsewhere is under our own keys (see ``config_map_evev1``).
"""

from transformers import LlamaConfig


class EVELlamaConfig(LlamaConfig):
    """A Llama config plus EVEv1's keys.

    ``mm_hidden_size``: the patch embedding layer's width; ``image_size`` /
    ``image_size_clip``: the student canvas (672, HD 1344) and the base size (336), their
    ratio is the resize factor; ``patch_stride`` x ``conv_stride``: pixels per image token
    (14 x 2 = 28); ``pel_num_attention_heads``, ``pal_layer_stride``,
    ``pal_num_attention_heads``: the PEL and PAL heads and the PAL's tap stride
    (default ``max(1, layers // 8)``, 4 for 32 layers); ``vision_clip_config``: the CLIP
    teacher's vision config (only its first ``num_hidden_layers - 1`` layers exist).
    """

    model_type = "eve"

    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    image_size: int = 672
    image_size_clip: int = 336
    patch_stride: int = 14
    conv_stride: int = 2
    pel_num_attention_heads: int = 8
    pal_layer_stride: int | None = None
    pal_num_attention_heads: int = 8
    image_token_index: int = -200
    requires_cliploss: bool = True
    vision_clip_config: dict | None = None
    add_moe: bool = False  # dense: the routed layers of the shared code never route
    qkv_bias: bool = False  # Llama: no q/k/v bias

    def decoupled(self, part: str) -> bool:
        """EVEv1 is dense: no part has a vision copy."""
        return False

    @property
    def image_block(self) -> int:
        """Pixels per side of one image token (``patch_stride * conv_stride``)."""
        return int(self.patch_stride) * int(self.conv_stride)

    @property
    def image_ratio(self) -> int:
        """Student size / base size (2, HD 4)."""
        return int(self.image_size) // int(self.image_size_clip)

    def pal_taps(self) -> list:
        """The PAL's tapped hidden states ``L, L - k, ..., 0``."""
        layers = int(self.num_hidden_layers)
        stride = self.pal_layer_stride or max(1, layers // 8)
        return list(range(layers, -1, -int(stride)))

    def clip(self) -> dict:
        """The teacher's vision config (CLIP ViT-L/14-336 when none is recorded)."""
        default = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                   "num_hidden_layers": 24, "image_size": 336, "patch_size": 14,
                   "layer_norm_eps": 1e-5}
        return dict(default, **(self.vision_clip_config or {}))

    def rope_base(self) -> float:
        """RoPE theta, wherever this release keeps it (``rope_theta`` or ``rope_parameters``)."""
        params = getattr(self, "rope_parameters", None) or getattr(self, "rope_scaling", None) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(f"RoPE scaling {params} is not supported by EVE (plain RoPE only)")
        theta = getattr(self, "rope_theta", None)
        if theta is None:
            theta = params.get("rope_theta", 10000.0)
        return float(theta)
