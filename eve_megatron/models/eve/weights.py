"""Which weights an EVE architecture has, with their full (TP=1) shapes: the one place that says it.

The decoder layer builds exactly the vision twins :data:`VISION_TWINS` names for its
decoupling; the HF conversion checks and plans checkpoints with :func:`weight_shapes`; the
parameter counts and FLOPs (``flops.py``) sum it; the test reference asks
:func:`has_vision_twin`. Everything here reads only the architecture fields
(``config.MODEL_FIELDS``), so it works on a recorded checkpoint without building a model.
A test compares :func:`weight_shapes` with a real ``EVEModel``'s parameters for every
decoupling, tied or not, with and without the q/k/v bias.
"""

from __future__ import annotations

from typing import Dict, Tuple

Shape = Tuple[int, ...]

VISION_TWINS: Dict[str, Tuple[str, ...]] = {
    "none": (),
    "mlp": ("mlp",),
    "all": ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"),
}
"""Per decoupling, the parts of a decoder layer that have a ``vision_`` twin (for
``self_attention``: its ``linear_qkv`` and ``linear_proj``; the core attention is shared)."""


def has_vision_twin(decoupling: str, part: str) -> bool:
    """Whether ``part`` (a key of a layer: ``input_layernorm``, ``self_attention``,
    ``pre_mlp_layernorm``, ``mlp``) has a vision copy under ``decoupling``."""
    if decoupling not in VISION_TWINS:
        raise ValueError(f"decoupling must be one of {tuple(VISION_TWINS)}, got {decoupling!r}")
    return part in VISION_TWINS[decoupling]


def head_dim(fields: dict) -> int:
    """Per-head width: ``kv_channels``, else ``hidden_size / num_attention_heads``."""
    return fields.get("kv_channels") or fields["hidden_size"] // fields["num_attention_heads"]


def _parts(fields: dict) -> Dict[str, Dict[str, Shape]]:
    """The text weights of one layer, grouped by the part that may have a twin."""
    h, f, d = fields["hidden_size"], fields["ffn_hidden_size"], head_dim(fields)
    nq, nkv = fields["num_attention_heads"], fields["num_query_groups"]
    qkv_rows = (nq + 2 * nkv) * d
    attn = {"linear_qkv.weight": (qkv_rows, h), "linear_proj.weight": (h, nq * d)}
    if fields.get("add_qkv_bias", True):
        attn["linear_qkv.bias"] = (qkv_rows,)
    fc1_rows = 2 * f if fields.get("gated_linear_unit", True) else f
    return {"input_layernorm": {"weight": (h,)}, "self_attention": attn,
            "pre_mlp_layernorm": {"weight": (h,)},
            "mlp": {"linear_fc1.weight": (fc1_rows, h), "linear_fc2.weight": (h, f)}}


def layer_weight_shapes(fields: dict) -> Dict[str, Shape]:
    """Per-layer names (after ``decoder.layers.{i}.``) and shapes, text then vision."""
    out: Dict[str, Shape] = {}
    parts = _parts(fields)
    for vision in (False, True):
        for part, weights in parts.items():
            if vision and not has_vision_twin(fields["decoupling"], part):
                continue
            for name, shape in weights.items():
                if part == "self_attention":  # twins inside the module: self_attention.vision_x
                    key = f"self_attention.{'vision_' if vision else ''}{name}"
                else:
                    key = f"{'vision_' if vision else ''}{part}.{name}"
                out[key] = shape
    return out


def patch_embedding_shapes(fields: dict) -> Dict[str, Shape]:
    """The patch embedding's weights (names after ``embedding.patch_embedding.``)."""
    h, c = fields["hidden_size"], fields["vision_hidden_size"]
    p, d = fields["patch_stride"], fields["dense_stride"]
    return {"conv1.weight": (c, 3, p, p), "conv1.bias": (c,), "conv2.weight": (h, c, d, d),
            "conv2.bias": (h,), "class_embedding": (h,), "split_embedding": (h,)}


def weight_shapes(fields: dict) -> Dict[str, Shape]:
    """Every full Megatron weight of an architecture, in HF-friendly order (EVEv1's in
    ``models/evev1/weights.py``)."""
    family = fields.get("family", "evev2")
    if family == "evev1":
        from eve_megatron.models.evev1.weights import weight_shapes as evev1_weight_shapes

        return evev1_weight_shapes(fields)
    if family != "evev2":
        raise ValueError(f"no weight table for model family {family!r} (known: evev2, evev1)")
    h = fields["hidden_size"]
    out: Dict[str, Shape] = {"embedding.word_embeddings.weight": (fields["vocab_size"], h)}
    per_layer = layer_weight_shapes(fields)
    for i in range(fields["num_layers"]):
        out.update({f"decoder.layers.{i}.{name}": s for name, s in per_layer.items()})
    out["decoder.final_layernorm.weight"] = (h,)
    if not fields["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = (fields["vocab_size"], h)
    out.update({f"embedding.patch_embedding.{k}": s
                for k, s in patch_embedding_shapes(fields).items()})
    return out
