"""The attention layout the HF mapping splits q/k/v by, from a recorded architecture.

Which weights exist, with their shapes, is written once: ``models/eve/weights.py``.
"""

from __future__ import annotations

from eve_megatron.hf.mapping import Heads
from eve_megatron.models.eve.weights import head_dim


def heads_of(fields: dict) -> Heads:
    """The attention layout of an architecture."""
    return Heads(fields["num_attention_heads"], fields["num_query_groups"], head_dim(fields))
