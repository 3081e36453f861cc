"""Configuration of the Hugging Face side of EVE (``model_type = "eve-qwen2"``).

Copied next to the weights of every export (``trust_remote_code``); depends on
``transformers`` only.
"""

from transformers import Qwen2Config


class EVEQwen2Config(Qwen2Config):
    """A Qwen2 config plus the EVE keys of the released checkpoint.

    ``add_moe``/``moe_part`` say which weights have a vision copy (the release calls
    the copies ``moe_``): nothing, ``"mlp"``, or ``"layernorm-self_attn-mlp"``.
    ``patch_stride``/``dense_stride`` are the patch embedding's conv strides (16 and 2
    in the release, where they live in the preprocessor config). Image tokens are
    marked in ``input_ids`` by ``image_token_index``.
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
