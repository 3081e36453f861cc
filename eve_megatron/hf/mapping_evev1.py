"""EVEv1's name table: our Megatron names <-> the released EVE-7B-v1.0 names.

Reference: ../shared/docs/evev1_reference.md §4 (released checkpoint layout). Rules are
:class:`mapping.Rule` and every helper of ``mapping`` takes this table
(``table=mapping_evev1.TABLE``), so both directions (export and import) read this one table.

- Llama decoder: the EVEv2 table's dense layer without the q/k/v bias (q/k/v split per
  head group, ``[gate; up]`` split), ``model.embed_tokens``, ``model.norm``, ``lm_head``;
- patch embedding layer (PEL): ``model.vision_tower.*``, its ``mlp2x_gelu`` projector
  ``model.mm_projector.{0,2}.*``;
- patch aligning layer (PAL): ``model.vision_tower_compressor.*``;
- the frozen CLIP teacher: ``model.vision_clip.backbone.vision_model.*`` (HF
  ``CLIPVisionModel`` names; only the layers the teacher uses: the release's last encoder
  layer and ``post_layernorm`` are never read, so an import drops them and an export
  does not write them). ``{i}`` is the decoder layer, the PAL head or the teacher layer.
"""

from __future__ import annotations

from typing import Tuple

from eve_megatron.hf.mapping import Rule, _layer_rules

PEL, VT = "embedding.patch_embedding.", "model.vision_tower."
CLIP = "model.vision_clip.backbone.vision_model."
"""Where the released checkpoint keeps the teacher (``EVEMetaModel.vision_clip``)."""
CLIP_ALIAS = "model.vision_tower_compressor.clip_layer.backbone.vision_model."
"""The same teacher module seen through the PAL (``clip_layer``): a release saved with the
shared module deduplicated may store it under this name instead (read on import, never
written)."""
_ATTENTION_PARTS = ("q.0.weight", "q.0.bias", "q.1.weight", "kv.0.weight", "kv.0.bias",
                    "kv.1.weight", "proj.weight", "proj.bias")
_TEACHER_LAYER_PARTS = tuple(
    f"{module}.{kind}" for module in ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj", "self_attn.out_proj", "layer_norm2",
                                      "mlp.fc1", "mlp.fc2") for kind in ("weight", "bias"))


def _same(ours: str, theirs: str, names) -> list:
    """One copy rule per name: ``ours + n`` <-> ``theirs + n``."""
    return [Rule(ours + n, (theirs + n,)) for n in names]


TABLE: Tuple[Rule, ...] = tuple([
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(PEL + "conv.weight", (VT + "patch_embedding.weight",)),
    *_same(PEL, VT, ("class_embedding", "split_embedding")),
    *_same(PEL + "local_attention.", VT + "local_attention.", _ATTENTION_PARTS),
    *_same(PEL + "global_attention.", VT + "global_attention.", _ATTENTION_PARTS),
    *_same(PEL + "projector.", "model.mm_projector.",
           ("0.weight", "0.bias", "2.weight", "2.bias")),
    *_layer_rules("", "", qkv_bias=False),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
    *_same("pal.", "model.vision_tower_compressor.",
           ("norm_layer.{i}.0.weight", "norm_layer.{i}.0.bias", "norm_layer.{i}.1.weight",
            "input_layer.weight", "input_layer.bias", "output_layer.weight",
            "output_layer.bias")),
    *_same("teacher.", CLIP, ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                              "embeddings.position_embedding.weight", "pre_layrnorm.weight",
                              "pre_layrnorm.bias")),
    *_same("teacher.encoder.layers.{i}.", CLIP + "encoder.layers.{i}.", _TEACHER_LAYER_PARTS),
])
"""Megatron name -> released HF name(s) of every EVEv1 weight."""

VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""The tensors whose rows are the (possibly padded) vocabulary: an export keeps the
tokenizer's rows only."""
