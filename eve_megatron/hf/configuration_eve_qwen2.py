"""Configuration of the Hugging Face side of EVE (``model_type = "eve-qwen2"``).

Copied next to the weights of every export (``trust_remote_code``); depends on
``transformers`` only and works on every release ``setup.py`` declares.
"""

from transformers import Qwen2Config


class EVEQwen2Config(Qwen2Config):
    """A Qwen2 config plus the EVE keys of the released checkpoint.

    ``add_moe``/``moe_part`` say which weights have a vision copy (the release calls
    the copies ``moe_``): nothing, ``"mlp"``, or ``"layernorm-self_attn-mlp"``.
    ``patch_stride``/``dense_stride`` are the patch embedding's conv strides (16 and 2
    in the release, where they live in the preprocessor config). Image tokens are
    marked in ``input_ids`` by ``image_token_index``. ``mm_vision_tower`` is read only
    by the official EVEv2 code (the folder of its image processor config).
    """

    model_type = "eve-qwen2"

    mm_hidden_size: int = 1024
    add_moe: bool = True
    moe_part: str = "layernorm-self_attn-mlp"
    mm_vision_tower: str | None = None
    patch_stride: int = 16
    dense_stride: int = 2
    image_token_index: int = -200

    def decoupled(self, part: str) -> bool:
        """Whether ``part`` (``layernorm``, ``self_attn`` or ``mlp``) has a vision copy."""
        return bool(self.add_moe) and part in str(self.moe_part or "").split("-")

    @property
    def image_block(self) -> int:
        """Pixels per side of one image token (``patch_stride * dense_stride``)."""
        return int(self.patch_stride) * int(self.dense_stride)

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
