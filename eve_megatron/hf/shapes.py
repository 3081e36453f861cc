"""The attention layout the HF mapping splits q/k/v by and the family's name table, from a
recorded architecture.

Which weights exist, with their shapes, is written once: ``models/eve/weights.py``.
"""

from __future__ import annotations

from typing import Tuple

from eve_megatron.hf import mapping, mapping_evev1
from eve_megatron.hf.mapping import Heads, Rule
from eve_megatron.models.eve.weights import head_dim


def heads_of(fields: dict) -> Heads:
    """The attention layout of an architecture."""
    return Heads(fields["num_attention_heads"], fields["num_query_groups"], head_dim(fields))


def table_of(fields: dict) -> Tuple[Rule, ...]:
    """The name table of an architecture's family (``mapping.TABLE`` for EVEv2)."""
    family = fields.get("family", "evev2")
    tables = {"evev2": mapping.TABLE, "evev1": mapping_evev1.TABLE}
    if family not in tables:
        raise ValueError(f"no HF name table for model family {family!r}")
    return tables[family]
