"""Architecture <-> Hugging Face ``config.json`` / ``preprocessor_config.json``.

Our architecture is ``models.eve.config.MODEL_FIELDS`` (what a Megatron checkpoint
records). The HF side is the released EVE layout (``EVEQwen2ForCausalLM``, ``eve-qwen2``,
Qwen2 keys plus ``mm_hidden_size``, ``add_moe``, ``moe_part``, ``mm_vision_tower``) or a
plain Qwen2/Qwen2.5 ``config.json`` (import only).
"""

from __future__ import annotations

from typing import Optional

from eve_megatron.hf.eve_image_rules import CLIP_MEAN, CLIP_STD, DENSE_STRIDE, PATCH_STRIDE
from eve_megatron.hf.eve_prompt import IMAGE_TOKEN_INDEX


_MOE_PART = {"none": "", "mlp": "mlp", "all": "layernorm-self_attn-mlp"}
AUTO_MAP = {
    "AutoConfig": "configuration_eve_qwen2.EVEQwen2Config",
    "AutoModel": "modeling_eve_qwen2.EVEQwen2Model",
    "AutoModelForCausalLM": "modeling_eve_qwen2.EVEQwen2ForCausalLM",
    "AutoModelForImageTextToText": "modeling_eve_qwen2.EVEQwen2ForCausalLM",
    "AutoProcessor": "processing_eve_qwen2.EVEProcessor",
}
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_eve_qwen2.EVEImageProcessor",
    "AutoProcessor": "processing_eve_qwen2.EVEProcessor",
}


def hf_config(fields: dict, dtype: str, vision_tower: Optional[str] = None,
              bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> dict:
    """The released-layout ``config.json`` of an architecture (``MODEL_FIELDS`` dict).

    ``vision_tower`` (``mm_vision_tower``) is the folder holding the image processor
    config, read only by the official EVEv2 code (an export writes its own absolute path).
    """
    import transformers

    if not fields.get("add_qkv_bias", True):
        raise ValueError("HF Qwen2 always has q/k/v biases: cannot export add_qkv_bias=False")
    if fields.get("normalization", "RMSNorm") != "RMSNorm" or not fields.get("gated_linear_unit", True):
        raise ValueError("HF Qwen2 needs RMSNorm and a gated (SwiGLU) MLP")
    head_dim = fields.get("kv_channels") or fields["hidden_size"] // fields["num_attention_heads"]
    decoupling = fields.get("decoupling", "all")
    cfg = {
        "architectures": ["EVEQwen2ForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "eve-qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": fields["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": fields["ffn_hidden_size"],
        "max_position_embeddings": fields["max_sequence_length"],
        "max_window_layers": fields["num_layers"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_hidden_layers": fields["num_layers"],
        "num_key_value_heads": fields["num_query_groups"],
        "rms_norm_eps": fields["layernorm_epsilon"],
        "rope_theta": float(fields["rotary_base"]),
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": bool(fields["share_embeddings_and_output_weights"]),
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": fields["vocab_size"],
        "mm_hidden_size": fields["vision_hidden_size"],
        "add_moe": decoupling != "none",
        "moe_part": _MOE_PART[decoupling],
        "mm_vision_tower": vision_tower,
        "patch_stride": fields["patch_stride"],
        "dense_stride": fields["dense_stride"],
        "image_token_index": IMAGE_TOKEN_INDEX,
        "transformers_version": transformers.__version__,
    }
    if head_dim * fields["num_attention_heads"] != fields["hidden_size"]:
        cfg["head_dim"] = head_dim
    return cfg


def preprocessor_config(max_size: int, patch_stride: int, dense_stride: int,
                        alpha: str = "drop", resize_mode: str = "infer") -> dict:
    """``preprocessor_config.json``: the released keys (CLIP image processor style, read by the
    official code) plus what ``EVEImageProcessor`` needs (``auto_map``, ``resize_mode``, ``alpha``)."""
    return {
        "auto_map": dict(PROCESSOR_AUTO_MAP),
        "image_processor_type": "EVEImageProcessor", "processor_class": "EVEProcessor",
        "do_center_crop": False, "do_normalize": True, "do_resize": False,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3,
        "max_size": max_size, "patch_stride": patch_stride, "dense_stride": dense_stride,
        "resize_mode": resize_mode, "alpha": alpha,
    }


def processor_config() -> dict:
    """``processor_config.json``: how ``AutoProcessor`` finds ``EVEProcessor``."""
    return {"processor_class": "EVEProcessor",
            "auto_map": {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]}}


def decoupling_of(cfg: dict) -> str:
    """Our decoupling of an HF config: ``none`` for Qwen2, from ``add_moe``/``moe_part`` for EVE."""
    if not cfg.get("add_moe", False):
        return "none"
    parts = set(filter(None, str(cfg.get("moe_part", "")).split("-")))
    for decoupling, text in _MOE_PART.items():
        if parts == set(filter(None, text.split("-"))):
            return decoupling
    raise ValueError(f"moe_part {cfg.get('moe_part')!r} is not supported (only 'mlp' and "
                     "'layernorm-self_attn-mlp')")


def is_eve_config(cfg: dict) -> bool:
    """True for an EVE config (released layout), False for a plain Qwen2 one."""
    return cfg.get("model_type") == "eve-qwen2" or "mm_hidden_size" in cfg


def fields_from_hf(cfg: dict, decoupling: Optional[str] = None,
                   vision_hidden_size: int = 1024) -> dict:
    """``MODEL_FIELDS`` of an HF Qwen2 or EVE config; ``decoupling`` overrides the source's."""
    model_type = cfg.get("model_type")
    if model_type not in ("qwen2", "eve-qwen2"):
        raise ValueError(f"model_type {model_type!r} is not a Qwen2/Qwen2.5 or EVE checkpoint")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r}: Qwen2 uses silu")
    if cfg.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported (EVE uses full attention)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {rope} is not supported")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = cfg["num_attention_heads"]
    eve = is_eve_config(cfg)
    return {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": cfg["intermediate_size"],
        "kv_channels": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "vocab_size": cfg["vocab_size"],
        "max_sequence_length": cfg.get("max_position_embeddings", 32768),
        "rotary_base": float(theta),
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        "decoupling": decoupling or (decoupling_of(cfg) if eve else "none"),
        "vision_hidden_size": cfg.get("mm_hidden_size", vision_hidden_size),
        "patch_stride": cfg.get("patch_stride", PATCH_STRIDE),
        "dense_stride": cfg.get("dense_stride", DENSE_STRIDE),
        "layernorm_epsilon": cfg.get("rms_norm_eps", 1e-6), "add_qkv_bias": True,
        "normalization": "RMSNorm", "gated_linear_unit": True, "family": "evev2",
    }
