"""The full (TP=1) weights an architecture has, with their shapes, from ``MODEL_FIELDS`` alone.

Used to check a checkpoint before converting it (a missing or mis-shaped tensor is named
up front) and to plan the output without reading any data. ``tests`` check it against
the parameters of a real ``EVEModel`` for every decoupling, tied or not.
"""

from __future__ import annotations

from typing import Dict, Tuple

from eve_megatron.hf.mapping import Heads

Shape = Tuple[int, ...]


def heads_of(fields: dict) -> Heads:
    """The attention layout of an architecture."""
    heads = fields["num_attention_heads"]
    head_dim = fields.get("kv_channels") or fields["hidden_size"] // heads
    return Heads(heads, fields["num_query_groups"], head_dim)


def _branch(fields: dict, vision: bool) -> Dict[str, Shape]:
    h, f = fields["hidden_size"], fields["ffn_hidden_size"]
    hd = heads_of(fields)
    qkv_rows = (hd.num_attention_heads + 2 * hd.num_query_groups) * hd.head_dim
    decoupling = fields["decoupling"]
    attn = not vision or decoupling == "all"
    mlp = not vision or decoupling in ("mlp", "all")
    v = "vision_" if vision else ""
    out: Dict[str, Shape] = {}
    if attn:
        out.update({
            f"{v}input_layernorm.weight": (h,),
            f"self_attention.{v}linear_qkv.weight": (qkv_rows, h),
            f"self_attention.{v}linear_qkv.bias": (qkv_rows,),
            f"self_attention.{v}linear_proj.weight": (h, hd.num_attention_heads * hd.head_dim),
            f"{v}pre_mlp_layernorm.weight": (h,),
        })
    if mlp:
        out.update({f"{v}mlp.linear_fc1.weight": (2 * f, h), f"{v}mlp.linear_fc2.weight": (h, f)})
    return out


def layer_shapes(fields: dict) -> Dict[str, Shape]:
    """Per-layer names (after ``decoder.layers.{i}.``) and shapes, text then vision."""
    return {**_branch(fields, vision=False), **_branch(fields, vision=True)}


def expected_shapes(fields: dict) -> Dict[str, Shape]:
    """Every full Megatron weight of the architecture, in HF-friendly order."""
    h, c = fields["hidden_size"], fields["vision_hidden_size"]
    p, d = fields["patch_stride"], fields["dense_stride"]
    out: Dict[str, Shape] = {"embedding.word_embeddings.weight": (fields["vocab_size"], h)}
    per_layer = layer_shapes(fields)
    for i in range(fields["num_layers"]):
        out.update({f"decoder.layers.{i}.{name}": s for name, s in per_layer.items()})
    out["decoder.final_layernorm.weight"] = (h,)
    if not fields["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = (fields["vocab_size"], h)
    out.update({
        "embedding.patch_embedding.conv1.weight": (c, 3, p, p),
        "embedding.patch_embedding.conv1.bias": (c,),
        "embedding.patch_embedding.conv2.weight": (h, c, d, d),
        "embedding.patch_embedding.conv2.bias": (h,),
        "embedding.patch_embedding.class_embedding": (h,),
        "embedding.patch_embedding.split_embedding": (h,),
    })
    return out
