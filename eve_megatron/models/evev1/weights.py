"""Which weights an EVEv1 architecture has, with their full (TP=1) shapes.

The EVEv1 twin of ``models/eve/weights.py`` (which dispatches here for ``family: evev1``),
with the PAL's taps (``EVEv1Config.pal_taps`` asks :func:`pal_taps`): the export plans and
checks checkpoints with it, the import fills every name it lists. Reads only the recorded
architecture (``eve_model.json``), so it needs no model. A test compares it with a real
``EVEv1Model``'s parameters.
"""

from __future__ import annotations

from typing import Dict

from eve_megatron.models.eve.weights import Shape, layer_weight_shapes


def pal_taps(num_layers: int, pal_layer_stride: int) -> list:
    """The PAL's tapped hidden states ``L, L - k, ..., 0``, the query (hs[L]) first (one
    ``norm_layer`` each)."""
    return list(range(num_layers, -1, -pal_layer_stride))


def pel_shapes(fields: dict) -> Dict[str, Shape]:
    """The PEL and projector (names after ``embedding.patch_embedding.``)."""
    c, h, p = fields["vision_hidden_size"], fields["hidden_size"], fields["patch_stride"]
    out: Dict[str, Shape] = {"class_embedding": (c,), "split_embedding": (c,),
                             "conv.weight": (c, 3, p, p)}
    for a in ("local", "global"):
        out.update({f"{a}_attention.q.0.weight": (c,), f"{a}_attention.q.0.bias": (c,),
                    f"{a}_attention.q.1.weight": (c, c), f"{a}_attention.kv.0.weight": (c,),
                    f"{a}_attention.kv.0.bias": (c,), f"{a}_attention.kv.1.weight": (2 * c, c),
                    f"{a}_attention.proj.weight": (c, c), f"{a}_attention.proj.bias": (c,)})
    out.update({"projector.0.weight": (h, c), "projector.0.bias": (h,),
                "projector.2.weight": (h, h), "projector.2.bias": (h,)})
    return out


def pal_shapes(fields: dict) -> Dict[str, Shape]:
    """The PAL heads (names after ``pal.``)."""
    h, t = fields["hidden_size"], fields["teacher_hidden_size"]
    out: Dict[str, Shape] = {}
    for j in range(len(pal_taps(fields["num_layers"], fields["pal_layer_stride"]))):
        out.update({f"norm_layer.{j}.0.weight": (h,), f"norm_layer.{j}.0.bias": (h,),
                    f"norm_layer.{j}.1.weight": (t, h)})
    out.update({"input_layer.weight": (t, h), "input_layer.bias": (t,),
                "output_layer.weight": (t, t), "output_layer.bias": (t,)})
    return out


def teacher_shapes(fields: dict) -> Dict[str, Shape]:
    """The frozen CLIP teacher's layers up to the tapped one (names after ``teacher.``)."""
    c, f = fields["teacher_hidden_size"], fields["teacher_ffn_hidden_size"]
    p = fields["teacher_patch_size"]
    positions = (fields["teacher_image_size"] // p) ** 2 + 1
    out: Dict[str, Shape] = {"embeddings.class_embedding": (c,),
                             "embeddings.patch_embedding.weight": (c, 3, p, p),
                             "embeddings.position_embedding.weight": (positions, c),
                             "pre_layrnorm.weight": (c,), "pre_layrnorm.bias": (c,)}
    layer = {"layer_norm1": (c,), "layer_norm2": (c,)}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer[f"self_attn.{proj}"] = (c, c)
    layer.update({"mlp.fc1": (f, c), "mlp.fc2": (c, f)})
    for i in range(fields["teacher_num_layers"] - 1):
        for name, shape in layer.items():
            out[f"encoder.layers.{i}.{name}.weight"] = shape if len(shape) == 2 else (c,)
            out[f"encoder.layers.{i}.{name}.bias"] = (shape[0],)
    return out


def weight_shapes(fields: dict) -> Dict[str, Shape]:
    """Every full Megatron weight of an EVEv1 architecture: decoder, PEL, PAL, teacher."""
    h, v = fields["hidden_size"], fields["vocab_size"]
    out: Dict[str, Shape] = {"embedding.word_embeddings.weight": (v, h)}
    out.update({f"embedding.patch_embedding.{k}": s for k, s in pel_shapes(fields).items()})
    per_layer = layer_weight_shapes(fields)
    for i in range(fields["num_layers"]):
        out.update({f"decoder.layers.{i}.{name}": s for name, s in per_layer.items()})
    out["decoder.final_layernorm.weight"] = (h,)
    if not fields["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = (v, h)
    out.update({f"pal.{k}": s for k, s in pal_shapes(fields).items()})
    out.update({f"teacher.{k}": s for k, s in teacher_shapes(fields).items()})
    return out
