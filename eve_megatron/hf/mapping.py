"""The one table between our Megatron weight names and the Hugging Face EVE names.

Each :class:`Rule` maps one Megatron tensor (full, TP=1 view, global layer number ``{i}``)
to one HF tensor, or to the HF tensors it fuses: ``qkv`` (Megatron's rows per query
group: the group's q heads, then its k head, then its v head) and ``gate_up``
(``[gate; up]`` stacked). The same table serves both directions:

- export: :func:`megatron_to_hf` splits a Megatron tensor into its HF tensors;
- import: :func:`hf_to_megatron` merges HF tensors (read through a callback) into one.

Every function takes the family's table (default: EVEv2's :data:`TABLE`; EVEv1's is
``mapping_evev1.TABLE``): one declarative table per family.

Our code says text/vision; the HF side's ``moe_`` names (the released checkpoint's name
for the vision copies) appear only in this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import torch

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron: str
    hf: Tuple[str, ...]
    fuse: str = COPY


def _layer_rules(v: str, m: str, qkv_bias: bool = True) -> List[Rule]:
    """Rules of one decoder layer's branch: ``v``/``m`` = Megatron/HF prefix of the copy
    (``qkv_bias=False``: Llama's layer, no q/k/v bias)."""
    L, H = "decoder.layers.{i}.", "model.layers.{i}."
    rules = [
        Rule(f"{L}{v}input_layernorm.weight", (f"{H}{m}input_layernorm.weight",)),
        Rule(f"{L}self_attention.{v}linear_qkv.weight",
             tuple(f"{H}self_attn.{m}{p}_proj.weight" for p in "qkv"), QKV),
        Rule(f"{L}self_attention.{v}linear_qkv.bias",
             tuple(f"{H}self_attn.{m}{p}_proj.bias" for p in "qkv"), QKV),
        Rule(f"{L}self_attention.{v}linear_proj.weight", (f"{H}self_attn.{m}o_proj.weight",)),
        Rule(f"{L}{v}pre_mlp_layernorm.weight", (f"{H}{m}post_attention_layernorm.weight",)),
        Rule(f"{L}{v}mlp.linear_fc1.weight",
             (f"{H}{m}mlp.gate_proj.weight", f"{H}{m}mlp.up_proj.weight"), GATE_UP),
        Rule(f"{L}{v}mlp.linear_fc2.weight", (f"{H}{m}mlp.down_proj.weight",)),
    ]
    return rules if qkv_bias else [r for r in rules if not r.megatron.endswith("linear_qkv.bias")]


TABLE: Tuple[Rule, ...] = tuple([
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("embedding.patch_embedding.conv1.weight", ("model.vision_tower.patch_embedding.0.weight",)),
    Rule("embedding.patch_embedding.conv1.bias", ("model.vision_tower.patch_embedding.0.bias",)),
    Rule("embedding.patch_embedding.conv2.weight", ("model.vision_tower.patch_embedding.2.weight",)),
    Rule("embedding.patch_embedding.conv2.bias", ("model.vision_tower.patch_embedding.2.bias",)),
    Rule("embedding.patch_embedding.class_embedding", ("model.vision_tower.class_embedding",)),
    Rule("embedding.patch_embedding.split_embedding", ("model.vision_tower.split_embedding",)),
    *_layer_rules("", ""),  # text weights: the standard Qwen2 names
    *_layer_rules("vision_", "moe_"),  # vision copies: the release's moe_ names
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
])
"""Megatron name -> HF name(s); ``{i}`` is the global layer number on both sides."""


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


@lru_cache(maxsize=None)
def _compiled(table: Tuple[Rule, ...]):
    """``(by Megatron name, by HF name)`` patterns of a table (EVEv2's :data:`TABLE` or a
    family's, e.g. ``mapping_evev1.TABLE``)."""
    return ([(_pattern(r.megatron), r) for r in table],
            [(_pattern(h), r, k) for r in table for k, h in enumerate(r.hf)])


@dataclass(frozen=True)
class Heads:
    """What the fused q/k/v layout depends on."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int


def find_rule(megatron_name: str, table: Tuple[Rule, ...] = TABLE) -> Tuple[Rule, Optional[int]]:
    """The rule of a Megatron name and its layer number (None outside the decoder layers)."""
    for pattern, rule in _compiled(table)[0]:
        m = pattern.match(megatron_name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    raise KeyError(f"no HF name for Megatron tensor {megatron_name!r} (not in the mapping table)")


def hf_names(megatron_name: str, table: Tuple[Rule, ...] = TABLE) -> Tuple[str, ...]:
    """The HF tensor name(s) a Megatron tensor is made of."""
    rule, layer = find_rule(megatron_name, table)
    return tuple(h.replace("{i}", str(layer)) for h in rule.hf)


def megatron_name_of(hf_name: str, table: Tuple[Rule, ...] = TABLE) -> Tuple[str, int]:
    """``(Megatron name, part index)`` of an HF tensor name (KeyError if unknown)."""
    for pattern, rule, part in _compiled(table)[1]:
        m = pattern.match(hf_name)
        if m:
            layer = m.group(1) if m.groups() else None
            return rule.megatron.replace("{i}", str(layer)), part
    raise KeyError(f"HF tensor {hf_name!r} has no Megatron name (not in the mapping table)")


def split_qkv(fused: torch.Tensor, heads: Heads) -> List[torch.Tensor]:
    """Megatron's per-group ``[q_g; k_g; v_g]`` rows -> HF ``q``, ``k``, ``v``."""
    g, d = heads.num_query_groups, heads.head_dim
    per = heads.num_attention_heads // g
    rest = fused.shape[1:]
    x = fused.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """HF ``q``, ``k``, ``v`` -> Megatron's per-group fused rows (inverse of :func:`split_qkv`)."""
    g, d = heads.num_query_groups, heads.head_dim
    per = heads.num_attention_heads // g
    rest = q.shape[1:]
    expected = [(heads.num_attention_heads * d,), (g * d,), (g * d,)]
    for name, t, rows in zip("qkv", (q, k, v), expected):
        if t.shape[:1] != rows:
            raise ValueError(f"{name} projection has {t.shape[0]} rows, expected {rows[0]}")
    parts = [q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def megatron_to_hf(name: str, tensor: torch.Tensor, heads: Heads,
                   table: Tuple[Rule, ...] = TABLE) -> List[Tuple[str, torch.Tensor]]:
    """Split one full Megatron tensor into its ``(HF name, tensor)`` pairs."""
    rule, _ = find_rule(name, table)
    names = hf_names(name, table)
    if rule.fuse == QKV:
        parts = split_qkv(tensor, heads)
    elif rule.fuse == GATE_UP:
        if tensor.shape[0] % 2:
            raise ValueError(f"{name}: [gate; up] with an odd number of rows {tensor.shape[0]}")
        parts = [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    else:
        parts = [tensor]
    return list(zip(names, parts))


def hf_to_megatron(name: str, read: Callable[[str], torch.Tensor], heads: Heads,
                   table: Tuple[Rule, ...] = TABLE) -> torch.Tensor:
    """Build one full Megatron tensor from the HF tensors ``read(hf_name)`` returns."""
    rule, _ = find_rule(name, table)
    parts = [read(h) for h in hf_names(name, table)]
    if rule.fuse == QKV:
        return merge_qkv(*parts, heads)
    if rule.fuse == GATE_UP:
        if parts[0].shape != parts[1].shape:
            raise ValueError(f"{name}: gate {tuple(parts[0].shape)} and up "
                             f"{tuple(parts[1].shape)} differ in shape")
        return torch.cat(parts, dim=0)
    return parts[0]


def hf_shapes(name: str, shape: Tuple[int, ...], heads: Heads,
              table: Tuple[Rule, ...] = TABLE) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the HF tensors of a Megatron tensor of ``shape`` (no data needed)."""
    rule, _ = find_rule(name, table)
    names = hf_names(name, table)
    rest = tuple(shape[1:])
    if rule.fuse == QKV:
        d = heads.head_dim
        rows = [heads.num_attention_heads * d, heads.num_query_groups * d,
                heads.num_query_groups * d]
        if sum(rows) != shape[0]:
            raise ValueError(f"{name}: {shape[0]} fused q/k/v rows, the heads need {sum(rows)}")
        return {n: (r, *rest) for n, r in zip(names, rows)}
    if rule.fuse == GATE_UP:
        return {n: (shape[0] // 2, *rest) for n in names}
    return {names[0]: tuple(shape)}


def vision_twin(megatron_name: str) -> Optional[str]:
    """The text tensor a vision copy is initialised from (None for a non-vision name)."""
    if "vision_" not in megatron_name:
        return None
    return megatron_name.replace("vision_", "", 1)
