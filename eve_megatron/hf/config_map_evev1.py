"""EVEv1 architecture <-> the released EVE-7B-v1.0 ``config.json`` (and a Llama/CLIP one).

Reference: ../shared/docs/evev1_reference.md §4. The released config is a Llama config
(``model_type "eve"``, ``EVELlamaForCausalLM``) plus the LLaVA-style ``mm_*`` keys. What
the release keeps elsewhere (the Google-Drive preprocessor folders, the CLIP model's own
config) or hard-codes (PEL/PAL heads, the tap stride) is written under our own keys, and
read back with the release's values as defaults when a folder lacks them.
"""

from __future__ import annotations

from typing import Optional

from eve_megatron.hf.eve_prompt import IMAGE_TOKEN_INDEX
from eve_megatron.hf.evev1_image_rules import BASE_SIZE, DENSE_STRIDE, PATCH_STRIDE

AUTO_MAP = {
    "AutoConfig": "configuration_eve_llama.EVELlamaConfig",
    "AutoModel": "modeling_eve_llama.EVELlamaModel",
    "AutoModelForCausalLM": "modeling_eve_llama.EVELlamaForCausalLM",
    "AutoImageProcessor": "image_processing_eve_llama.EVEv1ImageProcessor",
}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
              "num_hidden_layers": 24, "image_size": BASE_SIZE, "patch_size": 14,
              "layer_norm_eps": 1e-5}
"""``openai/clip-vit-large-patch14-336``'s vision config: the released teacher."""
_TEACHER_KEYS = {"hidden_size": "teacher_hidden_size", "intermediate_size": "teacher_ffn_hidden_size",
                 "num_attention_heads": "teacher_num_attention_heads",
                 "num_hidden_layers": "teacher_num_layers", "image_size": "teacher_image_size",
                 "patch_size": "teacher_patch_size", "layer_norm_eps": "teacher_layernorm_epsilon"}


def is_evev1_config(cfg: dict) -> bool:
    """True for a released-layout EVEv1 config (``model_type "eve"``/``EVELlamaForCausalLM``)."""
    return cfg.get("model_type") == "eve" or "EVELlamaForCausalLM" in (cfg.get("architectures") or [])


def hf_config(fields: dict, dtype: str, vocab_size: int, ratio: int = 2,
              bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0) -> dict:
    """The released-layout ``config.json`` of an EVEv1 architecture (vocab unpadded to
    ``vocab_size``; ``ratio`` 2 = the 672 model, 4 = HD 1344)."""
    import transformers

    if fields.get("family") != "evev1":
        raise ValueError(f"not an EVEv1 architecture (family {fields.get('family')!r})")
    teacher = {k: fields[v] for k, v in _TEACHER_KEYS.items()}
    return {
        "architectures": ["EVELlamaForCausalLM"], "auto_map": dict(AUTO_MAP), "model_type": "eve",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "hidden_act": "silu", "hidden_size": fields["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": fields["ffn_hidden_size"],
        "max_position_embeddings": fields["max_sequence_length"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_hidden_layers": fields["num_layers"],
        "num_key_value_heads": fields["num_query_groups"], "pretraining_tp": 1,
        "rms_norm_eps": fields["layernorm_epsilon"], "rope_scaling": None,
        "rope_theta": float(fields["rotary_base"]),
        "tie_word_embeddings": bool(fields["share_embeddings_and_output_weights"]),
        "torch_dtype": dtype, "transformers_version": transformers.__version__,
        "use_cache": True, "vocab_size": vocab_size,
        # the release's EVE keys (§4)
        "mm_vision_tower": f"openai/eve-patch14-anypixel-{BASE_SIZE * ratio}",
        "mm_vision_tower_clip": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": fields["vision_hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "requires_cliploss": True, "use_mm_proj": True, "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "square",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None, "vision_tower_lr": None,
        # ours: what the release keeps outside config.json or hard-codes
        "image_size": BASE_SIZE * ratio, "image_size_clip": BASE_SIZE,
        "patch_stride": fields["patch_stride"], "conv_stride": fields["dense_stride"],
        "pel_num_attention_heads": fields["pel_num_attention_heads"],
        "pal_layer_stride": fields["pal_layer_stride"],
        "pal_num_attention_heads": fields["pal_num_attention_heads"],
        "image_token_index": IMAGE_TOKEN_INDEX, "vision_clip_config": teacher,
    }


def teacher_config(cfg: dict) -> dict:
    """The CLIP vision config of a ``CLIPVisionModel`` (or ``CLIPModel``) ``config.json``."""
    vision = cfg.get("vision_config") or cfg
    return {k: vision.get(k, v) for k, v in CLIP_L_336.items()}


def fields_from_hf(cfg: dict, teacher: Optional[dict] = None, vision_hidden_size: int = 1024) -> dict:
    """EVEv1 ``MODEL_FIELDS`` of a released EVE (``model_type "eve"``) or plain Llama/Vicuna
    ``config.json``; ``teacher`` (a CLIP vision config) overrides the folder's
    ``vision_clip_config`` (default: CLIP-L/14-336)."""
    model_type = cfg.get("model_type")
    if model_type not in ("eve", "llama"):
        raise ValueError(f"model_type {model_type!r} is neither an EVEv1 ('eve') nor a Llama "
                         "('llama') checkpoint")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias", False):
        raise ValueError("EVEv1 needs Llama's silu MLP and no attention bias")
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError("RoPE scaling is not supported (EVEv1 uses plain RoPE)")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {cfg['mm_projector_type']!r}: EVEv1 uses mlp2x_gelu")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    clip = teacher or cfg.get("vision_clip_config") or CLIP_L_336
    fields = {
        "num_layers": layers, "hidden_size": cfg["hidden_size"], "num_attention_heads": heads,
        "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "ffn_hidden_size": cfg["intermediate_size"],
        "kv_channels": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "layernorm_epsilon": cfg.get("rms_norm_eps", 1e-5), "add_qkv_bias": False,
        "normalization": "RMSNorm", "gated_linear_unit": True, "vocab_size": cfg["vocab_size"],
        "max_sequence_length": cfg.get("max_position_embeddings", 4096),
        "rotary_base": float(theta),
        "share_embeddings_and_output_weights": bool(cfg.get("tie_word_embeddings", False)),
        "decoupling": "none", "vision_hidden_size": cfg.get("mm_hidden_size", vision_hidden_size),
        "patch_stride": cfg.get("patch_stride", PATCH_STRIDE),
        "dense_stride": cfg.get("conv_stride", DENSE_STRIDE),
        "pel_num_attention_heads": cfg.get("pel_num_attention_heads", 8),
        "pal_layer_stride": cfg.get("pal_layer_stride", max(1, layers // 8)),
        "pal_num_attention_heads": cfg.get("pal_num_attention_heads", 8), "family": "evev1",
    }
    fields.update({ours: clip.get(k, CLIP_L_336[k]) for k, ours in _TEACHER_KEYS.items()})
    return fields
